"""Tensor checkpoints (safetensors) and transformers model folders at any fsspec URI."""
from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import TYPE_CHECKING

import safetensors.torch
import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from tierprune.errors import TierpruneError

from .tables import _atomic_open

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["save_tensors", "load_tensors", "load_tensor_metadata", "save_pretrained_dir"]


def save_tensors(tensors: dict[str, torch.Tensor], uri: str, metadata: dict[str, str] | None = None) -> str:
    """Write tensors (and string metadata) as one safetensors file at uri (atomically) and return uri."""
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TierpruneError(f"metadata for {uri} must map str to str, got {key!r}: {type(value).__name__}")
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TierpruneError(f"{name!r} in tensors for {uri} is a {type(tensor).__name__}, not a torch.Tensor")
    # One fresh contiguous CPU copy each: safetensors refuses non-contiguous tensors and tensors that
    # share storage (tied embeddings, views of one buffer), and cannot read GPU memory.
    cpu = {
        name: torch.empty_like(t, device="cpu", memory_format=torch.contiguous_format).copy_(t.detach())
        for name, t in tensors.items()
    }
    # Bytes rather than save_file, so that every fsspec filesystem works the same way.
    data = safetensors.torch.save(cpu, metadata=metadata)
    with _atomic_open(uri) as f:
        f.write(data)
    return uri


def load_tensors(uri: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of the safetensors file at uri onto device."""
    fs, path = url_to_fs(uri)
    if not fs.isfile(path):
        raise TierpruneError(f"no tensor file at {uri}")
    if isinstance(fs, LocalFileSystem):
        # Memory-mapped: avoids holding the whole file as bytes next to the tensors.
        return safetensors.torch.load_file(path, device=device)
    with fs.open(path, "rb") as f:
        tensors = safetensors.torch.load(f.read())
    return {name: t.to(device) for name, t in tensors.items()}


def load_tensor_metadata(uri: str) -> dict[str, str]:
    """Read only the string metadata saved with the safetensors file at uri."""
    fs, path = url_to_fs(uri)
    if not fs.isfile(path):
        raise TierpruneError(f"no tensor file at {uri}")
    # safetensors layout: u64 little-endian header length, then a JSON header; no need to read the tensors.
    with fs.open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return header.get("__metadata__", {})


def save_pretrained_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, uri: str) -> str:
    """Save a transformers model (safetensors) and its tokenizer as a from_pretrained folder at uri."""
    fs, path = url_to_fs(uri)
    if fs.isfile(path):
        raise TierpruneError(f"cannot save a model folder at {uri}: it is a file")
    if isinstance(fs, LocalFileSystem):
        _save_pretrained_local(model, tokenizer, path)
        return uri
    with tempfile.TemporaryDirectory() as tmp:
        _save_pretrained_local(model, tokenizer, tmp)
        # The trailing separator copies the folder's contents into path, whether path exists or not.
        fs.put(tmp + os.sep, path, recursive=True)
    return uri


def _save_pretrained_local(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str) -> None:
    # transformers 5 always writes safetensors; safe_serialization is gone from its signature.
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
