"""Decoder-layer-sequential calibration: the reference (Wanda/SparseGPT) order of work.

The calibration batch is run once through the embeddings (decoder layers stubbed out, to record
what each is called with); then, layer by layer:
  1. one pass of the (still unpruned) layer with hooks on its linears gathers input statistics;
  2. a visitor may prune the layer in place using them;
  3. if it did, the layer is run again so the next layer sees the outputs of the pruned one.
Only one layer's inputs and outputs are held at a time. With `offload=True` the model stays on the
CPU and each layer visits the device alone, so models larger than the device can be calibrated.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tierprune.adapters import decoder_layers, layers_prefix, prunable_linears, weight_view
from tierprune.kernels.scores import add_sq_norm_, sum_sq

__all__ = ["InputStats", "LayerVisitor", "walk_layers", "capture_layer_inputs"]


@dataclass
class InputStats:
    """Statistics of one linear's inputs: Σx²/N per feature and, for SparseGPT, the Gram matrix."""

    sq_norm: torch.Tensor  # (in,) fp32, S_j = (1/N)·Σ_tokens x_j²
    hessian: torch.Tensor | None = None  # (in, in) fp32, 2/N·Σ x xᵀ
    n_samples: int = 0
    n_hessian: int = 0
    n_tokens: int = 0

    def add(self, x: torch.Tensor, batch_sum_sq: torch.Tensor | None = None) -> None:
        """Fold in a batch x (B, ..., in); batch_sum_sq = sum_sq(x) when already computed."""
        self.n_tokens += x[..., 0].numel()
        if batch_sum_sq is None:
            batch_sum_sq = sum_sq(x)
        self.n_samples = add_sq_norm_(self.sq_norm, self.n_samples, batch_sum_sq, x.shape[0])
        if self.hessian is not None:
            from tierprune.kernels.sparsegpt import accumulate_hessian

            self.n_hessian = accumulate_hessian(self.hessian, self.n_hessian, x)


# visitor(layer_index, layer, {name: linear}, {name: InputStats}) -> True if it changed the weights
LayerVisitor = Callable[[int, nn.Module, dict[str, nn.Module], dict[str, InputStats]], bool]


class _StopForward(Exception):
    """Raised by the stand-in for the last decoder layer: the final norm and LM head need not run."""


@dataclass
class LayerInputs:
    hidden: list[torch.Tensor]  # one (b, L, D) tensor per calibration batch
    # batch size -> one (args, kwargs) per decoder layer, without the hidden states. Layers can be
    # called differently (Gemma-2 and Qwen-2/3 give sliding-window layers their own mask); where they
    # are not, all entries hold the same tensors, so the per-layer lists cost no memory.
    call_args: dict[int, list[tuple[tuple, dict]]] = field(default_factory=dict)


def _non_layer_modules(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    inside = {id(m) for m in layers.modules()}
    return [m for m in model.modules() if id(m) not in inside]


def place_outside_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    """Move embeddings, norms, rotary tables, head to `device`, leaving the layers where they are."""
    for module in _non_layer_modules(model, layers):
        for tensors in (module._parameters, module._buffers):
            for key, t in tensors.items():
                if t is not None and t.device != device:
                    t.data = t.data.to(device)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int,
                         device: torch.device) -> LayerInputs:
    """Run the model with its decoder layers stubbed out; record what each layer is called with, per batch."""
    layers = decoder_layers(model)
    calls: list[tuple[tuple, dict]] = []

    def stand_in(i: int):
        def forward(*args, **kwargs):
            calls.append((args, kwargs))
            if i == len(layers) - 1:
                raise _StopForward
            # The hidden states pass through unchanged. What later stand-ins receive as hidden
            # states is never used (BLOOM, Falcon and GPT-J take `outputs[0]` of it): the models
            # compute the layers' other inputs (masks, positions, rotary, alibi) before their loop.
            return args[0] if args else kwargs["hidden_states"]
        return forward

    # Replacing `forward` on the instance keeps each layer's attributes and its class's __call__;
    # an instance `forward` already there (accelerate's hooks) is put back afterwards.
    own_forwards = [layer.__dict__.get("forward") for layer in layers]
    for i, layer in enumerate(layers):
        layer.forward = stand_in(i)
    inputs = LayerInputs(hidden=[])
    try:
        for batch in input_ids.split(batch_size):
            calls.clear()
            try:
                model(batch.to(device), use_cache=False)
            except _StopForward:
                pass
            assert len(calls) == len(layers), f"the model called {len(calls)} of its {len(layers)} layers"
            per_layer = [_split_hidden(args, kwargs) for args, kwargs in calls]
            inputs.hidden.append(per_layer[0][0])
            # Every calibration sequence has the same length and no padding, so the layers' other
            # inputs depend only on the batch size: keep one set per size (the last batch may be smaller).
            inputs.call_args.setdefault(batch.shape[0], [(args, kwargs) for _, args, kwargs in per_layer])
    finally:
        for layer, own in zip(layers, own_forwards):
            if own is None:
                del layer.forward
            else:
                layer.forward = own
    return inputs


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """(hidden states, other args, other kwargs) of one layer call."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _run_layer(layer: nn.Module, index: int, hidden: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
    args, kwargs = inputs.call_args[hidden.shape[0]][index]
    out = layer(hidden, *args, **kwargs)
    # LLaMA-style layers return the hidden states, BLOOM/Falcon/GPT-J a tuple that starts with them.
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def walk_layers(model: nn.Module, input_ids: torch.Tensor, visit: LayerVisitor | None = None, *,
                batch_size: int = 8, device: str | torch.device = "cpu", offload: bool = False,
                hessian: bool = False, compile: bool = False,
                on_progress: Callable[[int, int], None] | None = None) -> dict[str, InputStats]:
    """Calibrate layer by layer; returns every linear's input statistics by full module name.

    `compile=True` runs each layer through torch.compile (fused norms, rotary, activations): the
    statistics are then summed in fp32 and divided by N once, instead of the reference's running
    average, which changes S only by rounding. Not with `hessian`.

    `offload=True`: the model lives in CPU memory; each layer visits the device in turn, embeddings and head
    for the whole walk, and all of it is back where it was afterwards.
    """
    if compile and hessian:
        raise ValueError("compile=True gathers Σx² only; SparseGPT's Gram matrices need compile=False")
    device = torch.device(device)
    layers = decoder_layers(model)
    prefix = layers_prefix(model)
    outside_home = next(model.parameters()).device  # offloaded: where embeddings and head go back to
    if offload:
        place_outside_layers(model, layers, device)
    else:
        model.to(device)
    inputs = capture_layer_inputs(model, input_ids, batch_size, device)
    all_stats: dict[str, InputStats] = {}
    if on_progress is not None:
        on_progress(0, len(layers))  # the stage's clock starts now, not after its first layer
    for i, layer in enumerate(layers):
        home = next(layer.parameters()).device
        layer.to(device)
        linears = prunable_linears(layer)
        if compile:
            # Every layer shares the same forward code, so torch.compile traces it once and reuses it.
            # Dynamo does not guard on hooks, so a trace made with the statistics hooks must never
            # meet a layer without them (or the reverse): they stay on through the re-run below.
            run = torch.compile(layer)
            with _summing_hooks(linears, device) as read_stats:
                outputs = [_run_layer(run, i, h, inputs) for h in inputs.hidden]
                stats = read_stats(inputs.hidden)
                if visit is not None and visit(i, layer, linears, stats):
                    outputs = [_run_layer(run, i, h, inputs) for h in inputs.hidden]
        else:
            stats, outputs = _gather_reference(layer, i, linears, inputs, device, hessian)
            if visit is not None and visit(i, layer, linears, stats):
                outputs = [_run_layer(layer, i, h, inputs) for h in inputs.hidden]
        inputs.hidden = outputs
        for name, s in stats.items():
            s.hessian = None  # (in, in) per linear: too big to keep for the whole model
            all_stats[f"{prefix}.{i}.{name}"] = s
        if offload:
            layer.to(home)
        if on_progress is not None:
            on_progress(i + 1, len(layers))
    if offload:
        place_outside_layers(model, layers, outside_home)  # the whole model back where it lives
    return all_stats


def _gather_reference(layer: nn.Module, index: int, linears: dict[str, nn.Module], inputs: LayerInputs,
                      device: torch.device, hessian: bool) -> tuple[dict[str, InputStats], list[torch.Tensor]]:
    """One pass with hooks, statistics as the reference keeps them (running averages)."""
    stats = {name: _new_stats(m, device, hessian) for name, m in linears.items()}
    seqlen = inputs.hidden[0].shape[1]
    last: dict = {}  # the last input a hook reduced, shared by this layer's hooks
    hooks = [m.register_forward_hook(_stats_hook(stats[name], seqlen, last)) for name, m in linears.items()]
    try:
        outputs = []
        for h in inputs.hidden:
            last.clear()
            outputs.append(_run_layer(layer, index, h, inputs))
    finally:
        for h in hooks:
            h.remove()
    return stats, outputs


_SUM_SQ = "_tierprune_sum_sq"


def _add_sum_sq(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    # One function object for every linear, and the running sum a buffer of the module: to
    # torch.compile all layers then look alike, so their shared trace is reused, not redone.
    getattr(module, _SUM_SQ).add_(sum_sq(args[0]))


@contextmanager
def _summing_hooks(linears: dict[str, nn.Module], device: torch.device):
    """Σx² hooks on every linear; yields read(hidden) -> InputStats per linear (sum divided by N once)."""
    hooks = []
    for m in linears.values():
        m.register_buffer(_SUM_SQ, torch.zeros(weight_view(m).shape[1], device=device), persistent=False)
        hooks.append(m.register_forward_hook(_add_sum_sq))

    def read(hidden: list[torch.Tensor]) -> dict[str, InputStats]:
        n_samples = sum(h.shape[0] for h in hidden)
        n_tokens = sum(h.shape[0] * h.shape[1] for h in hidden)
        return {name: InputStats(sq_norm=getattr(m, _SUM_SQ) / n_samples, n_samples=n_samples, n_tokens=n_tokens)
                for name, m in linears.items()}
    try:
        yield read
    finally:
        for h in hooks:
            h.remove()
        for m in linears.values():
            m._buffers.pop(_SUM_SQ, None)


def _new_stats(module: nn.Module, device: torch.device, hessian: bool) -> InputStats:
    d_in = weight_view(module).shape[1]
    H = torch.zeros(d_in, d_in, dtype=torch.float32, device=device) if hessian else None
    return InputStats(sq_norm=torch.zeros(d_in, dtype=torch.float32, device=device), hessian=H)


def _stats_hook(stats: InputStats, seqlen: int, last: dict):
    def hook(module, args, output):
        x = args[0]
        # q/k/v (and gate/up) are called one after another on the very same tensor: reduce it once.
        # Identity, not the data pointer, decides: a freed input's memory can be reused by the next.
        if last.get("input") is not x:
            last["input"], last["sum_sq"] = x, sum_sq(x)
        # N counts sequences, not tokens. Some layers flatten their input first (OPT's MLP sees
        # (b·L, D)); every calibration sequence has seqlen tokens, so the sequences can be restored.
        stats.add(x.reshape(-1, seqlen, x.shape[-1]) if x.dim() == 2 else x, last["sum_sq"])
    return hook
