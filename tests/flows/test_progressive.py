"""The progressive flow, in-process under one session-scoped Prefect test harness, on a tiny LLaMA."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

from tierprune.config import TierpruneConfig, config_from_flags
from tierprune.errors import TierpruneError
from tierprune.storage.runstore import RunStore

pytestmark = pytest.mark.slow

# The smoke plan's 0.1 epochs of 2,560 tokens: 8 windows of 32 tokens, two optimizer steps of distillation per iteration.
TINY_FINETUNE = {"ft_tokens": 2560, "ft_seqlen": 32, "ft_batch_size": 4}
PLAN = str(Path(__file__).parents[2] / "schedules" / "plans" / "smoke.csv")


def _config(tiny_llama_dir: Path, data_dir: Path, store: str, run: str, **extra) -> TierpruneConfig:
    return config_from_flags(model=str(tiny_llama_dir), calib=f"c4:{data_dir}/c4-subset", calib_samples=4,
                             calib_seqlen=32, calib_batch_size=2, eval=f"wikitext2:{data_dir}/wikitext-2-raw",
                             eval_seqlen=32, eval_max_windows=2, plan=PLAN, store=store, run=run,
                             **{**TINY_FINETUNE, **extra})


def _markers(store: RunStore) -> dict[str, bytes]:
    """Every committed step's COMMIT.json bytes: they change if and only if a step is recomputed."""
    return {rel: store._cat(f"{rel}/COMMIT.json") for rel in store.committed_steps()}


def _final(store: RunStore, iteration: int) -> dict[str, bytes]:
    """The tier map and checkpoint bytes recorded as iteration `iteration`'s result."""
    rel = next(r for r in store.committed_steps() if r.startswith(f"iter-{iteration:03d}/iteration-"))
    record = json.loads(store.read(f"{store.uri}/{rel}", "iteration.json"))
    return {
        "tiers": store.read(f"{store.uri}/{record['tiers']['rel']}", "tiers.parquet"),
        "masks": store.read(f"{store.uri}/{record['tiers']['rel']}", "masks.safetensors"),
        # The checkpoint index names every tensor's blob by its sha256: equal indexes, equal weights.
        "checkpoint": store.read_object(f"{store.uri}/{record['checkpoint']['rel']}", "checkpoint.json")["tensors"],
    }


@pytest.fixture(params=["memory", "s3"])
def store_uri(request, mem_root) -> str:
    if request.param == "memory":
        return mem_root
    return f"{request.getfixturevalue('s3_base')}/flows-{uuid.uuid4().hex}"


def test_flow_runs_resumes_for_free_and_reports(prefect_harness, tiny_llama_dir, data_dir, store_uri):
    from prefect.client.orchestration import get_client

    from tierprune.flows.progressive import progressive_from_config as progressive

    cfg = _config(tiny_llama_dir, data_dir, store_uri, "r")
    rows = progressive(cfg)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["tier topk"] == pytest.approx(0.20, abs=0.05)  # per-matrix rounding on a tiny model
    assert rows[0]["sparsity"] == 0.0 and rows[-1]["sparsity"] > rows[1]["sparsity"] > 0
    store = RunStore(store_uri, "r")
    before = _markers(store)
    assert len(before) == 3 + 6 * 3  # start, eval, record; then 6 steps per iteration
    # The same flow again: every step is found committed, nothing is recomputed or rewritten.
    again = progressive(cfg)
    assert again == rows  # seconds too: what the steps took when computed, not the rerun's lookups
    assert all(r["seconds"] > 0 for r in rows)
    assert _markers(store) == before
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(limit=200, offset=0, sort=ArtifactSort.CREATED_DESC)}
    assert {"iteration-0", "iteration-3", "tier-maps-3"} <= keys

    # The report of an iteration whose eval.json is read back from its bytes (a resumed run's case: the JSON's
    # keys are sorted, 2:4 first) still lists the tiers as dense, 2:4, topk, in the table and the markdown.
    from types import SimpleNamespace

    from tierprune.tasks.report import report_task

    fresh = RunStore(store_uri, "r")  # nothing cached: every object is decoded from the stored file
    evaluation, tiers = (SimpleNamespace(uri=fresh.steps_of(3, step)[0]) for step in ("eval", "tiers"))
    assert list(fresh.read_object(evaluation.uri, "eval.json")["tiers"]) == ["2:4", "dense", "topk"]
    row = report_task.fn(SimpleNamespace(store=fresh), 3, evaluation, tiers, 1.0)
    assert [k for k in row if k.startswith("tier ")] == ["tier dense", "tier 2:4", "tier topk"]
    with get_client(sync_client=True) as client:
        newest = client.read_artifacts(limit=200, offset=0, sort=ArtifactSort.CREATED_DESC)
    fractions = next(line for line in next(a.data for a in newest if a.key == "tier-maps-3").splitlines()
                     if "topk 0." in line)
    assert fractions.index("dense") < fractions.index("2:4") < fractions.index("topk")


def test_resume_from_another_runs_iteration_matches_the_original(prefect_harness, tiny_llama_dir, data_dir,
                                                                 mem_root):
    from tierprune.flows.progressive import progressive_from_config as progressive

    progressive(_config(tiny_llama_dir, data_dir, mem_root, "original"))
    original = RunStore(mem_root, "original")
    resumed_cfg = _config(tiny_llama_dir, data_dir, mem_root, "resumed", resume_from=f"{original.uri}/iter-001")
    rows = progressive(resumed_cfg)
    assert [r["iteration"] for r in rows] == [2, 3]
    resumed = RunStore(mem_root, "resumed")
    for k in (2, 3):
        assert _final(resumed, k) == _final(original, k)


def test_second_writer_is_refused(prefect_harness, tiny_llama_dir, data_dir, mem_root):
    from tierprune.flows.progressive import progressive_from_config as progressive

    cfg = _config(tiny_llama_dir, data_dir, mem_root, "busy")
    store = RunStore(mem_root, "busy")
    with store.lock(owner="another writer"):
        with pytest.raises(TierpruneError, match="locked by another writer"):
            progressive(cfg)
    assert not store.exists() or not store.committed_steps()  # the refused writer committed nothing


def test_resume_with_a_tier_map_of_another_shape_is_refused(prefect_harness, tiny_llama_dir, data_dir, mem_root,
                                                            tmp_path):
    from transformers import AutoTokenizer

    from tests.conftest import make_tiny_llama
    from tierprune.flows.progressive import progressive_from_config as progressive

    progressive(_config(tiny_llama_dir, data_dir, mem_root, "small"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    other = make_tiny_llama(vocab=len(tokenizer), hidden=96, intermediate=192)
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    cfg = _config(tmp_path / "other", data_dir, mem_root, "other",
                  resume_from=f"{RunStore(mem_root, 'small').uri}/iter-002")
    with pytest.raises(TierpruneError, match="does not match the model"):
        progressive(cfg)


def _checkpoint_tensors(store: RunStore, iteration: int) -> tuple[dict, dict]:
    """(weights by name, keep masks by module) of iteration `iteration` as committed in the store."""
    from tierprune.storage.checkpoints import load_checkpoint
    from tierprune.tasks.demote import read_masks

    rel = next(r for r in store.committed_steps() if r.startswith(f"iter-{iteration:03d}/iteration-"))
    record = json.loads(store.read(f"{store.uri}/{rel}", "iteration.json"))
    index = store.read_object(f"{store.uri}/{record['checkpoint']['rel']}", "checkpoint.json")
    if "masks.safetensors" not in record["tiers"]["files"]:
        return dict(load_checkpoint(store, index)), {}  # the dense start
    masks = read_masks(store.read(f"{store.uri}/{record['tiers']['rel']}", "masks.safetensors"))
    return dict(load_checkpoint(store, index)), {name: masks.mask(name) for name in masks}


def test_lora_recovery_merges_into_exactly_the_tier_maps_sparsity(prefect_harness, tiny_llama_dir, data_dir,
                                                                  mem_root, tmp_path):
    from safetensors.torch import load_file

    from tierprune.flows.progressive import progressive_from_config as progressive
    from tierprune.tasks.export import export_run

    cfg = _config(tiny_llama_dir, data_dir, mem_root, "lora", ft_method="lora", lora_rank=4, ft_lr=1e-2,
                  lora_targets="q_proj,v_proj,down_proj")
    rows = progressive(cfg)
    assert all(r["ft tokens"] == 256 for r in rows[1:])
    store = RunStore(mem_root, "lora")
    for k in (1, 2, 3):
        weights, masks = _checkpoint_tensors(store, k)
        previous, _ = _checkpoint_tensors(store, k - 1)
        for module, keep in masks.items():
            W = weights[f"{module}.weight"]
            assert int((W[~keep] != 0).sum()) == 0, (k, module)  # the merge added no non-zero anywhere
            adapted = module.endswith(("q_proj", "v_proj", "down_proj"))
            # LoRA moved the adapted weights (inside the mask) and left the others as masked before.
            assert (not torch.equal(W, previous[f"{module}.weight"] * keep)) == adapted, (k, module)
    original = (tiny_llama_dir / "model.safetensors").read_bytes()
    with pytest.raises(TierpruneError, match=r"is the folder --model .* is loaded from: writing there would replace"):
        export_run(store, str(tiny_llama_dir))  # the run's own base model folder
    assert (tiny_llama_dir / "model.safetensors").read_bytes() == original
    exported = export_run(store, str(tmp_path / "out"))
    weights = load_file(tmp_path / "out" / "model.safetensors")
    _, masks = _checkpoint_tensors(store, exported["iteration"])
    assert all(int((weights[f"{m}.weight"][~keep] != 0).sum()) == 0 for m, keep in masks.items())
    assert (tmp_path / "out" / "masks.safetensors").is_file()
    # The dense iteration 0 into the same folder: no masks of the later iteration are left beside its weights.
    dense = export_run(store, str(tmp_path / "out"), iteration=0)
    assert dense["iteration"] == 0 and not (tmp_path / "out" / "masks.safetensors").exists()
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.mlp.down_proj.weight"],
                       _checkpoint_tensors(store, 0)[0]["model.layers.0.mlp.down_proj.weight"])


def test_export_writes_the_last_iteration_once_the_plan_is_done_and_a_bad_target_fails_first(
        prefect_harness, tiny_llama_dir, data_dir, mem_root, tmp_path):
    """The form's `export` (run --export): the folder `runs export` writes, after the plan; refused before it."""
    from safetensors.torch import load_file

    from tierprune.flows.progressive import progressive, progressive_from_config
    from tierprune.tasks.export import export_run

    flags = dict(plan=PLAN, store=mem_root, model=str(tiny_llama_dir), calib=f"c4:{data_dir}/c4-subset",
                 calib_samples=4, calib_seqlen=32, eval=f"wikitext2:{data_dir}/wikitext-2-raw", eval_seqlen=32,
                 eval_max_windows=2, ft_method="none")
    cfg = config_from_flags(**flags, run="exported")
    rows = progressive_from_config(cfg, export=str(tmp_path / "auto"))
    store = RunStore(mem_root, "exported")
    before = _markers(store)
    export_run(store, str(tmp_path / "by-hand"))
    for name in ("model.safetensors", "tier_maps.parquet", "masks.safetensors"):
        assert (tmp_path / "auto" / name).read_bytes() == (tmp_path / "by-hand" / name).read_bytes(), name
    weights, _ = _checkpoint_tensors(store, rows[-1]["iteration"])
    assert torch.equal(load_file(tmp_path / "auto" / "model.safetensors")["model.layers.1.mlp.up_proj.weight"],
                       weights["model.layers.1.mlp.up_proj.weight"])
    # The same run again with another export folder: nothing is recomputed, the export is written; {run} in
    # the path is the run's name (what gives each night of a scheduled deployment its own folder).
    progressive(**flags, run="exported", export=str(tmp_path / "again-{run}"))
    assert _markers(store) == before and (tmp_path / "again-exported" / "model.safetensors").is_file()

    flags["run"] = "refused"
    original = (tiny_llama_dir / "model.safetensors").read_bytes()
    with pytest.raises(TierpruneError, match=r"^export .* is the folder --model .* is loaded from"):
        progressive(**flags, export=str(tiny_llama_dir))
    with pytest.raises(TierpruneError, match=r"^export .*/\{date\}: unknown field\(s\) date; use \{run\}"):
        progressive(**flags, export=str(tmp_path / "{date}"))
    assert (tiny_llama_dir / "model.safetensors").read_bytes() == original
    assert not RunStore(mem_root, "refused").exists()  # refused before the run began


def test_fading_demotions_end_every_iteration_on_exactly_its_tier_map(prefect_harness, tiny_llama_dir, data_dir,
                                                                      mem_root):
    """--ft-fade 1: the demoted weights are still in the model until the last step; the checkpoints obey the masks."""
    from tierprune.flows.progressive import progressive_from_config as progressive

    rows = progressive(_config(tiny_llama_dir, data_dir, mem_root, "fade", ft_fade=1.0))
    plain = progressive(_config(tiny_llama_dir, data_dir, mem_root, "plain"))
    assert [r["ppl before ft"] for r in rows[1:2]] == [r["ppl before ft"] for r in plain[1:2]]  # measured demoted
    store = RunStore(mem_root, "fade")
    for k in (1, 2, 3):
        weights, masks = _checkpoint_tensors(store, k)
        assert all(int((weights[f"{m}.weight"][~keep] != 0).sum()) == 0 for m, keep in masks.items()), k
    faded, _ = _checkpoint_tensors(store, 1)
    removed_at_once, _ = _checkpoint_tensors(RunStore(mem_root, "plain"), 1)
    assert any(not torch.equal(faded[n], removed_at_once[n]) for n in faded)  # it trained otherwise


def test_obs_update_compensates_every_demotion_and_keeps_the_tier_maps(prefect_harness, tiny_llama_dir, data_dir,
                                                                       mem_root, monkeypatch):
    """--obs-update: the same demotions as without it, other kept weights, masks exact; a rerun recomputes nothing."""
    from tierprune.flows.progressive import progressive_from_config as progressive
    from tierprune.tasks import calibration

    draws = []
    real_draw = calibration.sample_calibration
    monkeypatch.setattr(calibration, "sample_calibration", lambda *a, **k: draws.append(1) or real_draw(*a, **k))
    for run, extra in (("plain-none", {}), ("obs-none", {"obs_update": True}), ("obs-full", {"obs_update": True})):
        progressive(_config(tiny_llama_dir, data_dir, mem_root, run, ft_method=run.split("-")[1], **extra))
    # Three iterations each calibrate (and twice OBS-update) on one draw per run, not one draw per use.
    assert len(draws) == 3
    plain = RunStore(mem_root, "plain-none")
    for method in ("none", "full"):
        obs = RunStore(mem_root, f"obs-{method}")
        assert _final(obs, 1)["tiers"] == _final(plain, 1)["tiers"]  # iteration 1 scores the same dense model
        assert _final(obs, 1)["checkpoint"] != _final(plain, 1)["checkpoint"]
        for k in (1, 2, 3):
            weights, masks = _checkpoint_tensors(obs, k)
            assert all(int((weights[f"{m}.weight"][~keep] != 0).sum()) == 0 for m, keep in masks.items()), k
        checkpoint_step = next(r for r in obs.committed_steps() if r.startswith("iter-001/checkpoint-"))
        assert json.loads(obs._cat(f"{checkpoint_step}/COMMIT.json"))["meta"]["obs_update"] is True
    before = _markers(RunStore(mem_root, "obs-full"))
    progressive(_config(tiny_llama_dir, data_dir, mem_root, "obs-full", ft_method="full", obs_update=True))
    assert _markers(RunStore(mem_root, "obs-full")) == before


def _step_meta(store: RunStore, iteration: int, step: str) -> tuple[str, dict]:
    rel = next(r for r in store.committed_steps() if r.startswith(f"iter-{iteration:03d}/{step}-"))
    return rel, json.loads(store._cat(f"{rel}/COMMIT.json"))


def test_fisher_saliency_ranks_by_the_previous_iterations_gradients(prefect_harness, tiny_llama_dir, data_dir,
                                                                    mem_root):
    """--saliency fisher: iteration 1 ranks the dense model by Wanda; each fine-tuning stores F beside its
    checkpoint, and the next iteration's scores and masks are |W|·sqrt(F); masks exact; resume and rerun hold."""
    from tierprune.flows.progressive import progressive_from_config as progressive
    from tierprune.kernels.scores import block_mean, fisher_scores
    from tierprune.tasks.score_blocks import FISHER_FILE

    progressive(_config(tiny_llama_dir, data_dir, mem_root, "wanda", scope="global"))
    progressive(_config(tiny_llama_dir, data_dir, mem_root, "fisher", scope="global", saliency="fisher"))
    wanda, fisher = RunStore(mem_root, "wanda"), RunStore(mem_root, "fisher")
    assert _final(fisher, 1) == _final(wanda, 1)  # the dense model has no gradients to rank by: Wanda, same training
    assert [_step_meta(fisher, k, "scores")[1]["meta"]["saliency"] for k in (1, 2, 3)] == ["wanda", "fisher", "fisher"]
    assert _final(fisher, 3)["masks"] != _final(wanda, 3)["masks"]

    rel, _ = _step_meta(fisher, 1, "checkpoint")
    F = fisher.read_object(f"{fisher.uri}/{rel}", FISHER_FILE)
    weights, masks = _checkpoint_tensors(fisher, 1)
    assert set(F) == set(masks)
    for name, keep in masks.items():
        assert F[name].shape == keep.shape and (F[name][~keep] == 0).all() and (F[name][keep] > 0).any()
    # Iteration 2's phase-1 score of every block: the block mean of |W|·sqrt(F) of iteration 1's model.
    scores_rel, _ = _step_meta(fisher, 2, "scores")
    scores = fisher.read_object(f"{fisher.uri}/{scores_rel}", "scores.parquet")
    name = next(iter(masks))
    expected = block_mean(fisher_scores(weights[f"{name}.weight"].float(), F[name]), 16).flatten()
    got = torch.tensor(scores[scores.module == name].score.to_numpy())
    torch.testing.assert_close(got, expected)
    for k in (1, 2, 3):
        weights, masks = _checkpoint_tensors(fisher, k)
        assert all(int((weights[f"{m}.weight"][~keep] != 0).sum()) == 0 for m, keep in masks.items()), k

    before = _markers(fisher)
    progressive(_config(tiny_llama_dir, data_dir, mem_root, "fisher", scope="global", saliency="fisher"))
    assert _markers(fisher) == before  # a rerun recomputes nothing
    # A run resumed after iteration 1 ranks iteration 2 by the same gradients, so it ends where the original did.
    progressive(_config(tiny_llama_dir, data_dir, mem_root, "fisher-resumed", scope="global", saliency="fisher",
                        resume_from=f"{fisher.uri}/iter-001"))
    resumed = RunStore(mem_root, "fisher-resumed")
    assert _step_meta(resumed, 2, "scores")[1]["meta"]["saliency"] == "fisher"
    assert _final(resumed, 3) == _final(fisher, 3)


def test_offload_streams_calibration_and_evaluation_to_the_same_result(prefect_harness, tiny_llama_dir, data_dir,
                                                                        mem_root, monkeypatch):
    from tierprune.flows.progressive import progressive_from_config as progressive
    from tierprune.tasks import placement

    plain = progressive(_config(tiny_llama_dir, data_dir, mem_root, "plain", ft_method="none"))
    # A device that holds no decoder layer: evaluation streams every layer through it (CPU here).
    monkeypatch.setattr(placement, "device_budget", lambda device: 0)
    offloaded = progressive(_config(tiny_llama_dir, data_dir, mem_root, "offloaded", ft_method="none", offload=True))
    assert [r["ppl"] for r in offloaded] == [r["ppl"] for r in plain]
    assert all(r["ppl"] for r in plain)
    a, b = RunStore(mem_root, "plain"), RunStore(mem_root, "offloaded")
    for k in (1, 2, 3):
        assert _final(a, k)["tiers"] == _final(b, k)["tiers"], k
        assert _final(a, k)["checkpoint"] == _final(b, k)["checkpoint"], k


def test_offload_refuses_fine_tuning(tiny_llama_dir, data_dir, mem_root):
    from tierprune.tasks.run_state import check_run_inputs

    with pytest.raises(TierpruneError, match="--offload .* --ft-method none"):
        check_run_inputs(_config(tiny_llama_dir, data_dir, mem_root, "r", offload=True))


def test_cached_teacher_logits_train_without_the_teacher_beside_the_student(prefect_harness, tiny_llama_dir, data_dir,
                                                                            mem_root, monkeypatch):
    from tierprune.flows.progressive import progressive_from_config as progressive
    from tierprune.tasks import finetune
    from tierprune.tasks.training import TeacherTopK

    seen = []
    real = finetune.finetune_model_

    def spy(model, masks, train_ids, cfg, *, teacher=None, **kw):
        seen.append((type(teacher), tuple(teacher.values.shape), teacher.values.dtype))
        return real(model, masks, train_ids, cfg, teacher=teacher, **kw)

    monkeypatch.setattr(finetune, "finetune_model_", spy)
    rows = progressive(_config(tiny_llama_dir, data_dir, mem_root, "cached", kd_cache_topk=8))
    # Every iteration trained against 8 stored logits per position of its 8 windows of 32 tokens.
    assert seen == [(TeacherTopK, (8, 32, 8), torch.bfloat16)] * 3
    assert all(r["ft tokens"] == 256 for r in rows[1:])
    store = RunStore(mem_root, "cached")
    steps = store.committed_steps()
    assert not [rel for rel in steps if "/teacher-" in rel]  # scratch, dropped once each checkpoint is in
    for k in (1, 2, 3):
        weights, masks = _checkpoint_tensors(store, k)
        assert all(int((weights[f"{m}.weight"][~keep] != 0).sum()) == 0 for m, keep in masks.items())


def test_prune_deletes_old_checkpoints_and_the_last_iteration_still_exports_resumes_and_goes_on(
        prefect_harness, tiny_llama_dir, data_dir, mem_root, monkeypatch):
    from fsspec.core import url_to_fs

    from tierprune.flows.progressive import progressive_from_config as progressive
    from tierprune.tasks.export import load_iteration
    from tierprune.tasks.run_state import find_iteration
    from tierprune.tasks.runs import prune_checkpoints, run_summary

    cfg = _config(tiny_llama_dir, data_dir, mem_root, "pruned")
    rows = progressive(cfg)
    store = RunStore(mem_root, "pruned")
    fs, blobs_dir = url_to_fs(f"{store.uri}/blobs")

    def blobs_on_disk() -> set[str]:
        fs.invalidate_cache(blobs_dir)
        return {path.rsplit("/", 1)[1].removesuffix(".safetensors") for path in fs.find(blobs_dir)}

    final, before, on_disk = _final(store, 3), run_summary(store), blobs_on_disk()
    unfinished = store.step_uri(4, "activations", "a1")  # as if a longer plan had been killed in iteration 4
    store.commit_step(unfinished, {"stats.json": {"x": 1}})
    with pytest.raises(TierpruneError, match="has iteration 4 in progress; finish it"):
        prune_checkpoints(store, keep_last=1)
    store.drop_step(unfinished)
    dry = prune_checkpoints(store, keep_last=1, dry_run=True)
    assert (dry["pruned"], dry["kept"]) == ([0, 1, 2], [3]) and dry["blobs"] > 0 and dry["bytes"] > 0
    assert store.pruned() is None and blobs_on_disk() == on_disk  # a dry run deletes nothing

    done = prune_checkpoints(store, keep_last=1)
    assert (done["pruned"], done["steps"], done["blobs"], done["bytes"]) == (
        dry["pruned"], dry["steps"], dry["blobs"], dry["bytes"])
    assert blobs_on_disk() == set(store.referenced_blobs()) and len(blobs_on_disk()) == len(on_disk) - done["blobs"]
    assert all(s.status == "committed" for s in store.verify(deep=True))  # nothing still referred to went
    assert _final(store, 3) == final
    after = run_summary(store)
    assert [r["iteration"] for r in after] == [0, 1, 2, 3]
    assert all("checkpoint pruned" in r["status"] for r in after[:3]) and after[3]["status"] == "ok"
    shown = ("ppl", "sparsity", "tiers", "finetune_tokens", "ppl_before_finetune", "seconds")
    assert [{k: r[k] for k in shown} for r in after] == [{k: r[k] for k in shown} for r in before]

    assert load_iteration(store, 3).row["iteration"] == 3
    with pytest.raises(TierpruneError, match=r"iteration 1 .* deleted by `tierprune runs prune` or "
                       r"--keep-checkpoints \(kept: iterations 3\)"):
        load_iteration(store, 1)
    assert find_iteration(f"{store.uri}/iter-003")[1] == 3
    with pytest.raises(TierpruneError, match="deleted by `tierprune runs prune`"):
        find_iteration(f"{store.uri}/iter-002")
    # Run again, the run goes on after its last finished iteration (3, the plan's last), not from iteration 0: the
    # pruned iterations are not fine-tuned again, nothing is written, and the table is the first run's.
    markers = _markers(store)
    assert progressive(cfg) == rows
    assert _markers(store) == markers
    again = prune_checkpoints(store, keep_last=1)
    assert (again["steps"], again["blobs"]) == ([], 0)
    with pytest.raises(TierpruneError, match="--keep-last must be at least 1"):
        prune_checkpoints(store, keep_last=0)

    # --keep-checkpoints 1 does the same as the run goes; a run killed after a prune goes on from its last finished
    # iteration (iteration 0's checkpoint is gone by then) to the same result as the run that kept everything.
    from tierprune.tasks import refs

    cfg = _config(tiny_llama_dir, data_dir, mem_root, "kept", keep_checkpoints=1)
    store = RunStore(mem_root, "kept")

    class Killed(Exception):
        pass

    def crash_at(name: str) -> None:  # the flow dies where iteration 2's fine-tuning would start
        if name == "step:iter-002/checkpoint:start":
            raise Killed(name)

    monkeypatch.setattr(refs, "crash_point", crash_at)
    with pytest.raises(Killed):
        progressive(cfg)
    pruned = store.pruned()
    assert (pruned["iterations"], pruned["kept"]) == ([0], [1])  # deleted once iteration 1 had finished
    iteration_2 = {rel: marker for rel, marker in _markers(store).items() if rel.startswith("iter-002/")}
    assert len(iteration_2) == 3  # activations, scores, tiers: committed before the crash
    monkeypatch.setattr(refs, "crash_point", lambda name: None)
    untimed = [{k: v for k, v in row.items() if k != "seconds"} for row in progressive(cfg)]
    assert untimed == [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
    assert {rel: _markers(store)[rel] for rel in iteration_2} == iteration_2  # found committed, not recomputed
    assert _final(store, 3) == final  # the same tier maps, masks and weights
    pruned = store.pruned()
    assert (pruned["iterations"], pruned["kept"]) == ([0, 1, 2], [3])
    assert all(s.status == "committed" for s in store.verify(deep=True))
    checkpoints = [rel for rel in store.committed_steps() if "/checkpoint-" in rel or "/start-" in rel]
    assert [rel.split("/")[0] for rel in checkpoints] == ["iter-003"]
    assert set(store.referenced_blobs()) == set(RunStore(mem_root, "pruned").referenced_blobs())
    # The last finished iteration's checkpoint lost too: nothing to go on from, said in one line, nothing written.
    record = json.loads(store.read(store.steps_of(3, "iteration")[0], "iteration.json"))
    store.drop_step(f"{store.uri}/{record['checkpoint']['rel']}")
    markers = _markers(store)
    with pytest.raises(TierpruneError, match=r"iteration 3's checkpoint at .* is missing or damaged, and the "
                                             r"checkpoints before it were deleted, so the run cannot go on"):
        progressive(cfg)
    assert _markers(store) == markers
