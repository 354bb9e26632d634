"""Running a model larger than its device (`--offload`): as many decoder layers as fit stay on the device,
the others live in CPU memory and are streamed through it, one layer per forward call.

Calibration streams layers itself (tasks/layerwise.py: it holds one layer's inputs at a time). Evaluation and
zero-shot run the whole model at once, so here the streaming is an accelerate `ModelHook` on each layer that
does not fit: the layer moves in before its forward and back out after it. Unlike accelerate's own offload
hooks (which leave meta tensors behind and read weights from a separate map), the working model keeps real
tensors throughout, so that later steps (demote, fine-tune, save) see it unchanged.

The budget counts the layers' bytes (accelerate's compute_module_sizes); embeddings, final norm and head are
always on the device (every forward needs them), and ACTIVATION_RESERVE of the free memory is left for
activations and logits.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import compute_module_sizes, send_to_device
from torch import nn

from tierprune.adapters import decoder_layers, layers_prefix

from .layerwise import place_outside_layers

__all__ = ["resident_layer_count", "device_budget", "streamed", "placed_for_inference"]

ACTIVATION_RESERVE = 0.15  # of the device's free memory, for activations and the (batch, seqlen, vocab) logits


class _StreamThrough(ModelHook):
    """Moves its layer onto the device for the forward call and back to CPU memory after it."""

    def __init__(self, device: torch.device):
        self.device = device

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        module.to(self.device)
        return send_to_device(args, self.device), send_to_device(kwargs, self.device)

    def post_forward(self, module: nn.Module, output):
        module.to("cpu")
        return output


def device_budget(device: torch.device) -> int | None:
    """Bytes of model the device may hold (its free memory less a reserve), or None where nothing is moved."""
    if device.type != "cuda":
        return None  # CPU: the model already lives where it runs
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * (1 - ACTIVATION_RESERVE))


def resident_layer_count(model: nn.Module, budget: int | None) -> int:
    """How many decoder layers (from the first) fit in `budget` bytes beside the modules outside the layers."""
    layers = decoder_layers(model)
    if budget is None:
        return len(layers)
    sizes = compute_module_sizes(model)
    prefix = layers_prefix(model)
    left = budget - (sizes[""] - sizes[prefix])  # everything that is not a decoder layer stays on the device
    count = 0
    for i in range(len(layers)):
        left -= sizes[f"{prefix}.{i}"]
        if left < 0:
            break
        count += 1
    return count


@contextmanager
def streamed(model: nn.Module, device: str | torch.device, *, budget: int | None = None) -> Iterator[int]:
    """Inside: `model(ids)` runs on `device`, the layers past the budget streamed through it. Yields how many
    layers are streamed. Outside: every tensor back in CPU memory (where an offloaded model lives), no hook left.

    For inference only: a streamed layer leaves the device before a backward pass could use it.
    """
    device = torch.device(device)
    layers = decoder_layers(model)
    budget = device_budget(device) if budget is None else budget
    resident = resident_layer_count(model, budget)
    try:
        place_outside_layers(model, layers, device)
        for i, layer in enumerate(layers):
            if i < resident:
                layer.to(device)
            else:
                layer.to("cpu")
                add_hook_to_module(layer, _StreamThrough(device))
        yield len(layers) - resident
    finally:
        for layer in layers:
            remove_hook_from_module(layer)
        model.to("cpu")



@contextmanager
def placed_for_inference(model: nn.Module, device: str | torch.device, offload: bool) -> Iterator[None]:
    """The model ready to run on `device`: moved there whole, or (offload) streamed as above and back after."""
    if not offload:
        model.to(device)
        yield
        return
    with streamed(model, device):
        yield
