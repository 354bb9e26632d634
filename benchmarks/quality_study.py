"""The recovery quality study: progressive vs one-shot three tiers, with the same fine-tuning budget.

Every row is a real `tierprune run` (Prefect flow, run store, CLI) on SmolLM2-135M with the
PROTOCOL's settings: calibration 128 × 2048 tokens of C4, WikiText-2 test at seqlen 2048, all windows.
  progressive  the seed's 5-iteration plan (schedules/plans/llama2-5iter.csv), 1 epoch per iteration
  one-shot     one iteration straight to 35/45/20 with 5 epochs: the same total fine-tuning tokens
Rows run side by side (a 135M model leaves an H200 mostly idle), each in its own store and Prefect home;
wall times are therefore those of shared runs. Prints one JSON line per row and a markdown table.

    python benchmarks/quality_study.py --model PATH.gguf --data DATA_DIR --out OUT [--rows a,b] [--device cuda]

A row is a name below, optionally with variants: progressive-kd+ft-lr=3e-4+ft-compile+plan=NAME|PATH.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PLANS = Path(__file__).resolve().parents[1] / "schedules" / "plans"
ONE_SHOT = "iteration,dense,mid_2_4,topk,dense_to_2_4,mid_2_4_to_topk,epochs\n1,0.35,0.45,0.20,0.65,0.20,{epochs}\n"

PROTOCOL = ["--calib-samples", "128", "--calib-seqlen", "2048", "--eval-seqlen", "2048", "--ft-seqlen", "512",
            "--ft-batch-size", "16"]
SMOKE = ["--calib-samples", "4", "--calib-seqlen", "32", "--eval-seqlen", "32", "--eval-max-windows", "2",
         "--ft-seqlen", "32", "--ft-batch-size", "4"]  # --smoke: checks the script on a tiny model in minutes

# name -> (plan, extra flags); every row trains --ft-tokens per plan epoch (5 epochs in all).
ROWS = {
    "progressive-kd": ("progressive", ["--ft-method", "full", "--kd-weight", "1.0"]),
    "oneshot-kd": ("oneshot", ["--ft-method", "full", "--kd-weight", "1.0"]),
    "progressive-ce": ("progressive", ["--ft-method", "full", "--kd-weight", "0"]),
    "oneshot-ce": ("oneshot", ["--ft-method", "full", "--kd-weight", "0"]),
    "progressive-lora-kd": ("progressive", ["--ft-method", "lora", "--kd-weight", "1.0", "--ft-lr", "1e-3"]),
    "oneshot-lora-kd": ("oneshot", ["--ft-method", "lora", "--kd-weight", "1.0", "--ft-lr", "1e-3"]),
    "progressive-kd-global": ("progressive", ["--ft-method", "full", "--kd-weight", "1.0", "--scope", "global"]),
    "progressive-kd-k16": ("progressive", ["--ft-method", "full", "--kd-weight", "1.0", "--topk", "16"]),
    "oneshot-none": ("oneshot", ["--ft-method", "none"]),
}


def step_seconds(run_dir: Path) -> dict[str, float]:
    """Compute seconds per kind of step (finetune's training loop apart), summed over the run's iterations."""
    totals: dict[str, float] = {}
    for commit in sorted(run_dir.glob("iter-*/*/COMMIT.json")):
        meta = json.loads(commit.read_text()).get("meta", {})
        kind = commit.parent.name.rsplit("-", 1)[0]
        totals[kind] = totals.get(kind, 0.0) + float(meta.get("seconds", 0.0))
        if "train_seconds" in meta:
            totals["of which training"] = totals.get("of which training", 0.0) + float(meta["train_seconds"])
    return {k: round(v, 1) for k, v in totals.items()}


def parse_row(spec: str) -> tuple[str, str, list[str], str | None]:
    """'NAME[+FLAG=VALUE...]' -> (folder/run name, row kind, flags, plan or None).

    A variant adds or overrides `tierprune run` flags of a named row, e.g. progressive-kd+ft-lr=3e-4+ft-schedule=cosine;
    a bare FLAG is a switch (ft-compile); plan=NAME|PATH (a shipped plan or a file) replaces the row's plan.
    """
    name, *variants = spec.split("+")
    if name not in ROWS:
        raise ValueError(f"unknown row {name!r}; known: {', '.join(ROWS)}")
    kind, flags = ROWS[name]
    flags, plan = list(flags), None
    for variant in variants:
        key, sep, value = variant.partition("=")
        if not key or (sep and not value):
            raise ValueError(f"row variant {variant!r} in {spec!r} is not FLAG=VALUE or a bare FLAG")
        if key == "plan":
            plan = value
        else:
            flags += [f"--{key}", value] if sep else [f"--{key}"]  # the last of a repeated typer option wins
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", spec)
    return folder, kind, flags, plan


def run_row(spec: str, args: argparse.Namespace) -> dict:
    name, kind, extra, plan = parse_row(spec)
    work = Path(args.out).resolve() / name
    work.mkdir(parents=True, exist_ok=True)
    if plan is not None:
        plan = str(Path(plan).resolve()) if Path(plan).is_file() else plan  # a file, or a shipped plan's name
    elif kind == "progressive":
        plan = str(PLANS / "llama2-5iter.csv")
    else:
        plan = str(work / "oneshot.csv")
        Path(plan).write_text(ONE_SHOT.format(epochs=5))
    # Rows share the machine's cores: without a cap each takes all of them for its CPU steps (tier maps).
    threads = str(max(1, (os.cpu_count() or 1) // args.parallel))
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "COLUMNS": "200", "NO_COLOR": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_NUM_THREADS": threads}
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model  # a file or a hub name
    data = Path(args.data).resolve()
    lr = ["--ft-lr", str(args.lr)] if args.lr is not None else []  # a row's own --ft-lr comes later and wins
    command = [sys.executable, "-m", "tierprune.cli", "run", "--plan", plan, "--store", str(work / "store"),
               "--run", name, "--model", model, "--device", args.device,
               "--calib", f"c4:{data}/c4-subset", "--eval", f"wikitext2:{data}/wikitext-2-raw",
               "--ft-tokens", str(args.ft_tokens), *lr, *(SMOKE if args.smoke else PROTOCOL), *extra,
               *shlex.split(args.extra)]
    started = time.perf_counter()
    with open(work / "log.txt", "w") as log:
        # cwd: the row's folder, so that `-m tierprune.cli` imports the installed package even when the script
        # is started from a source checkout, whose top-level tierprune/ folder holds only part of it.
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
        try:
            returncode = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:  # what finished by then is still in the store: report it
            # SIGTERM first: the run commits nothing half-way and frees its lock and GPU slot, so the same
            # command resumes it; SIGKILL only if it has not stopped in a minute.
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            returncode = f"stopped after {args.timeout} s (rerun the same command to resume)"
    wall = time.perf_counter() - started
    row = {"row": spec, "returncode": returncode, "wall_s": round(wall, 1),
           "command": " ".join(["tierprune", *command[3:]])}
    shown = subprocess.run([sys.executable, "-m", "tierprune.cli", "runs", "show", str(work / "store" / name),
                            "--json"], capture_output=True, text=True, env=env, cwd=work)
    if shown.returncode == 0:
        iterations = json.loads(shown.stdout)["iterations"]
        last = iterations[-1]
        row.update(dense_ppl=iterations[0]["ppl"], final_ppl=last["ppl"], sparsity=last["sparsity"],
                   tokens=sum(it.get("finetune_tokens") or 0 for it in iterations),
                   per_iteration=[(it["iteration"], it.get("ppl_before_finetune"), it["ppl"]) for it in iterations],
                   step_seconds=step_seconds(work / "store" / name))
    else:
        row["error"] = (shown.stderr or "")[-400:]
    if returncode != 0:
        row["log_tail"] = (work / "log.txt").read_text(errors="replace")[-600:]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="folder with c4-subset/ and wikitext-2-raw/")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ft-tokens", type=int, default=2_457_600, help="per plan epoch (300 × 16 × 512)")
    parser.add_argument("--lr", type=float, default=None,
                        help="--ft-lr for every row without its own (default: tierprune run's; "
                             "the study's first tables used 1e-4)")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=560)
    parser.add_argument("--extra", default="", help='flags added to every row, e.g. "--ft-compile"')
    parser.add_argument("--smoke", action="store_true", help="tiny settings, to check the script itself")
    args = parser.parse_args()
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    try:
        for spec in names:
            parse_row(spec)
    except ValueError as e:
        sys.exit(f"error: {e}")
    results = []
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for row in pool.map(lambda n: run_row(n, args), names):
            print(json.dumps(row), flush=True)
            results.append(row)
    print("\n| row | tokens | wall s | final ppl | sparsity | dense ppl |\n|---|---|---|---|---|---|")
    for r in results:
        ppl = f"{r['final_ppl']:.2f}" if "final_ppl" in r else "failed"
        sparsity = f"{r['sparsity']:.3f}" if "sparsity" in r else ""
        dense = f"{r['dense_ppl']:.2f}" if "dense_ppl" in r else ""
        print(f"| {r['row']} | {r.get('tokens', '')} | {r['wall_s']} | {ppl} | {sparsity} | {dense} |")


if __name__ == "__main__":
    main()
