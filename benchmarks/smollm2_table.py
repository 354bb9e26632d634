"""The README's results table: one-shot methods on SmolLM2-135M with the PROTOCOL settings.

Calibration: 128 × 2048 tokens of C4 (seed 0); evaluation: WikiText-2 test, seqlen 2048, every
window. Each row starts again from the dense (de-quantized GGUF) weights. Run:
    TIERPRUNE_DATA=../shared/data python benchmarks/smollm2_table.py --device cuda [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import time

from tierprune.config import CalibrationConfig, EvalConfig, ModelConfig, PruneConfig, TierpruneConfig
from tierprune.models import load_model
from tierprune.tasks.oneshot import default_data_spec, run_oneshot

ROWS = [
    dict(method="none"),
    dict(method="magnitude", pattern="unstructured"),
    dict(method="wanda", pattern="unstructured"),
    dict(method="sparsegpt", pattern="unstructured"),
    dict(method="magnitude", pattern="4:8"),
    dict(method="wanda", pattern="4:8"),
    dict(method="sparsegpt", pattern="4:8"),
    dict(method="magnitude", pattern="2:4"),
    dict(method="wanda", pattern="2:4"),
    dict(method="sparsegpt", pattern="2:4"),
    dict(method="wanda", pattern="block"),
    dict(method="magnitude", pattern="tiers"),
    dict(method="wanda", pattern="tiers"),
    dict(method="wanda", pattern="tiers", topk=15),
    dict(method="wanda", pattern="tiers", select="magnitude"),
    dict(method="wanda", pattern="tiers", scope="global"),
    # Appended (session 15), so that earlier --rows indices keep their meaning: Wanda's masks, OBS-updated weights.
    dict(method="sparsegpt", pattern="block"),
    dict(method="sparsegpt", pattern="tiers"),
    dict(method="sparsegpt", pattern="tiers", scope="global"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--rows", default=None, help="comma-separated row indices to run (default: all)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the layers during calibration")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model_cfg = ModelConfig(name="smollm2-135m", dtype=args.dtype)
    loaded = load_model(model_cfg.name, None, model_cfg.dtype, args.device)
    dense_state = copy.deepcopy(loaded.model.state_dict())
    rows = ROWS if args.rows is None else [ROWS[int(i)] for i in args.rows.split(",")]
    records = []
    print("| method | pattern | options | sparsity | dense/2:4/topk | ppl | prune s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        loaded.model.load_state_dict(dense_state)
        prune = PruneConfig(**row)
        cfg = TierpruneConfig(
            model=model_cfg,
            calibration=CalibrationConfig(data=default_data_spec("c4"), nsamples=args.nsamples, seqlen=args.seqlen,
                                          compile=args.compile),
            prune=prune,
            eval=EvalConfig(data=default_data_spec("wikitext2"), seqlen=args.seqlen, max_windows=args.max_windows),
            device=args.device,
        )
        t0 = time.perf_counter()
        record = run_oneshot(cfg, loaded=loaded)
        record.pop("modules")
        records.append(record)
        extra = [f"{k}={v}" for k, v in row.items() if k not in ("method", "pattern", "topk")]
        extra += ["compiled"] if args.compile and prune.method == "wanda" else []
        if prune.pattern == "tiers":
            extra = ["35/45/20", f"k={prune.topk}"] + extra
        options = ", ".join(extra)
        tiers = "/".join(f"{v:.2f}" for v in record["tiers"].values())
        print(f"| {prune.method} | {prune.pattern if prune.method != 'none' else '-'} | {options} | "
              f"{record['sparsity']:.3f} | {tiers} | {record['ppl']:.2f} | {record['prune_seconds']:.1f} |",
              flush=True)
        record["wall_s"] = time.perf_counter() - t0
    print(f"settings: calib {args.nsamples}x{args.seqlen} {default_data_spec('c4')} seed 0; eval wikitext2 test "
          f"seqlen {args.seqlen}, windows {records[0].get('eval_windows')}; dtype {args.dtype}; device {args.device}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
