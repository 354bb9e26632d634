"""The oneshot and evaluate flows: flat parameters in, run_oneshot's record out, a table artifact published."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def _artifact(key: str) -> list[dict]:
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                           limit=1)
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def test_oneshot_flow_prunes_with_offload_and_publishes_its_row(prefect_harness, tiny_llama_dir, data_dir):
    from tierprune.config import config_from_flags
    from tierprune.flows.oneshot import oneshot
    from tierprune.tasks.oneshot import run_oneshot

    flags = {"model": str(tiny_llama_dir), "pattern": "2:4", "calib": f"c4:{data_dir}/c4-subset",
             "calib_samples": 4, "calib_seqlen": 32, "calib_batch_size": 2,
             "eval": f"wikitext2:{data_dir}/wikitext-2-raw", "eval_seqlen": 32, "eval_max_windows": 2}
    record = oneshot(**flags, offload=True)
    direct = run_oneshot(config_from_flags(**flags))  # no flow, resident model
    assert record["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert record["ppl"] == pytest.approx(direct["ppl"], rel=1e-6) and record["eval_windows"] == 2
    assert record["settings"]["offload"] is True
    [row] = _artifact("oneshot")
    assert row["pattern"] == "2:4" and row["ppl"] == pytest.approx(record["ppl"])


def test_evaluate_flow_measures_the_model_as_it_is(prefect_harness, tiny_llama_dir, data_dir):
    from tierprune.flows.oneshot import evaluate

    record = evaluate(model=str(tiny_llama_dir), eval=f"wikitext2:{data_dir}/wikitext-2-raw", eval_seqlen=32,
                      eval_max_windows=2)
    assert record["method"] == "none" and record["sparsity"] < 0.01 and record["ppl"] > 1
    [row] = _artifact("evaluate")
    assert row["ppl"] == pytest.approx(record["ppl"])
