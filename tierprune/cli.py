"""Command line: `tierprune prune`, `run`, `demo`, `runs ...` and `serve`.

Bad input of any kind ends in one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .config import TierpruneConfig, config_from_flags
from .errors import TierpruneError

_COMMAND_STARTED = time.monotonic()  # the run clock of progress lines: imported as the command starts

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Progressive three-tier block pruning for causal language models.")


class _Console(Console):
    """A rich Console whose width is decided at each print, not when it is made: COLUMNS when set, the terminal's
    width on a terminal, else 200 (written to a file or a pipe, rich would wrap tables at 80 columns). rich reads
    COLUMNS once, in its constructor, and this module's consoles are made at import: a caller that sets COLUMNS
    later (typer's CliRunner, a script that imports the app) would keep the width of whoever imported first."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._width = None  # the constructor's reading of COLUMNS; `size` reads it afresh

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is not None:  # set by the caller after construction (console.width = N)
            return size
        columns = os.environ.get("COLUMNS", "")
        if columns.isdigit():
            return ConsoleDimensions(int(columns), size.height)
        return size if self.is_terminal else ConsoleDimensions(200, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


err_console = _Console(stderr=True)
console = _Console()


def _print_error(message: str) -> None:
    # Text, not markup: a message quoting user input such as "[/x]" must print as it is.
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


@contextmanager
def _progress_bars():
    """A rich progress bar per stage on a terminal; plain lines, written as they happen, anywhere else."""
    if not err_console.is_terminal:
        yield _ProgressLines(err_console).update
        return
    bars: dict[str, int] = {}
    with Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=False) as progress:
        def update(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = progress.add_task(stage, total=total)
            progress.update(bars[stage], completed=done, total=total)
        yield update


class _ProgressLines:
    """Progress for a log file or a pipe (`nohup tierprune run ... > run.log`, docker logs, a Prefect worker).

    A rich progress display there renders only when it closes, so a run of hours printed nothing until it
    ended. Instead: a line when a stage ends, and one at most every `every` seconds while it runs. Each line
    starts with the seconds since the command started, so a log shows where the time went between stages.
    """

    def __init__(self, out: Console, every: float = 60.0, clock_start: float | None = None):
        self.out, self.every = out, every
        self.clock_start = _COMMAND_STARTED if clock_start is None else clock_start
        self.started: dict[str, float] = {}
        self.last_line: dict[str, float] = {}

    def update(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        started = self.started.setdefault(stage, now)
        if done >= total or now - self.last_line.get(stage, started) >= self.every:
            self.last_line[stage] = now
            self.out.print(f"[+{now - self.clock_start:.0f} s] {stage}: {done}/{total} ({now - started:.1f} s)",
                           highlight=False, soft_wrap=True)


def _summary(record: dict) -> Table:
    table = Table(title="tierprune result", show_header=False)
    table.add_row("model", str(record["model"]))
    if record["method"] == "none":
        table.add_row("method", "none: evaluated as it is")
    else:
        table.add_row("method / pattern", f"{record['method']} / {record['pattern']}")
    table.add_row("sparsity", f"{record['sparsity']:.4f}")
    table.add_row("tiers", ", ".join(f"{k} {v:.3f}" for k, v in record["tiers"].items()))
    if record.get("ppl") is not None:
        e = record["settings"]["eval"]
        table.add_row("perplexity", f"{record['ppl']:.3f}  ({e['data']}, seqlen {e['seqlen']}, "
                                    f"{record['eval_windows']} windows)")
    if record.get("zero_shot"):
        z = record["zero_shot"]
        limit = f", first {z['limit']} items each" if z["limit"] else ""
        for name, result in z["tasks"].items():
            table.add_row(f"zero-shot {name}", f"acc {result['acc']:.4f}  ({result['samples']} items)")
        table.add_row("zero-shot mean acc", f"{z['mean_acc']:.4f}  ({len(z['tasks'])} tasks, 0-shot{limit})")
    pruned = "" if record["method"] == "none" else f" (prune {record['prune_seconds']:.1f})"
    table.add_row("seconds", f"{record['seconds']:.1f}{pruned}")
    return table


def _check_output_folder(output: str, flag: str = "--output", named: str | None = None) -> None:
    """Refuse, in one line and before any work, a local --output that cannot become a folder we write into.

    Probed by creating the folder and a temporary file in it; folders the probe created are removed again,
    so a refused or failed command leaves nothing behind. Remote URIs (s3://, ...) are left to the writer.
    `named`: what the message names, when the folder is that of a file the flag gives (--json).
    """
    if "://" in output:
        from tierprune.storage.remote import probe

        probe(output, f"{flag} {named or output}")  # backend, credentials: before the work, not at its end
        return
    path = Path(output)
    if path.is_file():
        raise TierpruneError(f"{flag} {named}: its folder {output} is a file" if named
                             else f"{flag} {output} is a file; give a folder")
    created = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise TierpruneError(f"{flag} {named or output} cannot be written: {exc.strerror or exc}") from None
    finally:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break


def _run(cfg: TierpruneConfig, output: str | None, json_path: str | None) -> dict:
    from tierprune.tasks.oneshot import run_oneshot  # heavy imports (transformers) only when needed

    from tierprune.models import require_device

    require_device(cfg.device)
    if json_path and "://" in json_path:  # an fsspec URL: pathlib would collapse s3:// into a local folder s3:
        _check_output_folder(json_path.rsplit("/", 1)[0], "--json", json_path)
    elif json_path:
        if Path(json_path).is_dir():
            raise TierpruneError(f"--json {json_path} is a directory; give a file path")
        _check_output_folder(str(Path(json_path).parent), "--json", json_path)
    if output:
        _check_output_folder(output)
    with _progress_bars() as update:
        record = run_oneshot(cfg, output=output, progress=update)
    if json_path:
        from tierprune.storage.tables import save_file

        save_file(json.dumps(record, indent=2).encode(), json_path)  # atomic, local or any fsspec URL
    console.print(_summary(record))
    return record


# Flags that several commands take, written once (the same names, defaults and help).
_EVAL = typer.Option(None, "--eval", help="eval data spec, or 'none' [default: wikitext2]")
_EVAL_SEQLEN = typer.Option(2048, help="tokens per evaluation window")
_EVAL_MAX_WINDOWS = typer.Option(None, help="cap on evaluation windows (quick runs)")
_EVAL_BATCH_SIZE = typer.Option(1, help="windows per forward pass (speed only)")
_ZERO_SHOT = typer.Option(None, help="lm-eval tasks, comma list; 'wanda' = Wanda's seven")
_ZERO_SHOT_LIMIT = typer.Option(None, help="first N items of each zero-shot task (quick runs)")
_ZERO_SHOT_INCLUDE = typer.Option(None, help="folder of your own lm-eval task YAMLs")
_DEVICE = typer.Option("cpu", help="cpu | cuda | cuda:N")
_DTYPE = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")
_OFFLOAD = typer.Option(False, help="keep the model on the CPU, stream layers through the device")


@app.command()
def prune(
    model: str = typer.Option("smollm2-135m", help="hub id, local directory, .gguf file or alias"),
    gguf_file: Optional[str] = typer.Option(None, help="GGUF file inside --model's directory or hub repo"),
    method: str = typer.Option("wanda", help="wanda | magnitude | sparsegpt | none"),
    pattern: str = typer.Option("unstructured", help="unstructured | N:M (2:4, 4:8) | block | tiers"),
    sparsity: float = typer.Option(0.5, help="fraction pruned (unstructured, block, sparsegpt)"),
    block_size: int = typer.Option(16, help="block edge for block and tiers patterns"),
    tiers: str = typer.Option("0.35,0.45,0.20", help="dense,2:4,topk fractions of blocks (tiers pattern)"),
    topk: int = typer.Option(10, help="weights kept per TopK block (0: TopK blocks are removed entirely)"),
    select: str = typer.Option("wanda", help="survivors inside 2:4/TopK blocks by wanda score or magnitude"),
    scope: str = typer.Option("matrix", help="tier fractions per matrix, or global over the model"),
    calib: Optional[str] = typer.Option(None, help="calibration data spec [default: c4, or $TIERPRUNE_DATA]"),
    calib_samples: int = typer.Option(128, help="calibration sequences"),
    calib_seqlen: int = typer.Option(2048, help="tokens per calibration sequence"),
    calib_batch_size: int = typer.Option(8, help="sequences per forward pass (speed only)"),
    seed: int = typer.Option(0, help="calibration sampling seed"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the layers during calibration (faster on GPU)"),
    eval: Optional[str] = _EVAL,
    eval_seqlen: int = _EVAL_SEQLEN,
    eval_max_windows: Optional[int] = _EVAL_MAX_WINDOWS,
    eval_batch_size: int = _EVAL_BATCH_SIZE,
    zero_shot: Optional[str] = _ZERO_SHOT,
    zero_shot_limit: Optional[int] = _ZERO_SHOT_LIMIT,
    zero_shot_include: Optional[str] = _ZERO_SHOT_INCLUDE,
    device: str = _DEVICE,
    dtype: str = _DTYPE,
    offload: bool = _OFFLOAD,
    output: Optional[str] = typer.Option(None, help="save the pruned checkpoint and tier maps here"),
    json_path: Optional[str] = typer.Option(None, "--json", help="write the result record here"),
) -> None:
    """One-shot pruning and evaluation."""
    cfg = config_from_flags(
        model=model, gguf_file=gguf_file, dtype=dtype, method=method, pattern=pattern, sparsity=sparsity,
        block_size=block_size, tiers=tiers, topk=topk, select=select, scope=scope, calib=calib,
        calib_samples=calib_samples, calib_seqlen=calib_seqlen, calib_batch_size=calib_batch_size, seed=seed,
        compile=compile, eval=eval, eval_seqlen=eval_seqlen, eval_max_windows=eval_max_windows,
        eval_batch_size=eval_batch_size, device=device, offload=offload,
        zero_shot=zero_shot, zero_shot_limit=zero_shot_limit, zero_shot_include=zero_shot_include,
    )
    _run(cfg, output, json_path)


@app.command()
def evaluate(
    model: str = typer.Argument("smollm2-135m", help="a model folder (runs export, prune --output, or one convert "
                                                     "packed), hub id, .gguf file or alias"),
    gguf_file: Optional[str] = typer.Option(None, help="GGUF file inside the model's directory or hub repo"),
    dtype: str = _DTYPE,
    block_size: int = typer.Option(16, help="block edge of the tier report"),
    topk: int = typer.Option(10, help="most non-zeros a block may hold to count as TopK in the tier report"),
    eval: Optional[str] = _EVAL,
    eval_seqlen: int = _EVAL_SEQLEN,
    eval_max_windows: Optional[int] = _EVAL_MAX_WINDOWS,
    eval_batch_size: int = _EVAL_BATCH_SIZE,
    zero_shot: Optional[str] = _ZERO_SHOT,
    zero_shot_limit: Optional[int] = _ZERO_SHOT_LIMIT,
    zero_shot_include: Optional[str] = _ZERO_SHOT_INCLUDE,
    device: str = _DEVICE,
    offload: bool = _OFFLOAD,
    json_path: Optional[str] = typer.Option(None, "--json", help="write the result record here"),
) -> None:
    """Evaluate a model as it is: perplexity, zero-shot accuracy, sparsity and the tiers its zeros fit."""
    cfg = config_from_flags(
        model=model, gguf_file=gguf_file, dtype=dtype, method="none", block_size=block_size, topk=topk, eval=eval,
        eval_seqlen=eval_seqlen, eval_max_windows=eval_max_windows, eval_batch_size=eval_batch_size,
        zero_shot=zero_shot, zero_shot_limit=zero_shot_limit, zero_shot_include=zero_shot_include, device=device,
        offload=offload,
    )
    _run(cfg, None, json_path)


def _demo_data(data: str | None) -> tuple[str, str, str]:
    """(calibration spec, evaluation spec, label): local files, else the hub, else Python's help topics."""
    import os

    from tierprune.storage.datasets import default_data_spec, load_texts

    if data:
        if not Path(data).is_dir():
            raise TierpruneError(f"--data {data} is not a directory")
        os.environ["TIERPRUNE_DATA"] = data
    if os.environ.get("TIERPRUNE_DATA"):
        return default_data_spec("c4"), default_data_spec("wikitext2"), "local"
    try:
        load_texts("wikitext2", "test")
        load_texts("c4", "train")
        return "c4", "wikitext2", "hub"
    except TierpruneError:
        err_console.print("no --data and no hub: using Python's own help topics (pydoc_data) as the corpus — "
                          "a smoke run, NOT a benchmark")
        return "pydoc", "pydoc", "pydoc"


# Recovery that fits the demo's 10 minutes on 2 cores: full masked fine-tuning with distillation from the dense
# model at a constant 5e-4. At 8 steps an iteration this recovers more than the run defaults (1e-3, cosine,
# tuned for 1,500 steps on a GPU): README, "Recovery fine-tuning in the pipeline", has both measured.
# 81,920 tokens × the smoke plan's 0.1 epochs = 8,192 tokens (8 steps) per iteration.
DEMO_FINETUNE = {"ft_method": "full", "kd_weight": 1.0, "ft_lr": 5e-4, "ft_schedule": "constant", "ft_warmup": 0.0,
                 "ft_seqlen": 256, "ft_batch_size": 4, "ft_tokens": 81_920}
# Blocks ranked model-wide, after the first iteration by the Fisher of the fine-tuning before (README: on 2 CPU
# cores this took the demo's last iteration from ppl 171.2 per matrix by Wanda to 117.5).
DEMO_PRUNE = {"scope": "global", "saliency": "fisher"}


@app.command()
def demo(
    data: Optional[str] = typer.Option(None, help="folder with c4-subset/ and wikitext-2-raw/ [$TIERPRUNE_DATA]"),
    store: str = typer.Option("runs", help="where the demo run is stored (rerun to resume)"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    keep_checkpoints: Optional[int] = typer.Option(
        None, help="keep the checkpoints of only the last N finished iterations (as `tierprune run`)"),
) -> None:
    """The embedded default: progressive three tiers on SmolLM2-135M, the 3-iteration smoke plan."""
    from importlib.resources import files

    calib, evaluation, label = _demo_data(data)
    plan = str(files("tierprune.schedules") / "plans" / "smoke.csv")
    cfg = config_from_flags(calib=calib, calib_samples=16, calib_seqlen=512, eval=evaluation, eval_seqlen=512,
                            eval_max_windows=16, plan=plan, store=store, run=f"demo-{label}", device=device,
                            keep_checkpoints=keep_checkpoints, **DEMO_PRUNE, **DEMO_FINETUNE)
    console.print(f"[dim]demo ({label} data): plan {plan}; 16×512 calibration tokens, 16 evaluation windows "
                  f"of 512, {DEMO_FINETUNE['ft_tokens'] // 10:,} distillation tokens per iteration, blocks ranked "
                  "model-wide by Fisher after the first — a quick look, "
                  "not the protocol's numbers[/]")
    _progressive_run(cfg)


runs_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Inspect and manage stored runs.")
app.add_typer(runs_app, name="runs")


def _rows_table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title)
    # The fullest row sets the order: iteration 0 has no "ppl before ft", which belongs beside "ppl", not last.
    columns = list(dict.fromkeys(k for row in sorted(rows, key=len, reverse=True) for k in row)) or ["(none)"]
    for column in columns:
        # A URI or status is folded onto more lines rather than cut with "…": it must stay copyable.
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*["" if row.get(c) is None else f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                        for c in columns])
    return table


def _print_uris(rows: list[dict]) -> None:
    # Whole URIs on lines of their own (no wrapping by rich): a terminal or a script can copy them as they are.
    for row in rows:
        console.print(f"iteration {row['iteration']}: {row['uri']}", soft_wrap=True, highlight=False, markup=False)


def _progressive_run(cfg: TierpruneConfig, export: str | None = None) -> None:
    """Check everything cheap, then run the flow and print its table and what to do next."""
    from tierprune.tasks.run_state import NothingToDo, check_run_inputs

    try:
        warnings = check_run_inputs(cfg)
    except NothingToDo as exc:
        console.print(str(exc), highlight=False, soft_wrap=True)
        return
    for warning in warnings:
        err_console.print(f"warning: {warning}", highlight=False, soft_wrap=True, markup=False)
    if export:  # before the run, not after hours of it
        from tierprune.tasks.export import check_export_target, export_path

        export = export_path(export, cfg.run.name)
        _check_output_folder(export, "--export")
        check_export_target(export, cfg.model, flag="--export")
    if "://" not in cfg.run.store:
        Path(cfg.run.store).mkdir(parents=True, exist_ok=True)  # a local store folder is created on first use
    rows = _run_flow(cfg, export)
    console.print(_rows_table(f"run {_run_location(cfg.run.store, cfg.run.name)}", rows))
    if export:
        console.print(f"exported iteration {rows[-1]['iteration']} to {export}", highlight=False, soft_wrap=True)
    _print_next_steps(cfg.run.store, cfg.run.name)


def _run_flow(cfg, export: str | None = None) -> list[dict]:
    """The progressive flow in this process, one progress line per step, a server that dies with us."""
    from tierprune import lifecycle, progress
    from tierprune.flows.progressive import progressive_from_config

    lifecycle.guard_flow_process()
    with _progress_bars() as update, progress.reporting(update):
        return progressive_from_config(cfg, export)


def _run_location(store: str, run: str) -> str:
    """The run's folder as a URI that works from any directory (a local store made absolute)."""
    if "://" in store:
        return f"{store.rstrip('/')}/{run}"
    return str(Path(store).expanduser().resolve() / run)


def _print_next_steps(store: str, run: str) -> None:
    location = _run_location(store, run)
    for line in (f"run stored at {location}", "next:", f"  tierprune runs show {location}",
                 f"  tierprune runs export {location} --output DIR",
                 f"  tierprune convert {location} --output DIR"):
        console.print(line, soft_wrap=True, highlight=False, markup=False)


@app.command()
def run(
    plan: str = typer.Option(..., help="plan file: CSV (iteration,dense,mid_2_4,topk,...,epochs), YAML or JSON"),
    store: str = typer.Option(..., help="where runs live: a folder, file://, memory://, s3://, gs://"),
    run_name: str = typer.Option(..., "--run", help="this run's folder name under --store"),
    resume_from: Optional[str] = typer.Option(None, help="start after a finished iteration: STORE/RUN/iter-00K"),
    keep_checkpoints: Optional[int] = typer.Option(
        None, help="keep the checkpoints of only the last N finished iterations, deleting older ones as the "
        "run goes (as `runs prune --keep-last N`) [default: keep all]"),
    model: str = typer.Option("smollm2-135m", help="hub id, local directory, .gguf file or alias"),
    gguf_file: Optional[str] = typer.Option(None, help="GGUF file inside --model's directory or hub repo"),
    block_size: int = typer.Option(16),
    topk: int = typer.Option(10, help="weights kept per TopK block (0: TopK blocks are removed entirely)"),
    select: str = typer.Option("wanda"), scope: str = typer.Option("matrix"),
    saliency: str = typer.Option("wanda", help="rank blocks (and, with --select wanda, the weights they keep) by "
                                 "wanda |W|·sqrt(S), or by fisher |W|·sqrt(F): F the mean squared gradient of the "
                                 "previous iteration's fine-tuning (iterations with none before them use wanda)"),
    calib: Optional[str] = typer.Option(None, help="calibration data spec [default: c4, or $TIERPRUNE_DATA]"),
    calib_samples: int = typer.Option(128), calib_seqlen: int = typer.Option(2048),
    calib_batch_size: int = typer.Option(8), seed: int = typer.Option(0),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the layers during calibration"),
    eval: Optional[str] = _EVAL,
    eval_seqlen: int = typer.Option(2048), eval_max_windows: Optional[int] = typer.Option(None),
    eval_batch_size: int = typer.Option(1, help="windows per forward pass (speed only; PROTOCOL's is 1)"),
    zero_shot: Optional[str] = _ZERO_SHOT,
    zero_shot_limit: Optional[int] = _ZERO_SHOT_LIMIT,
    zero_shot_include: Optional[str] = _ZERO_SHOT_INCLUDE,
    device: str = typer.Option("cpu"), dtype: str = typer.Option("auto"),
    offload: bool = typer.Option(False, help="keep the model in CPU memory; calibration and evaluation stream its "
                                 "layers through the device (no fine-tuning then)"),
    ft_method: str = typer.Option("full", help="recovery between iterations: none | full (masked) | lora"),
    ft_data: Optional[str] = typer.Option(
        None, help="fine-tuning corpus spec [default: the calibration corpus minus the documents it drew]"),
    ft_tokens: int = typer.Option(2_457_600, help="training tokens per plan epoch (an iteration trains epochs × N)"),
    ft_seqlen: int = typer.Option(512),
    ft_batch_size: int = typer.Option(16, help="windows per forward; 32 on a large GPU (README: the same ppl in "
                                           "about a third less time, at about twice the memory)"),
    ft_lr: float = typer.Option(1e-3), ft_grad_accum: int = typer.Option(1, help="forwards per optimizer step"),
    ft_schedule: str = typer.Option("cosine", help="constant | cosine | linear, after the warm-up"),
    ft_warmup: float = typer.Option(0.05, help="warm-up as a fraction of an iteration's steps"),
    ft_train: str = typer.Option("linears", help="what full fine-tuning updates: linears | all_but_embeddings | all"),
    ft_commit_every: Optional[int] = typer.Option(
        None, help="optimizer steps between committed training states (resume); 0 = none; "
        "not given: by time (--ft-commit-minutes)"),
    ft_commit_minutes: float = typer.Option(10.0, help="minutes of training between committed training states "
                                            "when --ft-commit-every is not given; 0 = none"),
    ft_eval_every: int = typer.Option(0, help="optimizer steps between held-out losses (WikiText-2 valid); 0 = ends"),
    ft_patience: int = typer.Option(0, help="held-out losses without improvement before stopping; 0 = never"),
    ft_compile: bool = typer.Option(False, "--ft-compile",
                                    help="torch.compile the training forwards (GPU: launch-bound small models)"),
    ft_fade: float = typer.Option(0.0, help="fraction of an iteration's optimizer steps over which the weights its "
                                  "demotion removes fade to zero; 0 = removed at once"),
    obs_update: bool = typer.Option(False, "--obs-update",
                                    help="at each demotion, update the kept weights SparseGPT-style (OBS, from the "
                                    "calibration windows) to make up for the removed ones; one more calibration "
                                    "pass per iteration"),
    kd_weight: float = typer.Option(1.0, help="distillation from the dense model: 0 = cross-entropy only, 1 = KD only"),
    kd_temperature: float = typer.Option(1.0, help="softmax temperature of the logit distillation"),
    kd_hidden_weight: float = typer.Option(0.0, help="weight of a per-layer hidden-state loss against the dense model, "
                                           "added to the objective; 0 = none"),
    kd_cache_topk: int = typer.Option(0, help="0 = the teacher runs beside the student; K = store its top-K logits "
                                      "per position first and free it (memory short)"),
    lora_rank: int = typer.Option(16),
    lora_targets: str = typer.Option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                     help="module-name suffixes LoRA adapts (comma list)"),
    export: Optional[str] = typer.Option(None, help="once the plan is done, write its last iteration here as a "
                                         "model folder plain transformers loads (as `runs export`); {run} becomes the run's name"),
) -> None:
    """Progressive three-tier pruning as a Prefect flow; rerun the same command to resume after a crash."""
    cfg = config_from_flags(
        model=model, gguf_file=gguf_file, dtype=dtype, calib=calib, calib_samples=calib_samples,
        calib_seqlen=calib_seqlen, calib_batch_size=calib_batch_size, seed=seed, compile=compile, eval=eval,
        eval_seqlen=eval_seqlen, eval_max_windows=eval_max_windows, eval_batch_size=eval_batch_size, plan=plan,
        store=store, run=run_name,
        resume_from=resume_from, keep_checkpoints=keep_checkpoints, block_size=block_size, topk=topk, select=select,
        scope=scope, saliency=saliency, device=device,
        offload=offload, ft_method=ft_method, ft_data=ft_data, ft_tokens=ft_tokens, ft_seqlen=ft_seqlen, ft_batch_size=ft_batch_size,
        ft_lr=ft_lr, ft_grad_accum=ft_grad_accum, ft_schedule=ft_schedule, ft_warmup=ft_warmup, ft_train=ft_train,
        ft_commit_every=ft_commit_every, ft_commit_minutes=ft_commit_minutes,
        ft_eval_every=ft_eval_every, ft_patience=ft_patience, kd_weight=kd_weight, kd_temperature=kd_temperature,
        kd_hidden_weight=kd_hidden_weight, kd_cache_topk=kd_cache_topk, ft_compile=ft_compile, ft_fade=ft_fade,
        obs_update=obs_update, lora_rank=lora_rank,
        lora_targets=lora_targets,
        zero_shot=zero_shot, zero_shot_limit=zero_shot_limit, zero_shot_include=zero_shot_include)
    _progressive_run(cfg, export)


@runs_app.command("list")
def runs_list(store: str = typer.Argument(..., help="the --store of the runs")) -> None:
    """The runs under a store, with their last finished iteration."""
    from tierprune.tasks.runs import list_runs

    console.print(_rows_table(f"runs in {store}", list_runs(store)))


@runs_app.command("show")
def runs_show(run_uri: str = typer.Argument(..., help="STORE/RUN"),
              as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """A run's finished iterations: status (files hashed), tier fractions, sparsity, perplexity, recovery in % of
    dense, zero-shot accuracy, seconds; full URIs."""
    from tierprune.tasks.runs import split_run_uri, summary_json

    summary = summary_json(split_run_uri(run_uri))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    zero_shot = any(r["zero_shot"] for r in summary["iterations"])
    rows = [{"iteration": r["iteration"], "status": r["status"],
             **{f"tier {t}": v for t, v in (r["tiers"] or {}).items()},
             "sparsity": r["sparsity"], "ppl before ft": r["ppl_before_finetune"], "ppl": r["ppl"],
             "recovery %": r["recovery_pct"],
             **({"zero-shot acc": (r["zero_shot"] or {}).get("mean_acc"),
                 "zero-shot recovery %": (r["recovery"] or {}).get("zero_shot_mean_acc")} if zero_shot else {}),
             "ft tokens": r["finetune_tokens"], "seconds": r["seconds"]} for r in summary["iterations"]]
    console.print(_rows_table(f"run {summary['run']}", rows))
    reasons = {r["recovery"]["reason"] for r in summary["iterations"] if r["recovery"] and r["recovery"]["reason"]}
    for reason in sorted(reasons):
        console.print(f"no recovery %: {reason}", soft_wrap=True, highlight=False, markup=False)
    _print_uris(summary["iterations"])
    pending = summary["in_progress"]
    if pending:
        training = (f"; fine-tuning committed at step {pending['finetune_step']} of {pending['finetune_steps']}"
                    if pending["finetune_step"] else "")
        console.print(f"iteration {pending['iteration']}: unfinished, committed {', '.join(pending['steps'])}"
                      f"{training}; rerun the run's command to resume", soft_wrap=True, highlight=False, markup=False)
    elif summary["plan_last_iteration"] is not None and not summary["done"]:
        last = summary["iterations"][-1]["iteration"] if summary["iterations"] else None
        console.print(f"the plan runs to iteration {summary['plan_last_iteration']}, and "
                      f"{'none has' if last is None else f'iteration {last} is the last that'} finished; rerun the "
                      "run's command to resume", soft_wrap=True, highlight=False, markup=False)


@runs_app.command("export")
def runs_export(run_uri: str = typer.Argument(..., help="STORE/RUN"),
                output: str = typer.Option(..., help="folder to write (transformers' from_pretrained layout)"),
                iteration: Optional[int] = typer.Option(None, help="which finished iteration [default: the last]")) -> None:
    """Write a finished iteration as a model folder that plain transformers loads, with its tier maps and masks."""
    from tierprune.tasks.export import export_run
    from tierprune.tasks.runs import split_run_uri

    _check_output_folder(output)
    done = export_run(split_run_uri(run_uri), output, iteration)
    ppl = "n/a" if done["ppl"] is None else f"{done['ppl']:.4g}"
    console.print(f"exported iteration {done['iteration']} of {run_uri} to {output} ({done['dtype']}, "
                  f"sparsity {done['sparsity']:.4f}, ppl {ppl})")


@runs_app.command("verify")
def runs_verify(run_uri: str = typer.Argument(..., help="STORE/RUN")) -> None:
    """Hash every file of every step: committed, damaged (a file missing or differing) or missing (no COMMIT.json).

    Exit status 1 if any step (or the manifest) is not intact.
    """
    from tierprune.tasks.runs import split_run_uri, verify_run

    statuses = verify_run(split_run_uri(run_uri))
    table = Table(title=f"run {run_uri}")
    for column in ("step", "status", "detail"):
        table.add_column(column, overflow="fold")
    for s in statuses:
        style = "" if s.status == "committed" else "red"
        table.add_row(s.step, Text(s.status, style=style), s.detail)
    console.print(table)
    bad = [s for s in statuses if s.status != "committed"]
    console.print(f"{len(statuses) - len(bad)} committed, {len(bad)} damaged or missing", highlight=False)
    if bad:
        raise typer.Exit(1)


@runs_app.command("prune")
def runs_prune(
    run_uri: str = typer.Argument(..., help="STORE/RUN"),
    keep_last: int = typer.Option(1, "--keep-last", help="finished iterations whose checkpoints stay"),
    dry_run: bool = typer.Option(False, "--dry-run", help="say what would be deleted and freed; delete nothing"),
) -> None:
    """Delete the checkpoints of a finished run's iterations but the last --keep-last, to free disk.

    Records, tier maps, masks and evaluations stay (`runs show` lists every iteration); the kept iterations
    still export and resume, and the run's command run again goes on after its last finished iteration.
    """
    from tierprune.tasks.runs import prune_checkpoints, split_run_uri

    done = prune_checkpoints(split_run_uri(run_uri), keep_last, dry_run)
    gib = done["bytes"] / 2**30
    if not done["steps"] and not done["blobs"]:
        console.print(f"nothing to prune in {run_uri}: the checkpoints left are those of iterations "
                      f"{', '.join(map(str, done['kept']))}", highlight=False, soft_wrap=True)
        return
    what = f"iterations {', '.join(map(str, done['pruned']))}" if done["pruned"] else "no iteration"
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} the checkpoints of {what} of {run_uri} ({len(done['steps'])} steps, {done['blobs']} "
                  f"tensor files, {gib:.2f} GiB); kept: iterations {', '.join(map(str, done['kept']))}",
                  highlight=False, soft_wrap=True)


@runs_app.command("repair")
def runs_repair(run_uri: str = typer.Argument(..., help="STORE/RUN")) -> None:
    """Rebuild a missing or garbled manifest.json from RUN.json and the steps' COMMIT.json (old one kept as .bak)."""
    from tierprune.tasks.runs import split_run_uri

    store = split_run_uri(run_uri)
    with store.lock(owner="tierprune runs repair"):
        result = store.repair()
    if result["unchanged"]:
        console.print(f"{store.uri}/manifest.json already lists exactly the {result['steps']} committed steps: "
                      "nothing to repair", highlight=False, soft_wrap=True)
        return
    backup = f"; the previous manifest is kept as {result['backup']}" if result["backup"] else ""
    console.print(f"rebuilt {store.uri}/manifest.json with {result['steps']} committed steps{backup}",
                  highlight=False, soft_wrap=True)


@runs_app.command("unlock")
def runs_unlock(
    run_uri: str = typer.Argument(..., help="STORE/RUN"),
    force: bool = typer.Option(False, "--force", help="also break a lock held from another host"),
) -> None:
    """Break the writer lock of a run whose writer is gone.

    A lock whose process still runs on this host is never broken. A lock held from another host is broken only
    with --force (this host cannot see whether that process is alive); a dead process of this host's is just
    removed.
    """
    from tierprune.tasks.runs import split_run_uri

    store = split_run_uri(run_uri)
    holder = store.lock_holder()
    if holder is None:
        console.print("the run was not locked")
        return
    state = store.lock_state()
    who = (f"{holder.get('owner', 'an unknown writer')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
           f"since {holder.get('since', '?')})")
    if state == "alive":
        raise TierpruneError(f"run {store.uri} is locked by {who}, which is still running on this host; "
                             "stop that process first (it releases the lock when it ends)")
    if state == "foreign" and not force:
        raise TierpruneError(f"run {store.uri} is locked by {who}; this host cannot tell whether that process is "
                             f"alive: if it is gone, break the lock with `tierprune runs unlock {run_uri} --force`")
    if not store.break_lock(token=holder.get("token")):
        raise TierpruneError(f"the lock of run {store.uri} changed while looking at it; run the command again")
    reason = "its process no longer exists" if state == "dead" else "--force"
    console.print(f"removed the lock of {who} from {store.uri} ({reason})", highlight=False, soft_wrap=True)


@app.command()
def serve(
    tz: Optional[str] = typer.Option(None, help="IANA time zone of the overnight schedule [default: this machine's]"),
    at: str = typer.Option("22:00", help="time of day of the overnight run, HH:MM"),
    store: str = typer.Option("runs", help="the run store the progressive forms propose (on this machine)"),
    overnight_plan: str = typer.Option("smoke", help="the overnight run's plan (a shipped plan's name, a path or URL)"),
    overnight_export: Optional[str] = typer.Option(None, help="where each night's run writes its model folder; "
                                                   "{run} becomes the run's name, e.g. models/{run}"),
    limit: Optional[int] = typer.Option(None, help="flow runs at most at once [default: no limit; GPUs are "
                                                   "shared one run at a time anyway]"),
) -> None:
    """Serve the deployments (progressive/manual, progressive/overnight, oneshot/manual, evaluate/manual) from
    this process, against the Prefect server at $PREFECT_API_URL; runs execute here. Ctrl-C stops."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # from the environment or the active Prefect profile
        raise TierpruneError("tierprune serve needs a Prefect server: start one with `prefect server start` and set "
                             "PREFECT_API_URL=http://127.0.0.1:4200/api")
    from prefect import serve as prefect_serve

    from tierprune.schedules.deployments import deployments

    overnight = {"plan": overnight_plan, **({"export": overnight_export} if overnight_export else {})}
    served = deployments(tz=tz, at=at, store=store, overnight=overnight)
    prefect_serve(*served, limit=limit)


@app.command()
def convert(source: str = typer.Argument(..., help="STORE/RUN, a folder written by `tierprune runs export` or "
                                                   "`prune --output`, or any pruned model: a folder or a --model "
                                                   "name such as a hub id (tiers then inferred from its zeros)"),
            output: str = typer.Option(..., help="folder to write: config, tokenizer, hybrid.safetensors, hybrid.json"),
            iteration: Optional[int] = typer.Option(None, help="which finished iteration of a run [default: the last]"),
            topk: Optional[int] = typer.Option(None, help="weights per TopK block [default: the run's; for an export "
                                                          "folder, the most non-zeros of any TopK block; for a "
                                                          "folder without tier maps, 10]"),
            dense: bool = typer.Option(False, "--dense", help="also write model.safetensors (dense, zeros where "
                                                              "pruned) so that plain transformers loads the folder"),
            dtype: str = typer.Option("stored", help="stored (the source's), bfloat16, float16 or float32: e.g. a CPU "
                                                     "run's fp32 weights packed in bf16, as the GPU kernels run")) -> None:
    """Pack a pruned model's linears in the hybrid Dense / 2:4 / TopK format (HybridLinear layers)."""
    from tierprune.tasks.convert import convert as convert_model

    _check_output_folder(output)
    done = convert_model(source, output, iteration, topk=topk, dense=dense, dtype=dtype)
    mib = 2 ** 20
    which = "" if done["iteration"] is None else f" (iteration {done['iteration']})"
    if done["tiers_from"] == "zeros":  # say what was inferred: a user may have expected another split
        dense_f, nm_f, topk_f = done["tiers"]
        console.print(f"{source} has no tier maps: each 16x16 block gets the cheapest tier that holds its zeros "
                      f"(dense {dense_f:.3f}, 2:4 {nm_f:.3f}, topk {topk_f:.3f} of the blocks)",
                      highlight=False, soft_wrap=True)
    console.print(f"converted {done['modules']} linears of {source}{which} to {output}: packed "
                  f"{done['packed_bytes'] / mib:.2f} MiB vs dense {done['dense_bytes'] / mib:.2f} MiB "
                  f"({done['packed_bytes'] / max(done['dense_bytes'], 1):.3f}x; {done['block_size']}x"
                  f"{done['block_size']} blocks, topk {done['topk']}, {done['dtype']})", highlight=False, soft_wrap=True)
    for line in ("next:", f"  tierprune generate {output} --compare-dense", f"  tierprune evaluate {output}"):
        console.print(line, soft_wrap=True, highlight=False, markup=False)


@app.command()
def generate(folder: str = typer.Argument(..., help="a folder from `tierprune convert` (runs packed), any model "
                                                   "folder (`runs export`, `prune --output`), or a --model name "
                                                   "(the dense original)"),
             prompt: str = typer.Option("The capital of France is", help="text to continue"),
             max_new_tokens: int = typer.Option(32, min=1, help="tokens to generate (greedy, batch 1)"),
             device: str = typer.Option("cpu", help="cpu, cuda or cuda:N"),
             dtype: str = typer.Option("stored", help="stored (the folder's), bfloat16, float16 or float32; the GPU "
                                                      "kernels run bfloat16 and float16"),
             compare_dense: bool = typer.Option(False, "--compare-dense",
                                                help="also run a packed folder's dense twin (zeros where pruned) on "
                                                     "the same prompt: tokens/s side by side, and whether the "
                                                     "tokens agree"),
             compile: bool = typer.Option(False, "--compile",
                                          help="decode as serving stacks do: a static KV cache and the decode step "
                                               "through torch.compile (CUDA graphs on a GPU); the first, untimed "
                                               "generation compiles")) -> None:
    """Continue a prompt with a model folder and time it: how fast a packed model decodes on this machine."""
    from tierprune.models import require_device
    from tierprune.tasks.generate import generate_timed, load_for_generation

    require_device(device)
    runs = []
    for twin in ([False, True] if compare_dense else [False]):
        model, tokenizer, kind = load_for_generation(folder, device, dense_twin=twin, dtype=dtype)
        runs.append(generate_timed(model, tokenizer, prompt, max_new_tokens, kind, compile=compile))
        del model  # one model in memory at a time
    console.print(f"{escape(prompt)}[bold]{escape(runs[0].text)}[/bold]", soft_wrap=True, highlight=False)
    for run in runs:
        console.print(f"{run.kind}: {len(run.token_ids)} new tokens in {run.seconds:.2f} s, "
                      f"{run.tokens_per_s:.2f} tokens/s (greedy, batch 1, {device}, prefill included"
                      f"{', compiled' if compile else ''})",
                      highlight=False, soft_wrap=True)
    if compare_dense:
        packed, twin = runs
        same = "yes" if packed.token_ids == twin.token_ids else "no (bf16/fp16 kernels round differently)"
        console.print(f"packed / dense twin tokens/s: {packed.tokens_per_s / twin.tokens_per_s:.3f}x; "
                      f"the same tokens: {same}", highlight=False, soft_wrap=True)


def default_prefect_home(environ: dict[str, str], cwd: Path) -> str | None:
    """Where Prefect keeps its state for the CLI, unless the environment or a project's config says where.

    None when PREFECT_HOME is set, or a prefect.toml (or pyproject.toml's [tool.prefect]) in cwd sets `home`;
    else a folder of tierprune's cache ($TIERPRUNE_CACHE or ~/.cache/tierprune), not the shared ~/.prefect.
    """
    import tomllib

    if environ.get("PREFECT_HOME"):
        return None
    for name, keys in (("prefect.toml", ()), ("pyproject.toml", ("tool", "prefect"))):
        path = cwd / name
        if not path.is_file():
            continue
        try:
            table = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue  # not ours to judge: Prefect reports its own config errors
        for key in keys:
            table = table.get(key, {}) if isinstance(table, dict) else {}
        if isinstance(table, dict) and "home" in table:
            return None
    cache = environ.get("TIERPRUNE_CACHE") or str(Path.home() / ".cache" / "tierprune")
    return str(Path(cache) / "prefect")


def _quiet_prefect_console(environ: dict[str, str]) -> None:
    # Prefect's console handler prints every task's start and end (~56 lines for the demo) and the tracebacks of
    # crashed tasks; the CLI shows progress bars and one error line instead. Logs still go to the Prefect API
    # (the UI shows them); PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL=INFO brings them back to the terminal.
    import logging

    environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    # tierprune's own warnings (a stale lock broken, a rebuilt manifest) still reach the terminal, one line each.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    tierprune_logger = logging.getLogger("tierprune")
    tierprune_logger.addHandler(handler)
    tierprune_logger.propagate = False


def main() -> None:
    import os

    from .lifecycle import Terminated, run_cleanups, termination_message, write_error_line

    # Our own rich bars report progress; transformers' tqdm bars (loading/writing weights) would only add
    # noise to stderr, which for bad input must be one line. Warnings stay on. Set before it is imported.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    prefect_home = default_prefect_home(os.environ, Path.cwd())
    if prefect_home:
        try:
            Path(prefect_home).mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level itself
        except OSError:
            pass  # Prefect then says what it could not create
        os.environ["PREFECT_HOME"] = prefect_home
    _quiet_prefect_console(os.environ)
    # The project's prefect.toml, for runs started outside the repository: no telemetry, a patient
    # ephemeral server, no task caching unless a task brings its own key.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    os.environ.setdefault("PREFECT_TASKS_DEFAULT_NO_CACHE", "true")
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # typer's (vendored click's) usage errors
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()  # a bare command prints its help
        else:
            # Bad flags or values: one line too, not click's usage box.
            _print_error(exc.format_message())
        sys.exit(getattr(exc, "exit_code", 2))
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(1)
    except TierpruneError as exc:
        _print_error(str(exc))
        sys.exit(2)
    except Terminated as exc:
        # SIGTERM/SIGINT during a flow (tierprune.lifecycle): the unwinding released the lock and removed
        # temporary files; exit now, without Prefect's exit hooks that would wait on its server.
        run_cleanups()
        write_error_line(termination_message(exc.signal_name))
        os._exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        from tierprune.storage.remote import environment_error

        line = environment_error(exc)  # a remote store's backend or credentials: the user's setup, one line
        if line is None:
            raise
        _print_error(line)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
