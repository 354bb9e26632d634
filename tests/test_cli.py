"""The command line, run as a subprocess: bad input ends in one line and exit 2; a good run saves what it says.

Every subprocess is started at once from one module fixture (a few at a time), because each one pays
~2-5 s of imports; the tests then only look at the results.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch

from tierprune.config import CalibrationConfig, EvalConfig, ModelConfig, PruneConfig, TierpruneConfig
from tierprune.models import LoadedModel, load_model
from tierprune.tasks.oneshot import run_oneshot
from tests.conftest import make_tiny_tokenizer

_tiny_tokenizer = make_tiny_tokenizer  # older name, still imported elsewhere

HIDDEN, MLP = 36, 60  # in-dims divisible by 4 (tiers) but not by 8 (3:8)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ---------------------------------------------------------------------------------------------------
# Tiny checkpoints on disk
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(data_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """A tiny LLaMA (hidden 36, MLP 60) and a tiny BERT, each saved with a tokenizer."""
    from transformers import BertConfig, BertLMHeadModel, LlamaConfig, LlamaForCausalLM

    texts = pd.read_parquet(data_dir / "c4-subset").text[:100].tolist()
    tokenizer = make_tiny_tokenizer(texts)
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True))
    llama.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    bert = BertLMHeadModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64))
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    return {"llama": root / "llama", "bert": root / "bert", "root": root}


# ---------------------------------------------------------------------------------------------------
# All CLI runs, started together
# ---------------------------------------------------------------------------------------------------

PROTECTED = {"keep.txt": b"precious", "config.json": b'{"mine": true}', "model.safetensors": b"not really"}


def _cli_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERPRUNE_")}
    env.update(COLUMNS="200", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TIERPRUNE_CACHE=str(root / "cache"), NO_COLOR="1")
    return env


def _cases(data_dir: Path, ckpt: dict[str, Path]) -> dict[str, list[str]]:
    root, llama = ckpt["root"], str(ckpt["llama"])
    c4, wiki = f"c4:{data_dir / 'c4-subset'}", f"wikitext2:{data_dir / 'wikitext-2-raw'}"
    quick = ["--calib", c4, "--calib-samples", "2", "--calib-seqlen", "16", "--eval", "none"]
    (root / "a-file").write_text("I am a file")
    for kept in ("kept-shapes", "kept-data"):
        (root / kept).mkdir(exist_ok=True)
        for name, data in PROTECTED.items():
            (root / kept / name).write_bytes(data)
    return {
        # Bad input: exit 2, one line.
        "missing_model_dir": ["--model", "./no-such-dir", *quick],
        "unsupported_arch": ["--model", str(ckpt["bert"]), *quick],
        "hub_id_offline": ["--model", "tierprune-tests/no-such-model", *quick],
        "tiers_sum": ["--model", llama, *quick, "--pattern", "tiers", "--tiers", "0.5,0.3,0.3"],
        "sparsity_high": ["--model", llama, *quick, "--sparsity", "1.2"],
        "sparsity_negative": ["--model", llama, *quick, "--sparsity", "-0.1"],
        "sparsity_unparsable": ["--model", llama, *quick, "--sparsity", "half"],
        "nm_indivisible": ["--model", llama, *quick, "--pattern", "3:8", "--output", str(root / "kept-shapes")],
        "missing_calib": ["--model", llama, "--calib", "c4:/no/such/dir", "--calib-samples", "2",
                          "--calib-seqlen", "16", "--eval", "none", "--output", str(root / "kept-data")],
        "missing_eval": ["--model", llama, "--calib", c4, "--calib-samples", "2", "--calib-seqlen", "16",
                         "--eval", "wikitext2:/no/such/dir"],
        "eval_too_short": ["--model", llama, "--calib", c4, "--calib-samples", "2", "--calib-seqlen", "16",
                           "--eval", wiki, "--eval-seqlen", "100000000"],
        "unknown_pattern": ["--model", llama, *quick, "--pattern", "foo"],
        "device_cuda": ["--model", llama, *quick, "--device", "cuda"],
        "output_is_file": ["--model", llama, *quick, "--output", str(root / "a-file")],
        # Good runs.
        "tiers_e2e": ["--model", llama, "--method", "wanda", "--pattern", "tiers", "--tiers", "0.5,0.25,0.25",
                      "--topk", "8", "--calib", c4, "--calib-samples", "4", "--calib-seqlen", "32",
                      "--eval", wiki, "--eval-seqlen", "32", "--eval-max-windows", "3",
                      "--output", str(root / "OUT"), "--json", str(root / "tiers.json")],
        "method_none": ["--model", llama, "--method", "none", *quick, "--json", str(root / "none.json")],
    }


# (case, part of the one error line)
BAD = [
    ("missing_model_dir", "model directory not found: ./no-such-dir"),
    ("unsupported_arch", "unsupported architecture 'bert'"),
    ("hub_id_offline", "cannot load model 'tierprune-tests/no-such-model'"),
    ("tiers_sum", "must sum to 1"),
    ("sparsity_high", "sparsity"),
    ("sparsity_negative", "sparsity"),
    ("sparsity_unparsable", "--sparsity"),
    ("nm_indivisible", "pattern 3:8 needs input dims divisible by 8"),
    ("missing_calib", "/no/such/dir does not exist"),
    ("missing_eval", "/no/such/dir does not exist"),
    ("eval_too_short", "fewer than one window"),
    ("unknown_pattern", "unknown pattern 'foo'"),
    ("device_cuda", "CUDA is not available"),
    ("output_is_file", "is a file"),
]


@pytest.fixture(scope="module")
def runs(data_dir: Path, checkpoints: dict[str, Path]) -> dict[str, subprocess.CompletedProcess]:
    root = checkpoints["root"]
    env = _cli_env(root)

    def run(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tierprune.cli", "prune", *args], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)

    cases = _cases(data_dir, checkpoints)
    if torch.cuda.is_available():
        del cases["device_cuda"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run, args) for name, args in cases.items()}
        return {name: f.result() for name, f in futures.items()}


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,message", BAD, ids=[c for c, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(runs, case: str, message: str) -> None:
    if case not in runs:
        pytest.skip("CUDA is available here")
    proc = runs[case]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]


def test_failed_run_leaves_the_output_folder_alone(runs, checkpoints) -> None:
    root = checkpoints["root"]
    assert runs["nm_indivisible"].returncode == runs["missing_calib"].returncode == 2
    for kept in ("kept-shapes", "kept-data"):
        files = {p.name: p.read_bytes() for p in (root / kept).iterdir()}
        assert files == PROTECTED, kept
    assert (root / "a-file").read_text() == "I am a file"


def test_module_entry_point_calls_main() -> None:
    proc = subprocess.run([sys.executable, "-m", "tierprune.cli", "prune", "--help"], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"}, timeout=60)
    assert proc.returncode == 0 and "--calib-samples" in proc.stdout


# ---------------------------------------------------------------------------------------------------
# A good run, end to end
# ---------------------------------------------------------------------------------------------------

def _tier_map(df: pd.DataFrame, module: str) -> torch.Tensor:
    part = df[df.module == module]
    out = torch.full((part.block_row.max() + 1, part.block_col.max() + 1), -1, dtype=torch.int8)
    out[torch.tensor(part.block_row.values).long(), torch.tensor(part.block_col.values).long()] = \
        torch.tensor(part.tier.values, dtype=torch.int8)
    assert (out >= 0).all(), module
    return out


def test_end_to_end_tiers_run(runs, checkpoints) -> None:
    from transformers import AutoModelForCausalLM

    proc, root = runs["tiers_e2e"], checkpoints["root"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    record = json.loads((root / "tiers.json").read_text())
    for key in ("ppl", "sparsity", "seconds"):
        assert isinstance(record[key], float), key
    assert 1.0 < record["ppl"] < 1e6 and 0.0 < record["sparsity"] < 1.0 and record["eval_windows"] == 3
    assert set(record["tiers"]) == {"dense", "2:4", "topk"}
    assert sum(record["tiers"].values()) == pytest.approx(1.0)

    # The saved checkpoint reloads with transformers alone and carries the run's zeros.
    out = root / "OUT"
    saved = AutoModelForCausalLM.from_pretrained(out)
    layers = saved.model.layers
    weights = {f"model.layers.{i}.{n}": layer.get_submodule(n).weight.data for i, layer in enumerate(layers)
               for n in LINEARS}
    zeros = sum(int((W == 0).sum()) for W in weights.values())
    assert zeros / sum(W.numel() for W in weights.values()) == pytest.approx(record["sparsity"])
    for name, W in weights.items():
        assert (W == 0).float().mean().item() == pytest.approx(record["modules"][name]["sparsity"]), name

    # The same run in-process (the same config, seed and data) gives exactly these zeros.
    cfg = TierpruneConfig(
        model=ModelConfig(name=str(checkpoints["llama"])),
        calibration=CalibrationConfig(data=record["settings"]["calibration"]["data"], nsamples=4, seqlen=32),
        prune=PruneConfig(method="wanda", pattern="tiers", tiers=(0.5, 0.25, 0.25), topk=8),
        eval=EvalConfig(data=None))
    loaded = load_model(str(checkpoints["llama"]))
    run_oneshot(cfg, loaded=loaded)
    again = {f"model.layers.{i}.{n}": layer.get_submodule(n).weight.data
             for i, layer in enumerate(loaded.model.model.layers) for n in LINEARS}
    for name, W in weights.items():
        assert torch.equal(W == 0, again[name] == 0), name

    # The tier maps read with pandas alone; their counts are the record's fractions, and the weights obey them.
    df = pd.read_parquet(out / "tier_maps.parquet")
    assert list(df.columns) == ["module", "layer", "block_row", "block_col", "tier", "iteration_demoted", "score"]
    assert set(df.module) == set(weights)
    counts = df.tier.value_counts().reindex([0, 1, 2], fill_value=0)
    for tier, name in enumerate(("dense", "2:4", "topk")):
        assert counts[tier] / len(df) == pytest.approx(record["tiers"][name])
    bs = 16
    for name, W in weights.items():
        tier_map = _tier_map(df, name)
        for (r, c), tier in zip(torch.cartesian_prod(torch.arange(tier_map.shape[0]),
                                                     torch.arange(tier_map.shape[1])).tolist(),
                                tier_map.flatten().tolist()):
            block = W[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs]
            nonzero = int((block != 0).sum())
            if tier == 0:
                assert nonzero == block.numel(), (name, r, c)
            elif tier == 1:
                assert ((block != 0).reshape(block.shape[0], -1, 4).sum(-1) <= 2).all(), (name, r, c)
            else:
                assert 1 <= nonzero <= 8, (name, r, c, nonzero)


def test_method_none_prunes_nothing(runs, checkpoints) -> None:
    proc = runs["method_none"]
    assert proc.returncode == 0, proc.stderr
    record = json.loads((checkpoints["root"] / "none.json").read_text())
    assert record["sparsity"] == 0.0 and record["ppl"] is None
    assert record["tiers"] == {"dense": 1.0, "2:4": 0.0, "topk": 0.0}


# ---------------------------------------------------------------------------------------------------
# Determinism (plain functions, in-process)
# ---------------------------------------------------------------------------------------------------

def test_same_seed_same_weights_other_seed_other_masks(data_dir, checkpoints) -> None:
    base = load_model(str(checkpoints["llama"]))

    def pruned(seed: int, pattern: str = "unstructured") -> dict[str, torch.Tensor]:
        loaded = LoadedModel(model=copy.deepcopy(base.model), tokenizer=base.tokenizer, source="tiny")
        cfg = TierpruneConfig(
            calibration=CalibrationConfig(data=f"c4:{data_dir / 'c4-subset'}", nsamples=4, seqlen=32, seed=seed,
                                          batch_size=3),
            prune=PruneConfig(method="wanda", pattern=pattern, topk=8), eval=EvalConfig(data=None))
        run_oneshot(cfg, loaded=loaded)
        return {n: p.detach().clone() for n, p in loaded.model.named_parameters() if ".layers." in n}

    a, b, c = pruned(0), pruned(0), pruned(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n] == 0, c[n] == 0) for n in a if n.endswith("proj.weight"))
    t0, t1 = pruned(0, "tiers"), pruned(0, "tiers")
    assert all(torch.equal(t0[n], t1[n]) for n in t0)


def test_progress_to_a_file_is_written_as_it_happens():
    """Redirected (nohup ... > run.log, docker logs), progress must not wait for the end of the run."""
    import io
    import time

    from rich.console import Console

    from tierprune import cli

    out = io.StringIO()
    lines = cli._ProgressLines(Console(file=out, width=200), every=3600, clock_start=time.monotonic() - 125)
    lines.update("iteration 1: calibrate", 1, 30)
    assert out.getvalue() == "", "a line per layer would flood the log"
    lines.update("iteration 1: calibrate", 30, 30)
    first = out.getvalue()
    # the seconds since the command started lead the line: where a log's time went between stages
    assert first.startswith("[+125 s] iteration 1: calibrate: 30/30 (") and first.endswith(" s)\n")
    lines.every = 0.0  # a long stage says where it is at least every `every` seconds
    lines.update("iteration 1: finetune", 100, 300)
    assert out.getvalue()[len(first):].startswith("[+125 s] iteration 1: finetune: 100/300 (")


def test_output_folder_probe_refuses_in_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    from tierprune.cli import _check_output_folder
    from tierprune.errors import TierpruneError

    _check_output_folder(str(tmp_path / "new" / "deep" / "out"))  # writable: accepted ...
    assert list(tmp_path.iterdir()) == []  # ... and the folders the probe made are gone again
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "old.txt").write_text("mine")
    _check_output_folder(str(kept))
    assert [p.name for p in kept.iterdir()] == ["old.txt"]  # an existing folder and its files stay
    (tmp_path / "a-file").write_text("")
    with pytest.raises(TierpruneError, match="is a file; give a folder"):
        _check_output_folder(str(tmp_path / "a-file"))
    with pytest.raises(TierpruneError, match="cannot be written") as info:
        _check_output_folder(str(tmp_path / "a-file" / "sub"))
    assert "\n" not in str(info.value)
    _check_output_folder("memory://tierprune-probe/out")  # a reachable remote store: probed, accepted
    import fsspec

    fsspec.register_implementation("tierprune-missing", "tierprune_no_such_backend.FileSystem", clobber=True,
                                   errtxt="Install tierprune-no-such-backend to access tierprune-missing://")
    with pytest.raises(TierpruneError, match=r"^--output tierprune-missing://b/out: a store URL needs a package "
                                             r"that is not installed: Install tierprune-no-such-backend"):
        _check_output_folder("tierprune-missing://b/out")  # refused before any work, in one line


def test_json_path_in_a_folder_that_cannot_be_made_is_refused_before_pruning(tmp_path: Path) -> None:
    from tierprune.cli import _check_output_folder
    from tierprune.errors import TierpruneError

    (tmp_path / "a-file").write_text("")
    with pytest.raises(TierpruneError, match=r"^--json .*a-file/r.json: its folder .*a-file is a file$"):
        _check_output_folder(str(tmp_path / "a-file"), "--json", str(tmp_path / "a-file" / "r.json"))
    with pytest.raises(TierpruneError, match=r"^--json .*deep/r.json cannot be written"):
        _check_output_folder(str(tmp_path / "a-file" / "deep"), "--json", str(tmp_path / "a-file" / "deep" / "r.json"))
    # Through the command: refused in one line before the model is even loaded.
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "tierprune.cli", "prune", "--json", str(tmp_path / "a-file" / "r.json"),
                           "--model", "no-such-model", "--eval", "none"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --json"), proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_json_to_an_fsspec_url_is_written_there(tiny_llama_dir: Path, mem_root: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`--json s3://bucket/r.json` went to a local folder named `s3:` (pathlib collapses the `//`)."""
    import fsspec

    from tierprune.cli import _run
    from tierprune.config import config_from_flags

    monkeypatch.chdir(tmp_path)
    cfg = config_from_flags(model=str(tiny_llama_dir), method="none", eval="none")
    record = _run(cfg, None, f"{mem_root}/results/r.json")
    written = json.loads(fsspec.open(f"{mem_root}/results/r.json", "rb").open().read())
    assert written["model"] == record["model"] == str(tiny_llama_dir)
    assert list(tmp_path.iterdir()) == []  # nothing local, no `memory:` folder


def test_run_tables_put_the_fullest_rows_columns_first() -> None:
    """Iteration 0 has no "ppl before ft": the column still stands beside "ppl", not after "seconds"."""
    from tierprune.cli import _rows_table

    rows = [{"iteration": 0, "sparsity": 0.0, "ppl": 36.6, "seconds": 5.0},
            {"iteration": 1, "sparsity": 0.2, "ppl before ft": 80.1, "ft tokens": 128, "ppl": 40.2, "seconds": 9.0}]
    table = _rows_table("run", rows)
    assert [c.header for c in table.columns] == ["iteration", "sparsity", "ppl before ft", "ft tokens", "ppl",
                                                 "seconds"]
    assert list(table.columns[2].cells) == ["", "80.1"]  # the dense row's cell is blank


def test_the_console_width_is_read_at_each_print_not_at_import(monkeypatch) -> None:
    """rich fixes COLUMNS when a Console is made; the CLI's are made at import, so whoever imported first (a test
    with COLUMNS=80, a CliRunner's env) would set every later table's width."""
    import io

    from tierprune.cli import _Console

    monkeypatch.setenv("COLUMNS", "80")
    piped = _Console(file=io.StringIO())
    assert piped.width == 80
    monkeypatch.setenv("COLUMNS", "250")
    assert piped.width == 250
    monkeypatch.delenv("COLUMNS")
    assert piped.width == 200  # a file or a pipe without COLUMNS: wide, not rich's 80
    piped.print("x" * 150)
    assert piped.file.getvalue() == "x" * 150 + "\n"  # one line, not wrapped at 80
    piped.width = 60  # a width set on the console itself still wins
    assert piped.width == 60
