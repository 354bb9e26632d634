"""The one-shot flows: prune and evaluate in one step (`oneshot`), or evaluate a model as it is (`evaluate`).

Wiring only, over `tasks.oneshot.run_oneshot` (the function behind `tierprune prune`): flat parameters,
one per flag, turned into the config by `config_from_flags`; the result record comes back as the flow's
return value and as a table artifact. Both hold the device's GPU slot (flows.gpu_slots).
"""
from __future__ import annotations

from typing import Annotated

from prefect import flow
from pydantic import Field

from tierprune.config import TierpruneConfig, config_from_flags
from tierprune.flows.gpu_slots import device_slot
from tierprune.flows.parameters import (
    BlockSize, Calib, CalibBatchSize, CalibSamples, CalibSeqlen, Compile, Device, Dtype, Eval, EvalBatchSize,
    ZeroShot, ZeroShotInclude, ZeroShotLimit,
    EvalMaxWindows, EvalSeqlen, GgufFile, Method, Model, Offload, Pattern, Scope, Seed, Select, Sparsity, Tiers,
    Topk, described,
)

__all__ = ["oneshot", "evaluate", "run_and_publish"]

Output = Annotated[str | None, Field(description="Save the pruned checkpoint and tier maps in this folder (on the "
                                                 "machine that runs the flow); empty: not saved")]


def run_and_publish(cfg: TierpruneConfig, output: str | None, key: str) -> dict:
    """run_oneshot under the device's slot, its summary published as a table artifact; the result record."""
    from prefect.artifacts import create_table_artifact

    from tierprune.tasks.oneshot import run_oneshot

    with device_slot(cfg.device):
        record = run_oneshot(cfg, output=output)
    row = {"model": str(record["model"]), "method": record["method"], "pattern": record["pattern"],
           "sparsity": round(record["sparsity"], 4), **{f"tier {k}": round(v, 4) for k, v in record["tiers"].items()},
           "ppl": record["ppl"], "eval windows": record.get("eval_windows"), "seconds": round(record["seconds"], 1)}
    create_table_artifact([row], key=key, description=f"{key}: {record['model']}")
    return record


@flow(name="oneshot", log_prints=False)
@described
def oneshot(
    model: Model = "smollm2-135m",
    gguf_file: GgufFile = None,
    dtype: Dtype = "auto",
    method: Method = "wanda",
    pattern: Pattern = "unstructured",
    sparsity: Sparsity = 0.5,
    block_size: BlockSize = 16,
    tiers: Tiers = "0.35,0.45,0.20",
    topk: Topk = 10,
    select: Select = "wanda",
    scope: Scope = "matrix",
    calib: Calib = None,
    calib_samples: CalibSamples = 128,
    calib_seqlen: CalibSeqlen = 2048,
    calib_batch_size: CalibBatchSize = 8,
    seed: Seed = 0,
    compile: Compile = False,
    eval: Eval = None,
    eval_seqlen: EvalSeqlen = 2048,
    eval_max_windows: EvalMaxWindows = None,
    eval_batch_size: EvalBatchSize = 1,
    zero_shot: ZeroShot = None,
    zero_shot_limit: ZeroShotLimit = None,
    zero_shot_include: ZeroShotInclude = None,
    device: Device = "cpu",
    offload: Offload = False,
    output: Output = None,
) -> dict:
    """One-shot pruning (magnitude, Wanda, SparseGPT; unstructured, N:M, block, tiers) and evaluation."""
    flags = dict(locals())  # exactly the parameters above (first statement): the flags of `tierprune prune`
    output = flags.pop("output")
    return run_and_publish(config_from_flags(**flags), output, "oneshot")


@flow(name="evaluate", log_prints=False)
@described
def evaluate(
    model: Model = "smollm2-135m",
    gguf_file: GgufFile = None,
    dtype: Dtype = "auto",
    block_size: BlockSize = 16,
    topk: Topk = 10,
    eval: Eval = None,
    eval_seqlen: EvalSeqlen = 2048,
    eval_max_windows: EvalMaxWindows = None,
    eval_batch_size: EvalBatchSize = 1,
    zero_shot: ZeroShot = None,
    zero_shot_limit: ZeroShotLimit = None,
    zero_shot_include: ZeroShotInclude = None,
    device: Device = "cpu",
    offload: Offload = False,
) -> dict:
    """Perplexity, zero-shot accuracy, sparsity and tiers of a model as it is: a hub id, a folder (`runs export`'s,
    `prune --output`'s, or one `convert` packed) or a GGUF; block_size and topk: the tiers its zeros are counted in."""
    flags = dict(locals())  # exactly the parameters above (first statement)
    return run_and_publish(config_from_flags(method="none", **flags), None, "evaluate")


if __name__ == "__main__":
    # A tiny preset: the embedded SmolLM2, 2:4 Wanda, a quick look at the numbers.
    oneshot(pattern="2:4", calib_samples=16, calib_seqlen=512, eval_seqlen=512, eval_max_windows=16)
