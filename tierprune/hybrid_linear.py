"""HybridLinear: a linear layer holding a packed Dense / 2:4 / TopK weight, and model conversion.

The forward pass is one `tierprune::hybrid_mm` op, which dispatches by device and token count: the
pure-torch reference on the CPU, the decode kernels for at most 16 tokens on CUDA and unpack +
cuBLAS above that. One opaque op with a fake implementation keeps the module traceable by
torch.compile and capturable in CUDA graphs; plain eager decode calls on CUDA skip the op's dispatch
and go straight to a launch prepared on the first call (kernels/triton/hybrid_mm.py says when).

Packed buffers are plain tensors, so a converted model's state_dict saves with safetensors. Each
HybridLinear also stores `hybrid_layout` (out, in, block_size, topk, transposed), which lets
`prepare_hybrid_` rebuild the modules of a saved state dict and `dense_state_dict` turn it back into
the plain transformers checkpoint (GPT-2's Conv1D weights transposed back).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .adapters import _is_conv1d, weight_view
from .errors import TierpruneError
from .kernels.hybrid import HYBRID_TENSOR_NAMES, HybridWeight, pack_hybrid
from .kernels.triton.hybrid_mm import hybrid_mm

__all__ = ["HybridLinear", "convert_model_", "prepare_hybrid_", "dense_state_dict", "LAYOUT_KEY"]

LAYOUT_KEY = "hybrid_layout"


class HybridLinear(nn.Module):
    """y = x @ W.T + b with W (out, in) packed in the hybrid format."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, block_size: int = 16,
                 topk: int = 10, transposed: bool = False, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.topk, self.transposed = block_size, topk, transposed
        nbr = -(-out_features // block_size)
        bs = block_size
        empty = {  # zero blocks of each tier until packed or loaded; loading resizes them
            "dense_values": torch.zeros(0, bs, bs, dtype=dtype), "nm_values": torch.zeros(0, bs, bs // 2, dtype=dtype),
            "nm_meta": torch.zeros(0, bs, bs // 8, dtype=torch.uint8), "topk_values": torch.zeros(0, topk, dtype=dtype),
            "topk_pos": torch.zeros(0, topk, dtype=torch.uint8),
        }
        for name in HYBRID_TENSOR_NAMES:
            if name.endswith("row_ptr"):
                tensor = torch.zeros(nbr + 1, dtype=torch.int32)
            elif name.endswith("cols"):
                tensor = torch.zeros(0, dtype=torch.int16)
            else:
                tensor = empty[name]
            self.register_buffer(name, tensor.to(device))
        layout = torch.tensor([out_features, in_features, block_size, topk, int(transposed)], dtype=torch.int64)
        self.register_buffer(LAYOUT_KEY, layout.to(device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_hybrid(cls, hw: HybridWeight, bias: torch.Tensor | None = None, *,
                    transposed: bool = False) -> HybridLinear:
        """A module around an already packed weight."""
        out_features, in_features = hw.shape
        module = cls(in_features, out_features, bias=bias is not None, block_size=hw.block_size, topk=hw.topk,
                     transposed=transposed, dtype=hw.dtype, device=hw.device)
        for name, tensor in hw.tensors().items():
            setattr(module, name, tensor)
        if bias is not None:
            module.bias.data = bias.detach().to(hw.dtype).clone()
        return module

    @classmethod
    def from_linear(cls, linear: nn.Module, tier_map: torch.Tensor, *, block_size: int = 16,
                    topk: int = 10) -> HybridLinear:
        """Pack an nn.Linear or GPT-2 Conv1D whose weight obeys `tier_map`; ValueError names a breaking block."""
        hw = pack_hybrid(weight_view(linear), tier_map, block_size=block_size, topk=topk)
        return cls.from_hybrid(hw, linear.bias, transposed=_is_conv1d(linear))

    def hybrid_weight(self) -> HybridWeight:
        """The packed weight as a HybridWeight (views of this module's buffers)."""
        buffers = self._buffers  # not getattr: nn.Module's attribute fallback is slow, and this runs every forward
        tensors = {name: buffers[name] for name in HYBRID_TENSOR_NAMES}
        return HybridWeight((self.out_features, self.in_features), self.block_size, self.topk, **tensors)

    @property
    def nbytes(self) -> int:
        return self.hybrid_weight().nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = hybrid_mm(x, self.hybrid_weight())  # (..., out)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The weight as the original module stored it: (out, in), or (in, out) for a Conv1D."""
        W = self.hybrid_weight().to_dense()
        return W.t().contiguous() if self.transposed else W

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # The number of blocks per tier is data, not configuration: take the incoming buffers' shapes.
        for name in HYBRID_TENSOR_NAMES:
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(incoming, device=getattr(self, name).device,
                                                     dtype=getattr(self, name).dtype))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        counts = self.hybrid_weight().tier_counts()
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocks(dense, 2:4, topk)={counts}, topk={self.topk}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def convert_model_(model: nn.Module, tier_maps: Mapping[str, torch.Tensor], *, block_size: int = 16,
                   topk: int = 10) -> list[str]:
    """Replace each linear named in `tier_maps` by a HybridLinear packing its (already pruned) weight.

    Returns the converted module names. Refuses unknown names and weights that break their tier map.
    """
    modules = dict(model.named_modules())
    converted = []
    for name, tier_map in tier_maps.items():
        module = modules.get(name)
        if module is None or not (isinstance(module, nn.Linear) or _is_conv1d(module)):
            raise TierpruneError(f"no linear layer named {name!r} in the model")
        try:
            hybrid = HybridLinear.from_linear(module, tier_map, block_size=block_size, topk=topk)
        except ValueError as e:
            raise TierpruneError(f"{name}: {e}") from None
        _set_module(model, name, hybrid)
        converted.append(name)
    return converted


def _layouts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    suffix = "." + LAYOUT_KEY
    return {key[:-len(suffix)]: state_dict[key].tolist() for key in state_dict if key.endswith(suffix)}


def prepare_hybrid_(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Swap in empty HybridLinear modules wherever `state_dict` holds a packed layer, ready to load it."""
    names = []
    for name, (out_f, in_f, bs, topk, transposed) in _layouts(state_dict).items():
        old = model.get_submodule(name)
        values = state_dict[f"{name}.dense_values"]
        module = HybridLinear(in_f, out_f, bias=f"{name}.bias" in state_dict, block_size=bs, topk=topk,
                              transposed=bool(transposed), dtype=values.dtype,
                              device=next(old.parameters(), values).device)
        _set_module(model, name, module)
        names.append(name)
    return names


def dense_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A hybrid model's state dict with each packed layer turned back into its plain `weight`."""
    layouts = _layouts(state_dict)
    dense = {k: v for k, v in state_dict.items()
             if k.rpartition(".")[0] not in layouts or k.rpartition(".")[2] == "bias"}
    for name, (out_f, in_f, bs, topk, transposed) in layouts.items():
        tensors = {t: state_dict[f"{name}.{t}"] for t in HYBRID_TENSOR_NAMES}
        W = HybridWeight((out_f, in_f), bs, topk, **tensors).to_dense()
        dense[f"{name}.weight"] = W.t().contiguous() if transposed else W
    return dense
