"""`tierprune convert`: a run, an export folder or a pruned model folder without tier maps packed into
HybridLinear layers, the same logits, loads back packed and dense (plain transformers), refuses weights that
break their tier map without writing anything."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tierprune.errors import TierpruneError
from tierprune.hybrid_linear import HybridLinear
from tierprune.storage.tables import save_file
from tierprune.tasks.convert import convert, load_dense, load_hybrid
from tierprune.tasks.prune import named_linears
from tierprune.tasks.tier_tables import tier_table

from ..conftest import make_tiny_llama, make_tiny_tokenizer
from ..test_hybrid_linear import prune_randomly_

TEXTS = ["the quick brown fox jumps over the lazy dog", "pack the blocks, keep the logits"] * 4


def _export_folder(folder: Path, model: nn.Module, tier_maps: dict[str, torch.Tensor]) -> Path:
    """What `tierprune runs export` writes: model, tokenizer, tier_maps.parquet."""
    model.save_pretrained(folder)
    make_tiny_tokenizer(TEXTS).save_pretrained(folder)
    save_file(tier_table(tier_maps), f"{folder}/tier_maps.parquet")
    return folder


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture
def pruned_llama_folder(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    # intermediate 120: the MLP has edge blocks (120 = 7.5 blocks of 16) on both of its dims
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(intermediate=120, dtype=torch.bfloat16)
    tier_maps = prune_randomly_(model, seed=3)
    folder = _export_folder(tmp_path / "export", model, tier_maps)
    # The reference is the export as plain transformers loads it: a model cast with .to(bf16) in memory also
    # casts its rotary frequencies, which a loaded one keeps in fp32.
    return folder, _logits(AutoModelForCausalLM.from_pretrained(folder).eval(), _ids())


def test_export_folder_converts_with_the_same_logits_and_loads_back(tmp_path, pruned_llama_folder) -> None:
    folder, expected = pruned_llama_folder
    out = tmp_path / "hybrid"
    done = convert(str(folder), str(out))
    assert done["modules"] == 14 and done["block_size"] == 16 and done["topk"] == 10 and done["dtype"] == "bfloat16"
    assert 0.4 < done["packed_bytes"] / done["dense_bytes"] < 0.85
    assert {p.name for p in out.iterdir()} >= {"config.json", "hybrid.safetensors", "hybrid.json", "tokenizer.json"}
    assert not (out / "model.safetensors").exists()  # no dense copy unless asked for
    layout = json.loads((out / "hybrid.json").read_text())
    assert layout["format"] == "tierprune-hybrid/1" and len(layout["modules"]) == 14
    assert layout["modules"]["model.layers.0.mlp.down_proj"]["shape"] == [64, 120]
    # The packed tensors are smaller than the dense model's by the linears' saving (the file adds one JSON
    # header entry per buffer, 13 per linear, which a tiny model notices).
    from safetensors.torch import load_file

    dense_tensor_bytes = sum(t.numel() * t.element_size() for t in load_file(folder / "model.safetensors").values())
    layouts = 14 * 5 * 8  # each HybridLinear's hybrid_layout: 5 int64
    assert done["model_file_bytes"] == dense_tensor_bytes - done["dense_bytes"] + done["packed_bytes"] + layouts
    assert (out / "hybrid.safetensors").stat().st_size < (folder / "model.safetensors").stat().st_size

    hybrid = load_hybrid(str(out))
    packed = [n for n, m in hybrid.named_modules() if isinstance(m, HybridLinear)]
    assert len(packed) == 14
    torch.testing.assert_close(_logits(hybrid, _ids()), expected, rtol=0, atol=0)
    assert hybrid.lm_head.weight.data_ptr() == hybrid.model.embed_tokens.weight.data_ptr()  # still tied

    plain = load_dense(str(out))
    assert all(isinstance(m, nn.Linear) for m in named_linears(plain).values())
    torch.testing.assert_close(_logits(plain, _ids()), expected, rtol=0, atol=0)
    with pytest.raises(OSError):  # without --dense, plain transformers says so instead of loading random weights
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out)


def test_dense_copy_loads_in_plain_transformers(tmp_path, pruned_llama_folder) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, expected = pruned_llama_folder
    out = tmp_path / "hybrid"
    convert(str(folder), str(out), dense=True)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.dtype == torch.bfloat16
    assert all(isinstance(m, nn.Linear) for m in named_linears(plain).values())
    torch.testing.assert_close(_logits(plain, _ids()), expected, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out)("the fox").input_ids
    torch.testing.assert_close(_logits(load_hybrid(str(out)), _ids()), expected, rtol=0, atol=0)


def test_dtype_packs_the_weights_cast_with_the_same_tier_maps(tmp_path) -> None:
    """A CPU run's fp32 export packed in bf16: half the value bytes, every zero kept, packed = dense twin."""
    model = make_tiny_llama(intermediate=120)  # fp32
    folder = _export_folder(tmp_path / "export", model, prune_randomly_(model, seed=6))
    stored = convert(str(folder), str(tmp_path / "fp32"))
    cast = convert(str(folder), str(tmp_path / "bf16"), dtype="bfloat16")
    assert stored["dtype"] == "float32" and cast["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "bf16" / "hybrid.json").read_text())["dtype"] == "bfloat16"
    assert cast["dense_bytes"] * 2 == stored["dense_bytes"]
    assert cast["packed_bytes"] < 0.6 * stored["packed_bytes"]  # values halve, the indices stay
    blocks = lambda out: {n: m["blocks"] for n, m in json.loads((out / "hybrid.json").read_text())["modules"].items()}
    assert blocks(tmp_path / "bf16") == blocks(tmp_path / "fp32")
    hybrid = load_hybrid(str(tmp_path / "bf16"))
    assert next(hybrid.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(_logits(hybrid, _ids()), _logits(load_dense(str(tmp_path / "bf16")), _ids()),
                               rtol=0, atol=0)
    with pytest.raises(TierpruneError, match="--dtype half: use stored, bfloat16, float16 or float32"):
        convert(str(folder), str(tmp_path / "bad"), dtype="half")
    assert not (tmp_path / "bad").exists()


def test_gpt2_conv1d_folder(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_inner=128, n_layer=2, n_head=4, vocab_size=128,
                                       n_positions=64)).eval()
    tier_maps = prune_randomly_(model, seed=4)
    expected = _logits(model, _ids())
    out = tmp_path / "hybrid"
    done = convert(str(_export_folder(tmp_path / "export", model, tier_maps)), str(out))
    assert done["modules"] == 8 and all(m["transposed"] for m in json.loads((out / "hybrid.json").read_text())
                                        ["modules"].values())
    hybrid = load_hybrid(str(out))
    assert hybrid.transformer.h[0].attn.c_attn.transposed
    torch.testing.assert_close(_logits(hybrid, _ids()), expected, rtol=1e-5, atol=1e-5)
    plain = load_dense(str(out))
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # (in, out) again
    torch.testing.assert_close(_logits(plain, _ids()), expected, rtol=1e-5, atol=1e-5)


def _break_2_4(folder: Path, name: str) -> None:
    """Fill a whole weight with non-zeros: every 2:4 and TopK block of its tier map is broken."""
    from safetensors.torch import load_file, save_file as save_tensors

    state = load_file(folder / "model.safetensors")
    state[f"{name}.weight"] = torch.ones_like(state[f"{name}.weight"])
    save_tensors(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_refuses_weights_that_break_their_tier_map_and_writes_nothing(tmp_path, pruned_llama_folder) -> None:
    folder, _ = pruned_llama_folder
    _break_2_4(folder, "model.layers.1.self_attn.o_proj")
    out = tmp_path / "hybrid"
    with pytest.raises(TierpruneError, match="model.layers.1.self_attn.o_proj does not obey its tier map"):
        convert(str(folder), str(out))
    assert not out.exists()


def test_output_holding_another_models_dense_weights_is_refused_unless_dense_rewrites_them(
        tmp_path, pruned_llama_folder) -> None:
    """A packed folder written over an export would keep the export's model.safetensors, which plain
    transformers loads instead of the new model: refused, nothing written; --dense rewrites them."""
    from transformers import AutoModelForCausalLM

    folder, expected = pruned_llama_folder
    another = make_tiny_llama(seed=5, intermediate=120, dtype=torch.bfloat16)
    other = _export_folder(tmp_path / "other", another, prune_randomly_(another, seed=4))
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.raises(TierpruneError, match=r"^--output .*other holds dense weights \(model.safetensors\) that a "
                                             r"packed model would not replace.*or add --dense to rewrite them$"):
        convert(str(folder), str(other))
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    convert(str(folder), str(other), dense=True)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(other).eval(), _ids()), expected,
                               rtol=0, atol=0)
    torch.testing.assert_close(_logits(load_hybrid(str(other)), _ids()), expected, rtol=0, atol=0)
    convert(str(folder), str(tmp_path / "packed"))
    convert(str(folder), str(tmp_path / "packed"))  # a packed folder rewritten by the same kind: fine


def test_refuses_what_is_neither_a_run_nor_an_export(tmp_path, pruned_llama_folder) -> None:
    folder, _ = pruned_llama_folder
    with pytest.raises(TierpruneError, match="neither a run"):
        convert(str(tmp_path / "nothing"), str(tmp_path / "out"))
    with pytest.raises(TierpruneError, match="--iteration applies to a run"):
        convert(str(folder), str(tmp_path / "out"), iteration=1)
    with pytest.raises(TierpruneError, match="not a converted model folder"):
        load_hybrid(str(folder))
    assert not (tmp_path / "out").exists()


def test_topk_of_an_export_folder_is_inferred_or_checked(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from tierprune.adapters import weight_view
    from tierprune.kernels.tiers import TOPK

    model = make_tiny_llama(dtype=torch.bfloat16)
    tier_maps = prune_randomly_(model, seed=5)
    name, tier_map = next((n, m) for n, m in tier_maps.items() if (m == TOPK).any())
    r, c = (tier_map == TOPK).nonzero()[0].tolist()
    block = weight_view(model.get_submodule(name))[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16]
    assert int((block != 0).sum()) == 10
    with torch.no_grad():
        block[block == 0] = 0.5  # the whole block non-zero: 256 entries in a TopK block
    folder = _export_folder(tmp_path / "export", model, tier_maps)
    with pytest.raises(TierpruneError, match=rf"{name} does not obey its tier map \(0 2:4 groups, 1 TopK blocks over 10"):
        convert(str(folder), str(tmp_path / "k10"), topk=10)
    assert not (tmp_path / "k10").exists()
    done = convert(str(folder), str(tmp_path / "inferred"))  # the most non-zeros of any TopK block: lossless
    assert done["topk"] == 256
    expected = _logits(AutoModelForCausalLM.from_pretrained(folder).eval(), _ids())
    torch.testing.assert_close(_logits(load_hybrid(str(tmp_path / "inferred")), _ids()), expected, rtol=0, atol=0)


def _pruned_folder(folder: Path, model: nn.Module) -> Path:
    """What `prune --pattern 2:4|block --output` writes: a model and its tokenizer, no tier maps."""
    model.save_pretrained(folder)
    make_tiny_tokenizer(TEXTS).save_pretrained(folder)
    return folder


def _prune_2_4_and_blocks_(model: nn.Module) -> None:
    """2:4 by |w| in the attention, every other 16x16 block zeroed in the MLP (edge blocks included)."""
    from tierprune.adapters import weight_view
    from tierprune.kernels.masks import expand_blocks, nm_mask

    with torch.no_grad():
        for name, module in named_linears(model).items():
            W = weight_view(module)
            if ".self_attn." in name:
                W.mul_(nm_mask(W.abs().float(), 2, 4))
            else:
                nbr, nbc = -(-W.shape[0] // 16), -(-W.shape[1] // 16)
                keep = (torch.arange(nbr * nbc) % 2 == 0).view(nbr, nbc)
                W.mul_(expand_blocks(keep, tuple(W.shape), 16))


def test_a_folder_without_tier_maps_converts_with_tiers_from_its_zeros(tmp_path) -> None:
    """`prune --pattern 2:4` or `block` writes no tier maps: each block gets the cheapest tier that holds it."""
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(intermediate=120, dtype=torch.bfloat16)
    _prune_2_4_and_blocks_(model)
    folder = _pruned_folder(tmp_path / "pruned", model)
    expected = _logits(AutoModelForCausalLM.from_pretrained(folder).eval(), _ids())
    done = convert(str(folder), str(tmp_path / "hybrid"))
    assert done["tiers_from"] == "zeros" and done["topk"] == 10 and done["block_size"] == 16
    layout = json.loads((tmp_path / "hybrid" / "hybrid.json").read_text())
    assert layout["tiers_from"] == "zeros"
    modules = layout["modules"]
    q, up = modules["model.layers.0.self_attn.q_proj"]["blocks"], modules["model.layers.0.mlp.up_proj"]["blocks"]
    assert q == [0, 16, 0]  # 64x64: 2:4 everywhere
    assert up == [16, 0, 16]  # 120x64 (8x4 blocks): the kept half Dense, the zeroed half TopK
    totals = torch.tensor([m["blocks"] for m in modules.values()]).sum(0)
    assert done["tiers"] == pytest.approx((totals / totals.sum()).tolist(), abs=1e-4) and done["tiers"][0] < 0.5
    assert done["packed_bytes"] < 0.6 * done["dense_bytes"]
    torch.testing.assert_close(_logits(load_hybrid(str(tmp_path / "hybrid")), _ids()), expected, rtol=0, atol=0)
    with pytest.raises(TierpruneError, match="already a packed model folder"):
        convert(str(tmp_path / "hybrid"), str(tmp_path / "again"))
    with pytest.raises(TierpruneError, match="--iteration applies to a run"):
        convert(str(folder), str(tmp_path / "again"), iteration=1)
    for topk in (-1, 257):
        with pytest.raises(TierpruneError, match=rf"^--topk {topk}: weights kept per TopK block, 0..256$"):
            convert(str(folder), str(tmp_path / "again"), topk=topk)
    assert not (tmp_path / "again").exists()


def test_a_packed_folder_is_a_model_that_prune_and_evaluation_take(tmp_path, pruned_llama_folder) -> None:
    """`prune --model PACKED --method none` evaluates a converted model: it loads as its dense twin (the same
    logits, plain nn.Linear for calibration and pruning) and reports the tiers it was packed in."""
    from tierprune.config import config_from_flags
    from tierprune.models import is_packed_folder, load_model
    from tierprune.tasks.oneshot import run_oneshot

    folder, expected = pruned_llama_folder
    out = tmp_path / "hybrid"
    done = convert(str(folder), str(out))
    assert is_packed_folder(str(out)) and not is_packed_folder(str(folder))
    loaded = load_model(str(out), dtype="bfloat16")
    assert all(isinstance(m, nn.Linear) for m in named_linears(loaded.model).values())
    torch.testing.assert_close(_logits(loaded.model, _ids()), expected, rtol=0, atol=0)
    assert loaded.tokenizer("the fox").input_ids

    record = run_oneshot(config_from_flags(model=str(out), method="none", eval="none", dtype="bfloat16"))
    assert record["tiers"] == pytest.approx(dict(zip(("dense", "2:4", "topk"), done["tiers"])), abs=1e-4)
    assert record["tiers"]["topk"] > 0 and record["sparsity"] > 0.3
    # With --dense the folder holds plain weights too; those load (and say the same).
    convert(str(folder), str(tmp_path / "both"), dense=True)
    assert not is_packed_folder(str(tmp_path / "both"))
    torch.testing.assert_close(_logits(load_model(str(tmp_path / "both"), dtype="bfloat16").model, _ids()),
                               expected, rtol=0, atol=0)


def test_an_unpruned_folder_has_nothing_to_pack_and_nothing_is_written(tmp_path) -> None:
    model = make_tiny_llama(dtype=torch.bfloat16)
    folder = _pruned_folder(tmp_path / "dense", model)
    with pytest.raises(TierpruneError, match=r"no tier_maps.parquet, and none of its 16x16 weight blocks is 2:4 or "
                                             r"has at most 10 non-zeros: nothing to pack"):
        convert(str(folder), str(tmp_path / "out"))
    # One 2:4 block in the whole model (as unstructured sparsity leaves a few): the block indices of every
    # matrix cost more than it saves, so the packed model would be larger.
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:16, :16].view(16, 4, 4)[..., :2] = 0
    folder = _pruned_folder(tmp_path / "almost-dense", model)
    with pytest.raises(TierpruneError, match=r"would not make it smaller \(1\.0\d\dx the dense bytes\): its zeros "
                                             r"leave 99\.\d\d% of the 16x16 blocks dense \(2:4 0\.\d\d%"):
        convert(str(folder), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_model_name_is_loaded_as_model_takes_it(tmp_path, monkeypatch) -> None:
    """What --model takes works as a source too (a hub id of a 2:4 checkpoint, say); the dense SmolLM2 behind
    the alias has nothing to pack, and a hub id without the hub is one line."""
    with pytest.raises(TierpruneError, match=r"^smollm2-135m has no tier_maps.parquet, .* nothing to pack"):
        convert("smollm2-135m", str(tmp_path / "out"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TierpruneError, match=r"^someorg/a-2of4-model is neither a run, a model folder, nor a model "
                                             r"that --model loads: cannot load model"):
        convert("someorg/a-2of4-model", str(tmp_path / "out"))
    with pytest.raises(TierpruneError, match=r"neither a run \(STORE/RUN with a manifest.json\) nor a model folder"):
        convert(str(tmp_path / "runs" / "typo"), str(tmp_path / "out"))  # a path: not looked up on the hub
    assert not (tmp_path / "out").exists()


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERPRUNE_", "PREFECT_"))}
    env.update(COLUMNS="200", NO_COLOR="1", HF_HUB_OFFLINE="1", TIERPRUNE_CACHE=str(cwd / "cache"),
               PREFECT_HOME=str(cwd / "prefect"))
    return subprocess.run([sys.executable, "-m", "tierprune.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_cli_prints_the_bytes_and_refuses_in_one_line(tmp_path, pruned_llama_folder) -> None:
    folder, _ = pruned_llama_folder
    proc = _cli(["convert", str(folder), "--output", "out"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    layout = json.loads((tmp_path / "out" / "hybrid.json").read_text())
    mib = 2 ** 20
    assert (f"packed {layout['packed_linear_bytes'] / mib:.2f} MiB vs dense "
            f"{layout['dense_linear_bytes'] / mib:.2f} MiB") in proc.stdout, proc.stdout
    assert "converted 14 linears" in proc.stdout
    assert "next:\n  tierprune generate out --compare-dense\n  tierprune evaluate out\n" in proc.stdout
    assert "no tier maps" not in proc.stdout  # an export's tier maps are used, not inferred
    # What was packed evaluates as it is, with the tiers it was packed in.
    proc = _cli(["evaluate", "out", "--eval", "none", "--json", "out.json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "out.json").read_text())
    counts = torch.tensor([m["blocks"] for m in layout["modules"].values()]).sum(0)
    assert [record["tiers"][t] for t in ("dense", "2:4", "topk")] == pytest.approx((counts / counts.sum()).tolist())
    assert record["method"] == "none" and "none: evaluated as it is" in proc.stdout, proc.stdout

    model = make_tiny_llama(intermediate=120, dtype=torch.bfloat16)
    _prune_2_4_and_blocks_(model)
    _pruned_folder(tmp_path / "two-four", model)
    proc = _cli(["convert", "two-four", "--output", "inferred"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("two-four has no tier maps: each 16x16 block gets the cheapest tier that holds its zeros (dense "
            in proc.stdout), proc.stdout

    _break_2_4(folder, "model.layers.0.mlp.up_proj")
    proc = _cli(["convert", str(folder), "--output", "bad"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: model.layers.0.mlp.up_proj does not obey its tier map")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_a_run_converts_like_its_export(prefect_harness, tiny_llama_dir, data_dir, mem_root, tmp_path) -> None:
    """STORE/RUN: the last (or a chosen) iteration, read from the store as `runs export` reads it."""
    from transformers import AutoModelForCausalLM

    from tierprune.config import config_from_flags
    from tierprune.flows.progressive import progressive_from_config as progressive
    from tierprune.storage.runstore import RunStore
    from tierprune.tasks.export import export_run

    plan = tmp_path / "plan.csv"  # 80/20/0, then 35/45/20; no fine-tuning (epochs 0)
    plan.write_text("iteration,dense,mid_2_4,topk,dense_to_2_4,mid_2_4_to_topk,epochs\n"
                    "1,0.8,0.2,0.0,0.2,0.0,0\n2,0.35,0.45,0.2,0.45,0.2,0\n")
    cfg = config_from_flags(model=str(tiny_llama_dir), calib=f"c4:{data_dir}/c4-subset", calib_samples=4,
                            calib_seqlen=32, calib_batch_size=2, eval="none", plan=str(plan), store=mem_root,
                            run="r")
    progressive(cfg)
    run = f"{mem_root}/r"
    export_run(RunStore(mem_root, "r"), str(tmp_path / "export"))
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval(), ids)

    done = convert(run, str(tmp_path / "last"))
    assert done["iteration"] == 2 and done["topk"] == 10 and done["modules"] == 14
    torch.testing.assert_close(_logits(load_hybrid(str(tmp_path / "last")), ids), expected, rtol=0, atol=0)
    blocks = [m["blocks"] for m in json.loads((tmp_path / "last" / "hybrid.json").read_text())["modules"].values()]
    assert sum(b[2] for b in blocks) > 0  # iteration 2 has TopK blocks

    first = convert(run, str(tmp_path / "first"), iteration=1)
    assert first["iteration"] == 1 and first["packed_bytes"] > done["packed_bytes"]
    blocks = [m["blocks"] for m in json.loads((tmp_path / "first" / "hybrid.json").read_text())["modules"].values()]
    assert sum(b[2] for b in blocks) == 0  # 80/20/0: no TopK blocks yet
    with pytest.raises(TierpruneError, match="no finished iteration 9"):
        convert(run, str(tmp_path / "nine"), iteration=9)
    with pytest.raises(TierpruneError, match="--topk 12: run .* was pruned with topk 10"):
        convert(run, str(tmp_path / "k12"), topk=12)
    assert not (tmp_path / "nine").exists() and not (tmp_path / "k12").exists()
