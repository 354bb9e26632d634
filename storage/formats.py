"""Bytes in, bytes out: the file formats of a run, chosen by file name.

`*.parquet` holds a pandas DataFrame, `*.safetensors` a dict of tensors (string metadata alongside),
`*.json` a JSON object. The run store writes and reads every step file through these two functions,
so that no other package needs pyarrow or safetensors. Keep masks small: `pack_mask` stores a bool
tensor as bits (uint8), shape in the tensor's own dims, 1/8 of a byte per weight.
"""
from __future__ import annotations

import io
import json
import math
import struct
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
import torch

from tierprune.errors import TierpruneError

__all__ = ["encode", "decode", "tensor_file_bytes", "single_tensor_file", "tensors_from_bytes", "tensor_file_metadata",
           "pack_mask", "unpack_mask"]


def encode(name: str, value: Any) -> bytes:
    """The bytes of one step file; value is bytes, or a DataFrame / tensor dict / JSON dict by name."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if name.endswith(".parquet") and isinstance(value, pd.DataFrame):
        table = pa.Table.from_pandas(value, preserve_index=False).replace_schema_metadata(None)
        # A Categorical is written as Parquet's own dictionary encoding of its values, and without the Arrow
        # schema (store_schema=False) a reader sees plain strings: pd.read_parquet alone reads the schema the
        # README gives. Repeated integer columns (layer, block row/col) are dictionary-encoded too; this
        # halves the time to write a 7B model's 25-million-row tables.
        repeated = [f.name for f in table.schema if pa.types.is_dictionary(f.type) or pa.types.is_integer(f.type)]
        buf = io.BytesIO()
        pq.write_table(table, buf, store_schema=False, use_dictionary=repeated, compression="snappy")
        return buf.getvalue()
    if name.endswith(".safetensors") and isinstance(value, dict):
        return tensor_file_bytes(value)
    if name.endswith(".json"):
        try:
            # allow_nan: a diverged model has perplexity inf, which eval.json must be able to say.
            return json.dumps(value, indent=2, sort_keys=True).encode()
        except (TypeError, ValueError) as e:
            raise TierpruneError(f"{name} cannot be stored as JSON: {e}") from e
    raise TierpruneError(f"cannot store a {type(value).__name__} as {name!r}: use .parquet, .safetensors or .json")


def decode(name: str, data: bytes) -> Any:
    """The object encode() stored under name."""
    if name.endswith(".parquet"):
        schema = pq.read_schema(io.BytesIO(data))
        # Repeated names (a 7B model's 25 million blocks name 224 modules) come back as a Categorical.
        return pq.read_table(io.BytesIO(data), read_dictionary=[c for c in ("module",) if c in schema.names]
                             ).to_pandas()
    if name.endswith(".safetensors"):
        return tensors_from_bytes(data)
    if name.endswith(".json"):
        return json.loads(data)
    return data


def tensor_file_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """One safetensors file as bytes: tensors copied to contiguous CPU memory (views and shared storage allowed)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # safetensors refuses tensors that share storage (tied weights, views of one buffer): give those their own.
    seen: set[int] = set()
    for k, v in cpu.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            cpu[k] = v.clone()
        seen.add(ptr)
    return safetensors.torch.save(cpu, metadata=metadata)


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def single_tensor_file(name: str, tensor: torch.Tensor) -> tuple[bytes, memoryview]:
    """(header, data) of a safetensors file holding one tensor, without copying the tensor's bytes.

    `header + data` is byte for byte what `safetensors.torch.save({name: tensor})` returns (a test checks
    it); that function copies the data twice while holding the GIL, which serialised a 13 GB checkpoint
    written from 16 threads. Here the data is a view of a CPU copy, hashed and written as it is.
    """
    cpu = tensor.detach().to("cpu").contiguous()
    data = memoryview(cpu.view(-1).view(torch.uint8).numpy()) if cpu.numel() else memoryview(b"")
    entry = {"dtype": _SAFETENSORS_DTYPES[cpu.dtype], "shape": list(cpu.shape), "data_offsets": [0, len(data)]}
    header = json.dumps({name: entry}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    return struct.pack("<Q", len(header)) + header, data


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(data)


def tensor_file_metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors file given as bytes (its JSON header, no tensor read)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]).get("__metadata__", {})


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bits, little-endian within a byte, padded to whole bytes: (ceil(numel/8),)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """The bool tensor of `shape` that pack_mask stored in bits."""
    n = math.prod(shape)
    if bits.dtype != torch.uint8 or bits.numel() != (n + 7) // 8:
        raise TierpruneError(f"a packed mask of shape {tuple(shape)} needs {(n + 7) // 8} uint8 bytes, "
                             f"got {bits.numel()} {bits.dtype}")
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    flat = (bits.view(-1, 1) >> shifts) & 1  # (bytes, 8)
    return flat.reshape(-1)[:n].bool().reshape(tuple(shape))
