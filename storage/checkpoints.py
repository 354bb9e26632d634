"""Checkpoints of a run as content-addressed safetensors blobs, and transformers model folders at any fsspec URI."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from tierprune.errors import TierpruneError

from .formats import single_tensor_file, tensors_from_bytes
from .runstore import RunStore, blob_rel

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "checkpoint_blobs", "save_pretrained_dir"]

CHECKPOINT_FORMAT = "tierprune-checkpoint/1"
# Copies, sha256 and writes of large tensors release the GIL: threads overlap them.
_WORKERS = min(16, os.cpu_count() or 1)


def save_checkpoint(store: RunStore, changed: dict[str, torch.Tensor], unchanged: dict[str, dict]) -> dict:
    """The index of a checkpoint: `changed` tensors written as blobs, `unchanged` index entries kept as they are.

    Hugging Face's sharded layout with one tensor per shard: `weight_map` maps each tensor to its shard (a
    content-addressed blob of the run, relative to the run folder), so shards stay far below 5 GB and a tensor
    whose bytes did not change is never written twice. `tensors` records each one's sha256, size, dtype and shape.
    """
    overlap = set(changed) & set(unchanged)
    if overlap:
        raise TierpruneError(f"tensors both changed and unchanged: {sorted(overlap)[:3]}")

    def put(item: tuple[str, torch.Tensor]) -> tuple[str, dict]:
        name, tensor = item
        with store.timed("copy_seconds"):  # device to host, the one copy of the data
            parts = single_tensor_file(name, tensor)
        digest, size = store.put_blob(parts)  # a safetensors file, written from that copy
        return name, {"sha256": digest, "size": size, "dtype": str(tensor.dtype).removeprefix("torch."),
                      "shape": list(tensor.shape)}

    # At most _WORKERS host copies exist at once (one per running task), so host memory holds a few tensors,
    # never the model; no windows, so a large tensor never keeps the other threads waiting.
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        written = dict(pool.map(put, changed.items()))
    entries = {**unchanged, **written}
    return {
        "format": CHECKPOINT_FORMAT,
        "metadata": {"total_size": sum(e["size"] for e in entries.values())},
        "weight_map": {name: blob_rel(e["sha256"]) for name, e in sorted(entries.items())},
        "tensors": dict(sorted(entries.items())),
    }


def checkpoint_blobs(index: dict) -> dict[str, int]:
    """{sha256: size} of every blob a checkpoint index refers to (what its step commits as `blobs`)."""
    return {e["sha256"]: e["size"] for e in index["tensors"].values()}


def load_checkpoint(store: RunStore, index: dict, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for the named tensors of a checkpoint (all by default), each verified on first read."""
    if index.get("format") != CHECKPOINT_FORMAT:
        raise TierpruneError(f"not a tierprune checkpoint index (format {index.get('format')!r})")
    entries = index["tensors"]
    names = list(entries) if names is None else names

    def get(name: str) -> tuple[str, torch.Tensor]:
        return name, tensors_from_bytes(store.read_blob(entries[name]["sha256"]))[name]

    # A bounded window of reads in flight: the whole checkpoint is never in host memory at once.
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        for start in range(0, len(names), 2 * _WORKERS):
            yield from pool.map(get, names[start:start + 2 * _WORKERS])


def save_pretrained_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, uri: str, *,
                        weights: bool = True) -> str:
    """Save a transformers model (safetensors) and its tokenizer as a from_pretrained folder at uri.

    weights=False writes only the config (and generation config) and the tokenizer: a packed model's folder.
    """
    fs, path = url_to_fs(uri)
    if fs.isfile(path):
        raise TierpruneError(f"cannot save a model folder at {uri}: it is a file")
    if isinstance(fs, LocalFileSystem):
        _save_pretrained_local(model, tokenizer, path, weights)
        return uri
    with tempfile.TemporaryDirectory() as tmp:
        _save_pretrained_local(model, tokenizer, tmp, weights)
        # The trailing separator copies the folder's contents into path, whether path exists or not.
        fs.put(tmp + os.sep, path, recursive=True)
    return uri


def _save_pretrained_local(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str,
                           weights: bool) -> None:
    # tierprune.models.load_model turns the KV cache off for layer-wise calibration and evaluation; a saved
    # model is for decoding, so its config says use_cache true again (transformers' default), not our setting.
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is False:
        model.config.use_cache = True
    try:
        _save_model_and_tokenizer(model, tokenizer, directory, weights)
    finally:
        if use_cache is False:
            model.config.use_cache = False


def _save_model_and_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str,
                              weights: bool) -> None:
    if weights:
        # transformers 5 always writes safetensors; safe_serialization is gone from its signature.
        model.save_pretrained(directory)
        _permissions_as_umask(directory, ".safetensors")
    else:
        os.makedirs(directory, exist_ok=True)
        model.config.save_pretrained(directory)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _permissions_as_umask(directory: str, suffix: str) -> None:
    """Give the files ending in `suffix` the mode any new file gets (0o666 less the umask).

    safetensors ≥ 0.8 writes through a temporary file created 0600 and renames it (safetensors issue
    #782), so a model folder saved by root for a container's other user would have an unreadable
    model.safetensors beside a readable config.json.
    """
    umask = _current_umask()
    for entry in os.scandir(directory):
        if entry.is_file() and entry.name.endswith(suffix):
            os.chmod(entry.path, 0o666 & ~umask)


def _current_umask() -> int:
    try:  # Linux says it without changing it
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0)  # elsewhere, reading it means setting it (for every thread): put back at once
    os.umask(umask)
    return umask
