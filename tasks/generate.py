"""Greedy generation from a model folder, timed: how a packed model (`tierprune convert`) runs against its dense twin.

A packed folder loads with HybridLinear layers (`load_hybrid`), or as its dense twin with zeros where pruned
(`load_dense`); any other model folder loads as plain transformers. Both go through transformers' own
`generate` with its KV cache, greedy, batch 1, so the tokens of the two should agree and the times compare
the linears alone. One short warm-up generation comes first (kernel compiles, allocator), then the timed one.

`compile=True` is transformers' compiled decoding: a static KV cache and the decode step through torch.compile
(inductor fuses what lies between the linears; the hybrid op stays one opaque op; on CUDA, CUDA graphs), as a
serving stack runs a model. The warm-up then generates as many tokens as the timed run, so that the static
cache has the timed run's size and the compiled step is reused, not recompiled.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from tierprune.errors import TierpruneError
from tierprune.storage.tables import file_exists

from .convert import target_dtype

__all__ = ["Generation", "load_for_generation", "generate_timed"]

WARMUP_TOKENS = 2


@dataclass(frozen=True)
class Generation:
    kind: str  # "packed", "dense twin" or "model"
    text: str  # the new tokens, decoded
    token_ids: list[int]  # the new tokens
    seconds: float  # the timed generation, prefill included

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else float("inf")


def load_for_generation(folder: str, device: str, *, dense_twin: bool = False,
                        dtype: str = "stored") -> tuple[nn.Module, object, str]:
    """(model, tokenizer, kind) of a folder: packed (or its dense twin) if `convert` wrote it, else plain.

    dtype: "stored" keeps the folder's dtype; a CPU run's fp32 folder cast to bfloat16 on a GPU takes the
    kernels' path (they run bf16/fp16; fp32 goes through unpack + cuBLAS).
    """
    cast_to = target_dtype(dtype)  # a bad name fails before the model loads
    model, tokenizer, kind = _load(folder, device, dense_twin)
    return (model if cast_to is None else model.to(cast_to)), tokenizer, kind


def _load(folder: str, device: str, dense_twin: bool) -> tuple[nn.Module, object, str]:
    from transformers import AutoTokenizer

    from tierprune.models import PACKED_LAYOUT_FILE, load_model

    from .convert import load_dense, load_folder_model, load_hybrid

    folder = folder.rstrip("/")
    if not file_exists(f"{folder}/config.json"):  # an alias, a .gguf file or a hub id: the dense original
        if file_exists(f"{folder}/manifest.json"):
            raise TierpruneError(f"{folder} is a run, not a model: pack an iteration first with `tierprune "
                                 f"convert {folder} --output DIR` (or `tierprune runs export`), then generate DIR")
        if dense_twin:
            raise TierpruneError(f"{folder} is not a packed folder, so it has no dense twin to compare with")
        loaded = load_model(folder)
        loaded.model.config.use_cache = True
        return loaded.model.to(device), loaded.tokenizer, "model"
    if file_exists(f"{folder}/{PACKED_LAYOUT_FILE}"):
        model = load_dense(folder, device) if dense_twin else load_hybrid(folder, device)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return model.eval(), tokenizer, "dense twin" if dense_twin else "packed"
    if dense_twin:
        raise TierpruneError(f"{folder} is not a packed folder (no {PACKED_LAYOUT_FILE}), so it has no dense twin "
                             "to compare with; pack it with `tierprune convert`")
    loaded = load_folder_model(folder)
    model = loaded.model.to(device)
    model.config.use_cache = True  # load_model turns the cache off for layer-wise calibration; decoding wants it
    return model, loaded.tokenizer, "model"


@torch.no_grad()
def generate_timed(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, kind: str, *,
                   compile: bool = False) -> Generation:
    """Greedy continuation of `prompt` (exactly max_new_tokens unless the model ends it), timed after a warm-up;
    `compile`: with a static cache and a compiled decode step."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        raise TierpruneError("the prompt is empty after tokenization")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = dict(do_sample=False, pad_token_id=pad, attention_mask=torch.ones_like(ids), use_cache=True)
    if compile:
        settings.update(cache_implementation="static", compile_config=_compile_config())

    def run(n: int) -> torch.Tensor:
        return model.generate(ids, max_new_tokens=n, **settings)

    run(max_new_tokens if compile else WARMUP_TOKENS)
    _synchronize(device)
    start = time.perf_counter()
    out = run(max_new_tokens)
    _synchronize(device)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:].tolist()
    return Generation(kind, tokenizer.decode(new, skip_special_tokens=True), new, seconds)


def _compile_config():
    from transformers import CompileConfig

    config = CompileConfig()  # transformers' defaults: inductor, "reduce-overhead" (CUDA graphs on CUDA)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told; asked for, the CPU too
    return config


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
