"""Architecture adapters: where a causal LM keeps its decoder layers and which linears are prunable.

Only linears inside decoder layers are pruned: embeddings and the LM head never are. GPT-2 style
models store `Conv1D` weights transposed (in, out); `weight_view` hides that so every kernel sees
(out, in).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import TierpruneError

__all__ = ["Adapter", "ADAPTERS", "adapter_for", "decoder_layers", "layers_prefix", "prunable_linears", "weight_view",
           "learned_positions"]


@dataclass(frozen=True)
class Adapter:
    """How to reach the decoder layers of one family of architectures."""

    family: str
    layers_path: str  # attribute path from the *ForCausalLM model to the ModuleList of layers
    model_types: tuple[str, ...]


ADAPTERS = (
    # Not mixtral: its experts are fused 3-D parameters, not linears, so only attention would be pruned.
    Adapter("llama", "model.layers", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                      "phi3", "smollm3", "olmo", "olmo2", "granite")),
    Adapter("opt", "model.decoder.layers", ("opt",)),
    Adapter("gpt_neox", "gpt_neox.layers", ("gpt_neox",)),
    Adapter("gpt2", "transformer.h", ("gpt2", "bloom", "falcon", "gptj")),
)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for a transformers causal LM, by its config's model_type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    known = sorted(t for a in ADAPTERS for t in a.model_types)
    raise TierpruneError(f"unsupported architecture {model_type!r}; supported model types: {', '.join(known)}")


# model_type -> the config field with the length of its learned position table. Past it the model cannot
# run at all (an index error in the embedding); rotary and ALiBi models run longer windows, if worse, so
# their lengths are the user's choice.
_LEARNED_POSITIONS = {"gpt2": "n_positions", "opt": "max_position_embeddings"}


def learned_positions(model: nn.Module) -> tuple[int, str] | None:
    """(how many positions, the config field) of a model with a learned position table, else None."""
    config = getattr(model, "config", None)
    field = _LEARNED_POSITIONS.get(getattr(config, "model_type", None))
    limit = getattr(config, field, None) if field else None
    return (int(limit), field) if limit else None


def layers_prefix(model: nn.Module) -> str:
    """Module-name prefix of the decoder layers, e.g. 'model.layers' (layer i is 'model.layers.i')."""
    return adapter_for(model).layers_path


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's ModuleList of decoder layers."""
    node = model
    for part in layers_prefix(model).split("."):
        node = getattr(node, part)
    assert isinstance(node, nn.ModuleList), type(node)
    return node


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: a linear with a transposed (in, out) weight.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def prunable_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """Linear-like modules of one decoder layer, by their name inside it, in definition order."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)}


def weight_view(module: nn.Module) -> torch.Tensor:
    """The weight as an (out, in) view: in-place edits of the view change the module."""
    W = module.weight.data
    return W.t() if _is_conv1d(module) else W
