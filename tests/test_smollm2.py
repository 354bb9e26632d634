"""The embedded default, for real: SmolLM2-135M from its PyPI package, pruned through the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_cli_prunes_smollm2_wanda_2_4(tmp_path, data_dir):
    env = {**os.environ, "TIERPRUNE_DATA": str(data_dir), "COLUMNS": "200"}
    common = ["--model", "smollm2-135m", "--calib-samples", "4", "--calib-seqlen", "128",
              "--eval-seqlen", "128", "--eval-max-windows", "3"]
    runs = {}
    for method, pattern in (("none", "unstructured"), ("wanda", "2:4")):
        path = tmp_path / f"{method}.json"
        proc = subprocess.run([sys.executable, "-m", "tierprune.cli", "prune", *common, "--method", method,
                               "--pattern", pattern, "--json", str(path)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[method] = json.loads(path.read_text())
    dense, pruned = runs["none"], runs["wanda"]
    # The de-quantized Q4_1 weights hold a few exact zeros already (0.03%), so "dense" is not 0.
    assert dense["sparsity"] < 1e-3
    assert 0.5 <= pruned["sparsity"] < 0.5 + 1e-3  # every SmolLM2 in-dim divides by 4
    assert pruned["tiers"] == {"dense": 0.0, "2:4": 1.0, "topk": 0.0}
    # SmolLM2 has 30 layers × 7 linears; the dense model is the de-quantized GGUF.
    assert len(pruned["modules"]) == 210
    assert 5 < dense["ppl"] < pruned["ppl"] < 1e5
