"""Recovery fine-tuning that keeps the pruning masks exact: full (masked) or LoRA, with distillation.

Plain functions, no Prefect, no storage: the caller hands in a model, the keep-masks of its
pruned linears (module name -> bool (out, in), as `weight_view` sees the weight), token windows and
a `FinetuneConfig`, and may pass a `TrainState` back in to resume. Everything is deterministic
given `cfg.seed` on the CPU, and a run resumed from a saved state is bit-identical to one that
never stopped (same machine, same thread count).

Read top to bottom: config, data (windows, calibration replay, disjointness), losses, masks,
LoRA, resumable state, the training loop.
"""
from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tierprune.adapters import weight_view
from tierprune.config import FinetuneConfig
from tierprune.errors import TierpruneError

from .calibration import sample_calibration
from .prune import named_linears

__all__ = [
    "FinetuneConfig", "FinetuneResult", "TrainState", "TeacherTopK",
    "iteration_tokens", "corpus_stream", "draw_windows", "finetune_windows", "calibration_doc_indices", "check_disjoint",
    "distillation_loss", "topk_distillation_loss", "hidden_state_loss", "teacher_topk_logits",
    "apply_masks_", "masks_applied", "fade_factor", "mask_gradients", "wrap_lora", "merge_lora_", "finetune_model_",
    "mean_squared_gradients",
]




def iteration_tokens(cfg: FinetuneConfig, epochs: float) -> int:
    """Training tokens of an iteration whose plan row says `epochs` (0 = no fine-tuning; 0.1 is a tenth of N)."""
    if not epochs >= 0:
        raise TierpruneError(f"plan epochs must be >= 0, got {epochs}")
    return 0 if cfg.method == "none" else round(epochs * cfg.tokens_per_epoch)


# ----------------------------------------------------------------------------------------------- data

class _RecordingTokenizer:
    """Passes calls through and remembers the length of every text tokenized."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, {}

    def __call__(self, text: str, *args, **kwargs):
        out = self.tokenizer(text, *args, **kwargs)
        self.lengths[text] = out.input_ids.shape[-1]
        return out


def calibration_doc_indices(texts: list[str], tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> list[int]:
    """Sorted indices of the documents whose windows the reference calibration draw takes.

    Replays tasks.calibration.sample_calibration itself (not a copy of it), recording what it
    tokenizes: a drawn document longer than seqlen is always used, a shorter one never is. Every
    copy of a used text counts as used, since a duplicate would leak the same window.
    """
    recorder = _RecordingTokenizer(tokenizer)
    sample_calibration(texts, recorder, nsamples, seqlen, seed)
    used = {text for text, n in recorder.lengths.items() if n > seqlen}
    return [i for i, text in enumerate(texts) if text in used]


CORPUS_TOKENIZE_BATCH = 1024  # documents per tokenizer call: bounds the encodings held at once


def corpus_stream(texts: list[str], tokenizer, exclude_docs: Iterable[int] = ()) -> torch.Tensor:
    """The documents not in exclude_docs, tokenized in index order and joined with the EOS token (if any): (T,)."""
    excluded = set(exclude_docs)
    kept = [t for i, t in enumerate(texts) if i not in excluded and t.strip()]
    if not kept:
        raise TierpruneError(f"no fine-tuning documents left ({len(texts)} in the corpus, {len(excluded)} excluded)")
    eos = getattr(tokenizer, "eos_token_id", None)
    tail = [] if eos is None else [eos]
    chunks = []
    # Batched: a fast tokenizer encodes a batch in parallel, and no tensor is made per document (one call per
    # document with return_tensors spent most of a test run's 8 s here). The ids are the same as one by one.
    # Each batch becomes a tensor at once, so Python ints (~36 bytes each) never hold more than one batch.
    for start in range(0, len(kept), CORPUS_TOKENIZE_BATCH):
        pieces = tokenizer(kept[start:start + CORPUS_TOKENIZE_BATCH])["input_ids"]
        chunks.append(torch.tensor([i for piece in pieces for i in (*piece, *tail)], dtype=torch.long))
    return torch.cat(chunks)


def draw_windows(stream: torch.Tensor, seqlen: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """(n_tokens // seqlen, seqlen) non-overlapping windows of stream (remainder dropped), in a seeded random
    order; a budget larger than the corpus takes further passes, each in a new order."""
    if n_tokens < 0:
        raise TierpruneError(f"fine-tuning tokens must be >= 0, got {n_tokens}")
    n_windows = n_tokens // seqlen
    if n_windows == 0:
        return torch.empty(0, seqlen, dtype=torch.long)
    available = stream.numel() // seqlen
    if available == 0:
        raise TierpruneError(f"the fine-tuning corpus has {stream.numel()} tokens, fewer than one window of {seqlen}")
    windows = stream[: available * seqlen].view(available, seqlen)
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(available, generator=gen) for _ in range(math.ceil(n_windows / available))])
    return windows[order[:n_windows]].contiguous()


def finetune_windows(texts: list[str], tokenizer, seqlen: int, n_tokens: int, exclude_docs: Iterable[int] = (),
                     seed: int = 0) -> torch.Tensor:
    """(n_tokens // seqlen, seqlen) token ids from the documents not in exclude_docs (corpus_stream, draw_windows)."""
    if n_tokens // seqlen <= 0:
        return draw_windows(torch.empty(0, dtype=torch.long), seqlen, n_tokens, seed)
    return draw_windows(corpus_stream(texts, tokenizer, exclude_docs), seqlen, n_tokens, seed)


_WORD = re.compile(r"\w+")


def _normalised_words(text: str) -> list[str]:
    # WikiText writes "1 @,@ 000" and "well @-@ known"; dropping punctuation and case makes a copy of a
    # document match whether or not it went through that tokenization.
    return _WORD.findall(text.replace("@-@", "-").replace("@,@", ",").replace("@.@", ".").lower())


def check_disjoint(ft_texts: Sequence[str], eval_texts: Sequence[str], *, ngram: int = 13,
                   min_words: int = 8) -> None:
    """Refuse (one-line TierpruneError) fine-tuning documents that share text with the evaluation text.

    A document is refused when its normalised words (lower case, no punctuation) equal an
    evaluation row's (rows of at least min_words words), or when it shares any span of `ngram`
    consecutive words with the evaluation text (13, the GPT-3 contamination test's span).
    """
    eval_rows = {" ".join(w) for w in map(_normalised_words, eval_texts) if len(w) >= min_words}
    eval_words = _normalised_words("\n".join(eval_texts))
    eval_spans = {hash(" ".join(eval_words[i:i + ngram])) for i in range(len(eval_words) - ngram + 1)}
    bad, first_reason = [], ""
    for i, text in enumerate(ft_texts):
        words = _normalised_words(text)
        if len(words) >= min_words and " ".join(words) in eval_rows:
            bad.append(i)
            first_reason = first_reason or f"document {i} equals an evaluation row"
            continue
        for j in range(len(words) - ngram + 1):
            if hash(" ".join(words[j:j + ngram])) in eval_spans:
                bad.append(i)
                first_reason = first_reason or f"document {i} shares a {ngram}-word span with it"
                break
    if bad:
        raise TierpruneError(f"the fine-tuning data overlaps the evaluation text: {len(bad)} of {len(ft_texts)} "
                             f"documents ({first_reason}); fine-tune on a corpus disjoint from the evaluation split")


# --------------------------------------------------------------------------------------------- losses

def _shifted_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # logits (B, L, V), ids (B, L): next-token cross-entropy over the L-1 shifted positions, in fp32.
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """T²·KL(teacher ‖ student) of the softened distributions, mean over positions; logits (B, L, V).

    The T² factor keeps gradient sizes comparable across temperatures (Hinton et al., 2015).
    """
    s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)  # (N, V)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def topk_distillation_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                           temperature: float = 1.0) -> torch.Tensor:
    """distillation_loss against cached top-k teacher logits (B, L, k): the teacher renormalised on its top k.

    The student keeps its full softmax, so its mass outside the teacher's top k is pushed down.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, L, V)
    s_top = s.gather(-1, teacher_indices.long())  # (B, L, k)
    t = F.log_softmax(teacher_values.float() / temperature, dim=-1)  # (B, L, k)
    return (t.exp() * (t - s_top)).sum(-1).mean() * temperature ** 2


def hidden_state_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of MSE(student, teacher) / mean(teacher²); hidden states (B, L, d).

    Normalised per layer because the residual stream grows with depth: plain MSE would be all
    last-layer error.
    """
    losses = [F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12)
              for s, t in zip(student_hidden, teacher_hidden, strict=True)]
    return torch.stack(losses).mean()


@dataclass
class TeacherTopK:
    """Cached teacher logits: the k largest per position, for windows in the order of the train ids."""

    values: torch.Tensor  # (n, L, k) float
    indices: torch.Tensor  # (n, L, k) int32


@torch.no_grad()
def teacher_topk_logits(teacher: nn.Module, ids: torch.Tensor, k: int, batch_size: int = 8) -> TeacherTopK:
    """The teacher's top-k logits for windows ids (n, L): to store when the teacher does not fit beside the student."""
    if k < 1:
        raise TierpruneError(f"top-k for cached teacher logits must be >= 1, got {k}")
    device = _device_of(teacher)
    values, indices = [], []
    was_training = teacher.training
    teacher.eval()
    for start in range(0, ids.shape[0], batch_size):
        x = ids[start:start + batch_size].to(device)
        with _autocast(device):
            logits = teacher(x, use_cache=False).logits  # (b, L, V)
        top = logits.float().topk(min(k, logits.shape[-1]), dim=-1)
        values.append(top.values.cpu())
        indices.append(top.indices.to(torch.int32).cpu())
    teacher.train(was_training)
    return TeacherTopK(torch.cat(values), torch.cat(indices))


# ---------------------------------------------------------------------------------------------- masks

def _is_transposed(module: nn.Module) -> bool:
    # weight_view is a transpose for GPT-2's Conv1D (weight (in, out)); strides tell, even for square ones.
    return weight_view(module).stride() != module.weight.data.stride()


def _resolve_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """name -> (module, mask shaped like module.weight) after checking names, shapes and dtype."""
    modules = dict(model.named_modules())
    resolved = {}
    for name, mask in masks.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise TierpruneError(f"mask for {name!r}, which is not a module with a weight in this model")
        W = weight_view(module)
        if tuple(mask.shape) != tuple(W.shape) or mask.dtype != torch.bool:
            raise TierpruneError(f"mask for {name} is {mask.dtype} {tuple(mask.shape)}; "
                                 f"the weight is (out, in) {tuple(W.shape)}, a bool mask is needed")
        mask = mask.to(module.weight.device)
        # The parameter itself, not its (out, in) view, is what gradients and optimizers see.
        resolved[name] = (module, (mask.t() if _is_transposed(module) else mask).contiguous())
    return resolved


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero, in place, every weight whose keep-mask (out, in) is False."""
    _zero_pruned_([(module, ~keep) for module, keep in _resolve_masks(model, masks).values()])


@torch.no_grad()
def _zero_pruned_(pruned_positions: list[tuple[nn.Module, torch.Tensor]]) -> None:
    # (module, True where pruned), shaped like module.weight
    for module, pruned in pruned_positions:
        module.weight.masked_fill_(pruned, 0)


@contextmanager
def masks_applied(model: nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside: the weights the keep-masks remove are zero. After: they are back, bit for bit."""
    resolved = _resolve_masks(model, masks)
    with torch.no_grad():
        removed = [(module, ~keep, module.weight.masked_select(~keep)) for module, keep in resolved.values()]
        for module, pruned, _ in removed:
            module.weight.masked_fill_(pruned, 0)
    try:
        yield
    finally:
        with torch.no_grad():
            for module, pruned, values in removed:
                module.weight.masked_scatter_(pruned, values)


def fade_factor(step: int, fade_steps: int) -> float:
    """How much of a removed weight is left after `step` optimizer steps: 1 → 0 linearly over fade_steps."""
    return max(0.0, 1.0 - step / fade_steps) if fade_steps else 0.0


@torch.no_grad()
def _set_fading_(pruned_positions: list[tuple[nn.Module, torch.Tensor]], fading: list[torch.Tensor],
                 factor: float) -> None:
    """Every pruned weight zero, then the ones still fading at `factor` of their value before the demotion.

    fading[i] is zero except where the i-th module's demotion removed a weight (two in-place passes: no
    temporaries and no host sync, where indexing by a mask would wait for the device every step).
    """
    _zero_pruned_(pruned_positions)
    if factor > 0:
        for (module, _), removed in zip(pruned_positions, fading):
            module.weight.add_(removed, alpha=factor)


def mask_gradients(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that zero the gradient of every pruned weight; remove them with handle.remove()."""
    handles = []
    for module, param_mask in _resolve_masks(model, masks).values():
        handles.append(module.weight.register_hook(lambda g, m=param_mask: g.masked_fill(~m, 0)))
    return handles


# ----------------------------------------------------------------------------------------------- LoRA

def _lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def _masked_lora_forward(layer: nn.Module, param_mask: torch.Tensor | None) -> Callable[..., torch.Tensor]:
    """A forward for one peft LoRA linear computing x·((W + s·BA) ⊙ M)ᵀ: the function merge_lora_ produces.

    Masking the update during training (not only at the merge) means the merge changes nothing the
    model computes: a plain LoRA trains a dense W + BA and then loses part of it to the mask.
    """
    base = layer.get_base_layer()
    conv1d = _is_transposed(base)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        weight = base.weight
        for adapter in layer.active_adapters:
            delta = layer.get_delta_weight(adapter)  # laid out like base.weight
            weight = weight + (delta if param_mask is None else delta.masked_fill(~param_mask, 0))
        x = x if torch.is_autocast_enabled(x.device.type) else x.to(weight.dtype)
        if conv1d:  # GPT-2's Conv1D: y = x·W + b with W (in, out)
            out = x @ weight
            return out + base.bias if base.bias is not None else out
        return F.linear(x, weight, base.bias)

    return forward


def wrap_lora(model: nn.Module, masks: dict[str, torch.Tensor], cfg: FinetuneConfig) -> nn.Module:
    """The model with peft LoRA adapters on cfg.lora_targets whose updates respect the masks; undo with merge_lora_.

    peft injects the adapters into `model` itself and returns its PeftModel wrapper; only the
    adapters require gradients.
    """
    from peft import LoraConfig, get_peft_model

    mask_by_module = {id(module): m for module, m in _resolve_masks(model, masks).values()}
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                        lora_dropout=0.0, bias="none")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise TierpruneError(f"LoRA targets {list(cfg.lora_targets)}: {str(e).splitlines()[0]}") from e
    for layer in _lora_layers(peft_model).values():
        layer.forward = _masked_lora_forward(layer, mask_by_module.get(id(layer.get_base_layer())))
    return peft_model


def merge_lora_(peft_model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Fold the adapters into the weights (W + s·BA), re-apply the masks, return the plain model.

    The merged model has exactly the masks' zeros: no pruned weight comes back.
    """
    for layer in _lora_layers(peft_model).values():
        layer.__dict__.pop("forward", None)  # back to peft's own forward before peft unloads the layer
    model = peft_model.merge_and_unload()
    apply_masks_(model, masks)
    return model


# ------------------------------------------------------------------------------------- resumable state

@dataclass
class TrainState:
    """Everything needed to continue an interrupted fine-tuning bit-identically.

    `tensors` holds the trainable parameters as they are (full weights, or the LoRA adapters),
    the optimizer's per-parameter state and the RNG states; `meta` is JSON-able (step, data cursor,
    scheduler, loss curve, early-stopping counters, a fingerprint of the run it belongs to).
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def as_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able metadata), as the run store saves them."""
        return dict(self.tensors), dict(self.meta)

    @classmethod
    def from_dicts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> TrainState:
        return cls(dict(tensors), dict(meta))


def _fingerprint(cfg: FinetuneConfig, train_ids: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    # Enough to refuse resuming a state into a different run; not a hash of the data itself. How often states
    # are committed and whether the forwards are compiled change how the run goes, not what it trains.
    return {"config": cfg.model_dump(mode="json", exclude={"commit_every", "commit_minutes", "compile"}),
            "train_shape": list(train_ids.shape), "train_sum": int(train_ids.sum()), "masked_modules": sorted(masks)}


def _capture_state(trainables: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LambdaLR, meta: dict[str, Any]) -> TrainState:
    tensors = {f"param/{n}": p.detach().to("cpu", copy=True).contiguous() for n, p in trainables.items()}
    opt = optimizer.state_dict()
    extra: dict[str, dict[str, Any]] = {}
    for idx, entries in opt["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim/{idx}/{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                extra.setdefault(str(idx), {})[key] = value
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = s
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {**meta, "optim_param_groups": opt["param_groups"], "optim_extra": extra, "scheduler": sched,
            "param_names": list(trainables)}
    return TrainState(tensors, _jsonable(meta))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if torch.is_tensor(value):
        return value.item()
    return value


@torch.no_grad()
def _restore_state(state: TrainState, trainables: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    if state.meta.get("param_names") != list(trainables):
        raise TierpruneError("the saved fine-tuning state trains other parameters than this run; "
                             "start the iteration anew")
    for name, p in trainables.items():
        p.copy_(state.tensors[f"param/{name}"])
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in state.tensors.items():
        if key.startswith("optim/"):
            _, idx, entry = key.split("/", 2)
            per_param.setdefault(int(idx), {})[entry] = value
    for idx, entries in state.meta.get("optim_extra", {}).items():
        per_param.setdefault(int(idx), {}).update(entries)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state.meta["optim_param_groups"]]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    scheduler.load_state_dict({**state.meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    torch.set_rng_state(state.tensors["rng/cpu"])
    cuda_states = [state.tensors[k] for k in sorted(state.tensors) if k.startswith("rng/cuda")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


# ------------------------------------------------------------------------------------------- training

@dataclass
class FinetuneResult:
    method: str
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    losses: list[float] = field(default_factory=list)  # training loss per optimizer step
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out cross-entropy)
    # module -> F (out, in) bf16 on the CPU, the mean squared gradient of its weight (fisher=True only)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def mean_squared_gradients(resolved: dict[str, tuple[nn.Module, torch.Tensor]],
                           optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """module -> F (out, in), bf16 on the CPU: the diagonal empirical Fisher of each masked weight that trained.

    F is AdamW's second moment, bias-corrected: an average of the squared (masked, so 0 where pruned)
    gradients over the iteration's steps, the recent ones weighted a little more (β2 = 0.999). It costs
    nothing to measure, since the optimizer keeps it anyway; bf16 keeps its range, and ranking needs no more.
    """
    beta2_of = {id(p): g["betas"][1] for g in optimizer.param_groups for p in g["params"]}
    fisher = {}
    for name, (module, _) in resolved.items():
        state = optimizer.state.get(module.weight)
        if not state or "exp_avg_sq" not in state:
            continue  # this weight did not train (e.g. LoRA's frozen base)
        beta2 = beta2_of[id(module.weight)]
        steps = float(state["step"])
        F = state["exp_avg_sq"] / (1.0 - beta2 ** steps)
        fisher[name] = (F.t() if _is_transposed(module) else F).to(torch.bfloat16).cpu().contiguous()
    return fisher


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device | str, low_precision: bool = False):
    # bf16 on CUDA (tensor cores); on the CPU bf16 matmuls are slow and fp32 keeps runs bit-reproducible,
    # so the CPU autocasts only a model that was loaded in 16 bits (its trained weights are fp32 copies).
    if torch.device(device).type == "cuda" or low_precision:
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def _trainable_parameters(model: nn.Module, cfg: FinetuneConfig) -> dict[str, nn.Parameter]:
    """Parameters full fine-tuning updates, by name (a tied weight once)."""
    if cfg.train == "all":
        return dict(model.named_parameters())
    if cfg.train == "linears":
        wanted = {id(m.weight) for m in named_linears(model).values()}
        wanted |= {id(m.bias) for m in named_linears(model).values() if getattr(m, "bias", None) is not None}
        return {n: p for n, p in model.named_parameters() if id(p) in wanted}
    # all_but_embeddings: the input embedding and the LM head (tied to it in most small LLaMAs) stay.
    frozen = {id(p) for getter in ("get_input_embeddings", "get_output_embeddings")
              for m in [getattr(model, getter)()] if m is not None for p in m.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) not in frozen}


def _lr_lambda(cfg: FinetuneConfig, total_steps: int) -> Callable[[int], float]:
    warmup = cfg.warmup_steps or round(cfg.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        # LambdaLR calls this with the number of steps taken; step s is trained at factor(s).
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def _held_out_loss(model: nn.Module, val_ids: torch.Tensor, batch_size: int, low_precision: bool = False) -> float:
    device = _device_of(model)
    total, count = 0.0, 0
    for start in range(0, val_ids.shape[0], batch_size):
        x = val_ids[start:start + batch_size].to(device)
        with _autocast(device, low_precision):
            logits = model(input_ids=x, use_cache=False).logits
        total += _shifted_ce(logits, x).item() * x.shape[0]
        count += x.shape[0]
    return total / count


def _step_loss(model: nn.Module, teacher: nn.Module | TeacherTopK | None, x: torch.Tensor, window_index: torch.Tensor,
               cfg: FinetuneConfig) -> torch.Tensor:
    """The training objective on one micro-batch x (b, L): (1-W)·CE + W·KD (+ hidden-state loss)."""
    want_hidden = cfg.hidden_weight > 0
    out = model(input_ids=x, use_cache=False, output_hidden_states=want_hidden)
    loss = _shifted_ce(out.logits, x) if cfg.kd_weight < 1 else out.logits.new_zeros((), dtype=torch.float32)
    if cfg.kd_weight < 1:
        loss = loss * (1 - cfg.kd_weight)
    if teacher is None:
        return loss
    if isinstance(teacher, TeacherTopK):
        values = teacher.values[window_index].to(x.device)
        indices = teacher.indices[window_index].to(x.device)
        kd = topk_distillation_loss(out.logits, values, indices, cfg.kd_temperature)
        return loss + cfg.kd_weight * kd if cfg.kd_weight > 0 else loss
    with torch.no_grad():
        t_out = teacher(input_ids=x, use_cache=False, output_hidden_states=want_hidden)
    if cfg.kd_weight > 0:
        loss = loss + cfg.kd_weight * distillation_loss(out.logits, t_out.logits, cfg.kd_temperature)
    if want_hidden:
        # hidden_states[0] is the embedding output, identical for both when embeddings are not trained.
        loss = loss + cfg.hidden_weight * hidden_state_loss(out.hidden_states[1:], t_out.hidden_states[1:])
    return loss


def _compile_repeated_blocks(*models: nn.Module | TeacherTopK | None) -> list[nn.Module]:
    """Compile, in place, every block of each model's stacks of identical blocks (a LLaMA's decoder layers).

    Regional compilation: the layers of a stack run the same code, so one trace (one for the student's
    fp32 trainable weights, one for the frozen teacher's) serves all 30 of them, where compiling the whole
    model would trace and generate code for every layer: a compile of seconds, not minutes. The loss, the
    embeddings and the LM head stay eager. Returns the blocks, whose `_compiled_call_impl` the caller resets.
    """
    blocks: list[nn.Module] = []
    inside: set[int] = set()  # modules within a chosen block: an inner stack (MoE experts) is compiled with it
    for model in models:
        if not isinstance(model, nn.Module):
            continue
        for stack in model.modules():
            if id(stack) in inside or not isinstance(stack, nn.ModuleList) or len(stack) < 2:
                continue
            if len({type(block) for block in stack}) == 1:
                for block in stack:
                    block.compile()
                    blocks.append(block)
                    inside.update(id(m) for m in block.modules())
    return blocks


def _commit_due(cfg: FinetuneConfig, step: int, total_steps: int, seconds_since_commit: float) -> bool:
    """Whether the training state after `step` is committed: by steps when commit_every is given, else by time."""
    if cfg.commit_every is not None:
        return bool(cfg.commit_every) and (step % cfg.commit_every == 0 or step == total_steps)
    return bool(cfg.commit_minutes) and (step == total_steps or seconds_since_commit >= 60 * cfg.commit_minutes)


def finetune_model_(model: nn.Module, masks: dict[str, torch.Tensor], train_ids: torch.Tensor, cfg: FinetuneConfig, *,
                    teacher: nn.Module | TeacherTopK | None = None, val_ids: torch.Tensor | None = None,
                    state: TrainState | None = None,
                    on_step: Callable[[TrainState], None] | None = None,
                    on_progress: Callable[[int, int], None] | None = None, fisher: bool = False) -> FinetuneResult:
    """Fine-tune model in place on the windows train_ids (n, L), one pass, keeping every mask exact.

    masks: module name -> keep mask (out, in), bool. teacher: the dense model (logits on the fly) or
    its cached top-k logits (TeacherTopK, rows aligned with train_ids); needed when kd_weight > 0
    or hidden_weight > 0. val_ids (m, L): held-out windows for the loss curve and early stopping.
    state: a TrainState from on_step to resume from; the model must then be as it was when this
    iteration's fine-tuning started (the state restores what training changed: the trained weights
    or the LoRA adapters). on_step(state) is called every cfg.commit_every steps, or (commit_every None)
    every cfg.commit_minutes of training, and after the last step; on_progress(steps done, total steps)
    after every optimizer step.
    fisher: also return each masked weight's mean squared gradient (mean_squared_gradients; full fine-tuning).
    Early stopping ends the run; it does not roll back to the best evaluation.
    With cfg.fade_fraction the weights the masks remove and that are not zero yet (a fresh demotion's)
    are taken from the model as handed in, and fade to zero over that fraction of the steps.
    """
    started = time.perf_counter()
    resolved = _resolve_masks(model, masks)
    # What the demotion removes, as it was: zero elsewhere (where weights are kept or were pruned before).
    # In the model's dtype (bf16: half of an fp32 copy); added to the fp32 master weights, it upcasts exactly.
    fading = ([module.weight.detach().masked_fill(keep, 0) for module, keep in resolved.values()]
              if cfg.fade_fraction and cfg.method != "none" else [])
    apply_masks_(model, masks)  # masks handed in may be ahead of the weights (a fresh demotion)
    result = FinetuneResult(method=cfg.method)
    if cfg.method == "none" or train_ids.shape[0] == 0:
        return result
    if train_ids.dim() != 2 or train_ids.dtype != torch.long:
        raise TierpruneError(f"training ids must be (windows, seqlen) int64, "
                             f"got {train_ids.dtype} {tuple(train_ids.shape)}")
    if teacher is None and (cfg.kd_weight > 0 or cfg.hidden_weight > 0):
        raise TierpruneError(f"kd_weight {cfg.kd_weight} / hidden_weight {cfg.hidden_weight} need a teacher model")
    if isinstance(teacher, TeacherTopK):
        if cfg.hidden_weight > 0:
            raise TierpruneError("the hidden-state loss needs the teacher model, not cached logits")
        if teacher.values.shape[:2] != train_ids.shape:
            raise TierpruneError(f"cached teacher logits cover {tuple(teacher.values.shape[:2])} windows × positions, "
                                 f"the training ids {tuple(train_ids.shape)}")
    elif teacher is not None:
        teacher.eval().requires_grad_(False)

    fingerprint = _fingerprint(cfg, train_ids, masks)
    if state is not None and state.meta.get("fingerprint") != fingerprint:
        raise TierpruneError("the saved fine-tuning state belongs to another run (config, data or masks differ)")

    torch.manual_seed(cfg.seed)  # LoRA's initialisation, dropout
    requires_grad_before = {id(p): p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    hooks: list[torch.utils.hooks.RemovableHandle] = []
    pruned_positions: list[tuple[nn.Module, torch.Tensor]] = []
    if cfg.method == "lora":
        trained_model = wrap_lora(model, masks, cfg)
        trainables = {n: p for n, p in trained_model.named_parameters() if p.requires_grad}
    else:
        trained_model = model
        trainables = _trainable_parameters(model, cfg)
        for p in trainables.values():
            p.requires_grad_(True)
        hooks = mask_gradients(model, masks)  # fading weights are frozen too: they only fade
    if cfg.method == "full" or fading:
        # Resolved and inverted once, not at each of the steps that re-apply them.
        pruned_positions = [(module, ~keep) for module, keep in resolved.values()]

    # Master weights in fp32: AdamW steps of lr·1 on bf16 weights of ~0.02 fall below half an ulp and vanish.
    low_precision = {n: p.dtype for n, p in trainables.items() if p.dtype in (torch.bfloat16, torch.float16)}
    for n in low_precision:
        trainables[n].data = trainables[n].data.float()
    sixteen_bit = bool(low_precision) or any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())
    device = _device_of(model)
    micro = cfg.batch_size
    per_step = cfg.batch_size * cfg.grad_accum
    n_windows = train_ids.shape[0]
    total_steps = math.ceil(n_windows / per_step)
    fade_steps = math.ceil(cfg.fade_fraction * total_steps)
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(cfg.seed))
    # The windows in training order, on the device once (tens of MB): a step slices its micro-batches, where
    # copying each from pageable host memory would make the host wait for the device at every step.
    ordered_ids = train_ids[order].to(device)
    decay = [p for p in trainables.values() if p.dim() >= 2]  # no decay on norms and biases, as nanoGPT
    no_decay = [p for p in trainables.values() if p.dim() < 2]
    # Fused on CUDA: one kernel for all parameters instead of a few per tensor, where launches dominate
    # a small model's step. The CPU keeps the default, which the bit-identical resume tests pin.
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                  fused=True if device.type == "cuda" else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))

    step, best, bad_evals, seconds_before = 0, math.inf, 0, 0.0
    if state is not None:
        _restore_state(state, trainables, optimizer, scheduler)
        step = state.step
        best, bad_evals = state.meta["best_val"], state.meta["bad_evals"]
        seconds_before = state.meta["seconds"]
        result.losses = list(state.meta["losses"])
        result.val_losses = [tuple(v) for v in state.meta["val_losses"]]
        result.stopped_early = bool(state.meta.get("stopped_early", False))
    if fading:
        # Where the fade stands at this step (a resumed LoRA run's base weights come back unfaded).
        _set_fading_(pruned_positions, fading, fade_factor(step, fade_steps))

    pending_losses: list[torch.Tensor] = []  # step losses still on the device

    def read_losses() -> None:
        # One host-device sync for many steps: reading each step's loss would stall the host every step, and a
        # small model's step is bound by the host launching kernels, which can run ahead only without it.
        if pending_losses:
            result.losses.extend(torch.stack(pending_losses).tolist())
            pending_losses.clear()

    def snapshot() -> TrainState:
        read_losses()
        meta = {"step": step, "cursor": min(step * per_step, n_windows), "best_val": best, "bad_evals": bad_evals,
                "losses": result.losses, "val_losses": result.val_losses, "stopped_early": result.stopped_early,
                "seconds": seconds_before + time.perf_counter() - started, "fingerprint": fingerprint}
        return _capture_state(trainables, optimizer, scheduler, meta)

    # Compiled blocks for the training steps only (held-out losses run eager); undone in `finally`.
    compiled_blocks = _compile_repeated_blocks(trained_model, teacher) if cfg.compile else []
    if val_ids is not None and state is None:
        # Where the curve starts: the loss right after pruning.
        result.val_losses.append((0, _held_out_loss(trained_model, val_ids, micro, sixteen_bit)))
    trained_model.train()
    last_commit = time.perf_counter()
    if on_progress is not None:
        on_progress(step, total_steps)  # the stage's clock starts now, not after its first step
    try:
        while step < total_steps and not result.stopped_early:
            cursor = step * per_step
            step_windows = order[cursor:cursor + per_step]
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            for start in range(0, step_windows.numel(), micro):
                index = step_windows[start:start + micro]
                x = ordered_ids[cursor + start:cursor + start + index.numel()]  # = train_ids[index], on the device
                with _autocast(device, sixteen_bit):
                    loss = _step_loss(trained_model, teacher, x, index, cfg)
                # A short last step weighs its micro-batches by their share of its windows.
                weight = index.numel() / step_windows.numel()
                (loss * weight).backward()
                step_loss += loss.detach().float() * weight  # read once per step: each .item() waits for the device
            optimizer.step()
            scheduler.step()
            if fading:
                _set_fading_(pruned_positions, fading, fade_factor(step + 1, fade_steps))
                if step + 1 >= fade_steps:
                    fading = []  # faded out: from here on, as without fading
            elif cfg.method == "full":
                _zero_pruned_(pruned_positions)  # weight decay and bf16 rounding must not revive a pruned weight
            step += 1
            pending_losses.append(step_loss)
            if on_progress is not None:
                on_progress(step, total_steps)
            if val_ids is not None and cfg.eval_every and step % cfg.eval_every == 0:
                read_losses()
                trained_model.eval()
                val = _held_out_loss(trained_model, val_ids, micro, sixteen_bit)
                trained_model.train()
                result.val_losses.append((step, val))
                best, bad_evals = (val, 0) if val < best else (best, bad_evals + 1)
                if cfg.patience and bad_evals >= cfg.patience:
                    result.stopped_early = True
            if on_step is not None and _commit_due(cfg, step, total_steps, time.perf_counter() - last_commit):
                on_step(snapshot())
                last_commit = time.perf_counter()
        read_losses()
        if fisher:
            result.fisher = mean_squared_gradients(resolved, optimizer)
    finally:
        for block in compiled_blocks:
            block._compiled_call_impl = None  # back to the eager forward (nn.Module.compile's own slot)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for n, dtype in low_precision.items():
                trainables[n].data = trainables[n].data.to(dtype)
    trained_model.eval()
    if cfg.method == "lora":
        model = merge_lora_(trained_model, masks)
    else:
        apply_masks_(model, masks)
    if val_ids is not None and (not result.val_losses or result.val_losses[-1][0] != step):
        result.val_losses.append((step, _held_out_loss(model, val_ids, micro, sixteen_bit)))
    for p in model.parameters():
        p.requires_grad_(requires_grad_before.get(id(p), False))
    result.steps = step
    result.tokens = min(step * per_step, n_windows) * train_ids.shape[1]
    result.seconds = seconds_before + time.perf_counter() - started
    return result
