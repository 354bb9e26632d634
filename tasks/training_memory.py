"""How much memory a fine-tuning step needs, estimated from the model's shapes before a run starts.

A step that does not fit is not an exception: the kernel's OOM killer ends the process with SIGKILL, after
the calibration and the first evaluation, and without a word. With the run defaults (16 windows of 512 per
forward, distillation from a dense teacher held beside the student) SmolLM2-135M in fp32 needs about 24 GiB
on a CPU, which a 24 GiB machine does not have. `check_run_inputs` therefore warns, in one line and before
the run exists, with the --ft-batch-size / --ft-grad-accum split that trains the same steps and fits.

The estimate (bytes):
  models       parameters × weight bytes, twice with the teacher on the fly;
  trained      trained weights × (fp32 gradient 4 + AdamW moments 8 + fp32 master copy 4 if stored 16-bit);
  per token    1.6 × Σ over the linears of (in + out) × activation bytes   (what autograd keeps for backward)
               + 5 × vocab × 4                                             (logits and the loss's fp32 copies).
Measured on 2 CPU cores (SmolLM2-135M, fp32, one masked KD step, peak RSS): 3.09 / 4.53 / 7.32 GiB at
1 / 2 / 4 windows of 512, and 4.51 GiB at 4 windows of 256 (tokens, not window length, count: SDPA keeps no
attention matrix); 16 windows of 512 were killed for memory on the 24 GiB machine. The estimate gives 3.6 / 5.0
/ 7.8 / 5.0 GiB (about 0.5 GiB above, on the safe side) and 24.6 GiB at 16.
"""
from __future__ import annotations

from tierprune.adapters import weight_view
from tierprune.config import TierpruneConfig
from tierprune.errors import TierpruneError
from tierprune.models import meta_model, resolve_dtype

from .prune import named_linears

GIB = 2 ** 30
ACTIVATION_FACTOR = 1.6  # activations kept per token, in units of Σ(in + out) of the linears (measured, above)
LOGIT_COPIES = 5  # logits, their fp32 log-softmax, the teacher's, the KL terms, the gradient
# What a whole run's process holds beyond the step: its peak RSS at 8 windows of 512 was 15.6 GiB against the
# step's 13.4 estimated (allocator caches, calibration and evaluation buffers); a step fits below 1/1.25 of free.
HEADROOM = 1.25


def estimated_training_bytes(cfg: TierpruneConfig, batch_size: int | None = None) -> int:
    """Peak bytes of one fine-tuning step of cfg (batch_size windows per forward; default cfg's)."""
    ft = cfg.finetune
    model = meta_model(cfg.model.name, cfg.model.gguf_file)
    weight_bytes = resolve_dtype(cfg.model.dtype, cfg.device).itemsize
    shapes = [tuple(weight_view(m).shape) for m in named_linears(model).values()]
    params = sum(p.numel() for p in model.parameters())  # tied tensors once
    teacher_resident = not ft.teacher_cache and (ft.kd_weight > 0 or ft.hidden_weight > 0)
    models = params * weight_bytes * (2 if teacher_resident else 1)
    if ft.method == "lora":
        trained = ft.lora_rank * sum(o + i for o, i in shapes)  # the adapters, were every linear targeted
    elif ft.train == "linears":
        trained = sum(o * i for o, i in shapes)
    else:
        trained = params
    trained_bytes = trained * (4 + 8 + (4 if weight_bytes < 4 else 0))
    vocab = model.get_output_embeddings().weight.shape[0]
    per_token = ACTIVATION_FACTOR * sum(o + i for o, i in shapes) * weight_bytes + LOGIT_COPIES * vocab * 4
    tokens = (batch_size or ft.batch_size) * ft.seqlen
    return int(models + trained_bytes + tokens * per_token)


def available_bytes(device: str) -> int:
    """Memory free for the run now: the GPU's free memory, or the host's available memory."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    import psutil

    return psutil.virtual_memory().available


def memory_warning(cfg: TierpruneConfig, available: int) -> str | None:
    """One line when a step is estimated not to fit in `available` bytes, with a split that fits; else None."""
    ft = cfg.finetune
    needed = estimated_training_bytes(cfg)
    if needed * HEADROOM <= available:
        return None
    line = (f"fine-tuning needs about {needed / GIB:.1f} GiB at --ft-batch-size {ft.batch_size} × --ft-seqlen "
            f"{ft.seqlen} (estimated), and {available / GIB:.1f} GiB are free on {cfg.device}: the run may be "
            "killed for memory")
    # The same windows per optimizer step in smaller forwards: batch_size / k each, k times as many.
    for k in range(2, ft.batch_size + 1):
        if ft.batch_size % k == 0 and estimated_training_bytes(cfg, ft.batch_size // k) * HEADROOM <= available:
            smaller = ft.batch_size // k
            return (f"{line}; --ft-batch-size {smaller} --ft-grad-accum {ft.grad_accum * k} trains the same steps "
                    f"in about {estimated_training_bytes(cfg, smaller) / GIB:.1f} GiB")
    return f"{line}; even one window per forward needs about {estimated_training_bytes(cfg, 1) / GIB:.1f} GiB"


def training_memory_warning(cfg: TierpruneConfig) -> str | None:
    """memory_warning for this machine's free memory now, or None (also when the model's config cannot be read:
    loading the model says why, in its own line)."""
    try:
        return memory_warning(cfg, available_bytes(cfg.device))
    except TierpruneError:
        return None
