"""`tierprune generate`: a packed folder decodes the same greedy tokens as its dense twin and its export, timed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tierprune.errors import TierpruneError
from tierprune.tasks.convert import convert
from tierprune.models import require_device
from tierprune.tasks.generate import generate_timed, load_for_generation

from ..conftest import make_tiny_llama, make_tiny_tokenizer
from ..test_hybrid_linear import prune_randomly_
from .test_convert import TEXTS, _export_folder

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(export folder, packed folder) of a tiny LLaMA pruned to random tier maps, vocabulary its tokenizer's."""
    tmp = tmp_path_factory.mktemp("generate")
    model = make_tiny_llama(vocab=len(make_tiny_tokenizer(TEXTS)), intermediate=120)
    export = _export_folder(tmp / "export", model, prune_randomly_(model, seed=2))
    convert(str(export), str(tmp / "packed"))
    return export, tmp / "packed"


def test_packed_twin_and_export_decode_the_same_greedy_tokens(folders) -> None:
    export, packed = folders
    runs = {}
    for folder, twin in ((packed, False), (packed, True), (export, False)):
        model, tokenizer, kind = load_for_generation(str(folder), "cpu", dense_twin=twin)
        runs[kind] = generate_timed(model, tokenizer, PROMPT, 6, kind)
    assert set(runs) == {"packed", "dense twin", "model"}
    tokens = runs["packed"].token_ids
    assert 1 <= len(tokens) <= 6 and tokens == runs["dense twin"].token_ids == runs["model"].token_ids
    assert all(r.seconds > 0 and r.tokens_per_s > 0 for r in runs.values())
    assert runs["model"].text == make_tiny_tokenizer(TEXTS).decode(tokens, skip_special_tokens=True)


def test_dtype_casts_the_packed_values_and_keeps_the_tokens_of_the_twin(folders) -> None:
    from tierprune.hybrid_linear import HybridLinear

    _, packed = folders
    runs = []
    for twin in (False, True):
        model, tokenizer, kind = load_for_generation(str(packed), "cpu", dense_twin=twin, dtype="bfloat16")
        assert next(model.parameters()).dtype == torch.bfloat16
        runs.append(generate_timed(model, tokenizer, PROMPT, 6, kind))
    packed_model, _, _ = load_for_generation(str(packed), "cpu", dtype="bfloat16")
    layer = next(m for m in packed_model.modules() if isinstance(m, HybridLinear))
    assert layer.dense_values.dtype == torch.bfloat16 and layer.nm_meta.dtype == torch.uint8  # indices untouched
    assert runs[0].token_ids == runs[1].token_ids
    with pytest.raises(TierpruneError, match="--dtype half: use stored, bfloat16, float16 or float32"):
        load_for_generation(str(packed), "cpu", dtype="half")


def test_a_model_name_decodes_the_dense_original() -> None:
    """What --model takes (here the embedded SmolLM2's alias) runs too: the baseline a pruned folder is held to."""
    model, tokenizer, kind = load_for_generation("smollm2-135m", "cpu")
    run = generate_timed(model, tokenizer, "The capital of France is", 3, kind)
    assert kind == "model" and model.config.use_cache is True and len(run.token_ids) == 3
    assert "Paris" in run.text


def test_a_plain_folder_decodes_with_its_kv_cache_on(folders) -> None:
    export, _ = folders
    model, _, kind = load_for_generation(str(export), "cpu")
    assert kind == "model" and model.config.use_cache is True  # load_model turned it off for calibration


def test_bad_folders_and_devices_are_one_line(folders, tmp_path) -> None:
    export, _ = folders
    with pytest.raises(TierpruneError, match=r"is not a packed folder \(no hybrid.json\), so it has no dense twin"):
        load_for_generation(str(export), "cpu", dense_twin=True)
    with pytest.raises(TierpruneError, match="model directory not found"):  # a path that is not there
        load_for_generation(str(tmp_path / "nothing"), "cpu")
    with pytest.raises(TierpruneError, match="is not a packed folder, so it has no dense twin"):
        load_for_generation("smollm2-135m", "cpu", dense_twin=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text("{}")
    with pytest.raises(TierpruneError, match=r"run is a run, not a model: pack an iteration first with "
                                             r"`tierprune convert .*run --output DIR`"):
        load_for_generation(str(tmp_path / "run"), "cpu")
    with pytest.raises(TierpruneError, match="unknown device 'gpu'"):
        require_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(TierpruneError, match="CUDA is not available here"):
            require_device("cuda:0")


def run_generate_cli(folder: Path, tmp_path: Path, *options: str) -> str:
    """`tierprune generate FOLDER --prompt PROMPT OPTIONS` as a user runs it; its stdout (exit 0 asserted)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERPRUNE_", "PREFECT_"))}
    env.update(COLUMNS="200", NO_COLOR="1", HF_HUB_OFFLINE="1", PREFECT_HOME=str(tmp_path / "prefect"))
    proc = subprocess.run([sys.executable, "-m", "tierprune.cli", "generate", str(folder), "--prompt", PROMPT,
                           *options], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_cli_prints_the_continuation_and_the_ratio(folders, tmp_path) -> None:
    _, packed = folders
    stdout = run_generate_cli(packed, tmp_path, "--max-new-tokens", "4", "--compare-dense")
    assert stdout.startswith(PROMPT)
    packed_line, twin_line, ratio_line = stdout.splitlines()[-3:]  # the continuation may hold newlines
    assert packed_line.startswith("packed: ") and twin_line.startswith("dense twin: ") and "tokens/s" in packed_line
    assert ratio_line.startswith("packed / dense twin tokens/s: ") and ratio_line.endswith("the same tokens: yes")


def test_compiled_decoding_gives_the_eager_tokens(folders) -> None:
    """--compile: a static cache and the decode step through torch.compile, the hybrid op inside it (its fake
    implementation); the same greedy tokens as eager decoding, packed and dense twin alike."""
    from torch._dynamo.utils import counters

    _, packed = folders
    for twin in (False, True):
        model, tokenizer, kind = load_for_generation(str(packed), "cpu", dense_twin=twin)
        eager = generate_timed(model, tokenizer, PROMPT, 5, kind)
        graphs = counters["stats"]["unique_graphs"]
        compiled = generate_timed(model, tokenizer, PROMPT, 5, kind, compile=True)
        assert counters["stats"]["unique_graphs"] > graphs  # it did compile, on the CPU too
        assert compiled.token_ids == eager.token_ids and compiled.seconds > 0


def test_cli_compile_says_so(folders, tmp_path) -> None:
    _, packed = folders
    stdout = run_generate_cli(packed, tmp_path, "--max-new-tokens", "3", "--compile")
    assert stdout.splitlines()[-1].startswith("packed: ") and stdout.rstrip().endswith(", compiled)")
