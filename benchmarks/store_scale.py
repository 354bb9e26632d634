"""The real flow (`tierprune run`: Prefect, the run store, every step) on a randomly initialised
LLaMA-2-7B-shaped model: where an iteration's wall time goes, how many bytes it stores, peak host RAM.

Builds the model folder first (random bf16 weights, a BPE tokenizer of 32,000 tokens trained on the
calibration text; setup, not measured), then runs a 2-iteration plan without fine-tuning into a
store on local disk and reads the breakdown back from the steps' COMMIT.json records:

    python benchmarks/store_scale.py --data ../shared/data --workdir /tmp/scale [--layers 32] [--device cuda]

Per iteration: wall (record to record), calibration, scoring, demotion (tier table + keep masks),
tier/mask writes, checkpoint (masks applied + changed tensors written), hashing, evaluation, and
orchestration (wall minus the steps' own time: Prefect, cache checks, the report); bytes stored
against the bytes of the tensors that changed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

PLAN = ("iteration,dense,mid_2_4,topk,dense_to_2_4,mid_2_4_to_topk,epochs\n"
        "1,0.6,0.3,0.1,0.4,0.1,0\n2,0.35,0.45,0.2,0.25,0.1,0\n")


def build_model(folder: Path, data: Path, layers: int, device: str) -> float:
    """A LLaMA-2-7B-shaped model with random weights and a trained tokenizer; returns its bytes."""
    import pandas as pd
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").is_file():
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    texts = pd.read_parquet(data / "c4-subset").text.tolist()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=32000, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       special_tokens=["<|endoftext|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, use_cache=False)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _time(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def breakdown(run: Path) -> list[dict]:
    """Per iteration, from the committed steps' records."""
    steps: dict[int, dict[str, dict]] = {}
    for marker in run.glob("iter-*/*/COMMIT.json"):
        k = int(marker.parent.parent.name.removeprefix("iter-"))
        steps.setdefault(k, {})[marker.parent.name.rsplit("-", 1)[0]] = {
            "marker": json.loads(marker.read_text()), "folder": marker.parent}
    seen_blobs: set[str] = set()
    rows = []
    previous_end = None
    for k in sorted(steps):
        s = steps[k]
        meta = {name: st["marker"].get("meta") or {} for name, st in s.items()}
        end = _time(s["iteration"]["marker"]["committed"])
        # Bytes this iteration stored: its step files plus blobs no earlier checkpoint referred to.
        step_bytes = sum(p.stat().st_size for st in s.values() for p in st["folder"].iterdir())
        new_blobs = {}
        for name in ("start", "checkpoint"):
            if name in s:
                new_blobs.update({d: n for d, n in s[name]["marker"]["blobs"].items() if d not in seen_blobs})
        seen_blobs.update(new_blobs)
        changed_tensor_bytes = 0
        ckpt = s.get("checkpoint") or s.get("start")
        index = json.loads((ckpt["folder"] / "checkpoint.json").read_text())
        for entry in index["tensors"].values():
            if entry["sha256"] in new_blobs:
                numel = 1
                for d in entry["shape"]:
                    numel *= d
                changed_tensor_bytes += numel * torch.empty(0, dtype=getattr(torch, entry["dtype"])).element_size()
        stored = step_bytes + sum(new_blobs.values())

        def sec(name: str, key: str = "seconds") -> float:
            return float(meta.get(name, {}).get(key, 0.0))

        def io(name: str, key: str) -> float:
            m = meta.get(name, {})
            return float((m.get("io") or {}).get(key, 0.0)) + float((m.get("commit_io") or {}).get(key, 0.0))

        step_total = sum(sec(n) for n in meta)
        row = {
            "iteration": k,
            "wall_s": None if previous_end is None else round(end - previous_end, 2),
            "calibration_s": sec("activations", "compute_seconds"),
            "scoring_s": sec("scores", "compute_seconds"),
            "demotion_s": round(sec("tiers", "compute_seconds"), 2),
            "tier_mask_writes_s": round(sec("tiers", "commit_seconds"), 2),
            "checkpoint_s": round(sec("checkpoint") + sec("start"), 2),
            "checkpoint_writes_s": round(io("checkpoint", "write_seconds") + io("start", "write_seconds"), 2),
            "hashing_s": round(sum(io(n, "hash_seconds") for n in meta), 2),
            "host_copies_s": round(sum(io(n, "copy_seconds") for n in meta), 2),
            "evaluation_s": sec("eval", "compute_seconds"),
            "steps_s": round(step_total, 2),
            "orchestration_s": None if previous_end is None else round(end - previous_end - step_total, 2),
            "stored_bytes": stored,
            "changed_tensor_bytes": changed_tensor_bytes,
            "masks_bytes": (s["tiers"]["folder"] / "masks.safetensors").stat().st_size if "tiers" in s else 0,
        }
        denominator = changed_tensor_bytes + row["masks_bytes"]
        row["stored_over_changed"] = round(stored / denominator, 4) if denominator else None
        row["compute_s"] = round(row["calibration_s"] + row["scoring_s"] + row["evaluation_s"], 2)
        row["steps"] = {n: {"compute_s": round(sec(n, "compute_seconds"), 2), "commit_s": round(sec(n, "commit_seconds"), 2),
                            **{k: round(io(n, k), 2) for k in ("hash_seconds", "write_seconds", "copy_seconds")}}
                        for n in sorted(meta)}
        rows.append(row)
        previous_end = end
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder with c4-subset/ and wikitext-2-raw/")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--cli", default=f"{sys.executable} -m tierprune.cli", help="how to start tierprune")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_bytes = build_model(args.workdir / "model", args.data, args.layers, args.device)
    print(f"model folder ready: {model_bytes / 1e9:.2f} GB of bf16 weights ({time.perf_counter() - t0:.0f} s setup)",
          flush=True)
    (args.workdir / "plan.csv").write_text(PLAN)
    store = args.workdir / "store"
    cmd = [*args.cli.split(), "run", "--plan", str(args.workdir / "plan.csv"), "--store", str(store), "--run", "scale",
           "--model", str(args.workdir / "model"), "--dtype", "bfloat16", "--device", args.device,
           "--calib", f"c4:{args.data / 'c4-subset'}", "--calib-samples", str(args.calib_samples),
           "--calib-seqlen", str(args.calib_seqlen), "--eval", f"wikitext2:{args.data / 'wikitext-2-raw'}",
           "--eval-seqlen", str(args.eval_seqlen), "--eval-max-windows", str(args.eval_windows)]
    if args.compile:
        cmd.append("--compile")
    env = {**os.environ, "PREFECT_HOME": str(args.workdir / "prefect"), "PYTHONUNBUFFERED": "1"}
    began = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    (args.workdir / "run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:])
        raise SystemExit(f"tierprune run failed ({proc.returncode})")
    rows = breakdown(store / "scale")
    print(f"tierprune run: {wall:.1f} s in all (Prefect start, model load and iteration 0 included); "
          f"peak host RSS {peak_rss / 1e9:.1f} GB = {peak_rss / model_bytes:.2f} x the model's {model_bytes / 1e9:.1f} GB")
    keys = ["iteration", "wall_s", "compute_s", "calibration_s", "scoring_s", "demotion_s", "tier_mask_writes_s",
            "checkpoint_s", "checkpoint_writes_s", "hashing_s", "host_copies_s", "evaluation_s", "orchestration_s",
            "stored_bytes", "changed_tensor_bytes", "masks_bytes", "stored_over_changed"]
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys))
    print("per step (seconds; hash/write/copy are summed over the writer threads):")
    for row in rows:
        for name, step in row["steps"].items():
            print(f"  iteration {row['iteration']} {name:12s} " + "  ".join(f"{k} {v:.4g}" for k, v in step.items()))
    print(json.dumps({"wall_s": wall, "peak_rss_bytes": peak_rss, "model_bytes": model_bytes, "iterations": rows}))


if __name__ == "__main__":
    main()
