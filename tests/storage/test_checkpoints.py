"""Tests for tierprune.storage.checkpoints: safetensors files and from_pretrained folders."""
from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch

from tierprune.errors import TierpruneError
from tierprune.storage.checkpoints import checkpoint_blobs, load_checkpoint, save_checkpoint, save_pretrained_dir
from tierprune.storage.formats import (
    pack_mask,
    single_tensor_file,
    tensor_file_bytes,
    tensor_file_metadata,
    tensors_from_bytes,
    unpack_mask,
)
from tierprune.storage.runstore import CorruptArtifactError, RunStore, blob_rel

pytestmark = pytest.mark.unit


def _listing(root: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(root)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.find(path))


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 6, generator=g)
    return {
        "layers.0.weight": weight,
        "layers.0.weight_t": weight.t(),  # non-contiguous view sharing weight's storage
        "layers.0.mask": torch.rand(8, 6, generator=g) > 0.5,
        "layers.0.bias": torch.randn(8, generator=g, dtype=torch.float64).to(torch.bfloat16),
        "step": torch.tensor(3, dtype=torch.int64),
    }


def test_tensor_file_round_trip_with_views_shared_storage_and_metadata() -> None:
    tensors = _tensors()
    data = tensor_file_bytes(tensors, {"shapes": "[1]"})
    back = tensors_from_bytes(data)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert tensor_file_metadata(data) == {"shapes": "[1]"}


@pytest.mark.parametrize("shape", [(1,), (7,), (8, 6), (3, 5, 7)])
def test_mask_bits_round_trip(shape: tuple[int, ...]) -> None:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.5
    bits = pack_mask(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(bits, shape), mask)


def test_checkpoint_stores_each_tensor_once_and_rewrites_only_what_changed(root: str) -> None:
    store = RunStore(root, "r")
    first = {"a": torch.randn(16, 8), "b": torch.randn(4), "c": torch.zeros(3, dtype=torch.bfloat16)}
    index = save_checkpoint(store, first, {})
    assert set(index["tensors"]) == {"a", "b", "c"} and index["metadata"]["total_size"] == sum(
        e["size"] for e in index["tensors"].values())
    assert index["weight_map"]["a"] == blob_rel(index["tensors"]["a"]["sha256"])
    # The next checkpoint changes "a" only: one new blob, the others referenced by hash.
    changed = {"a": first["a"] * 2}
    second = save_checkpoint(store, changed, {k: v for k, v in index["tensors"].items() if k != "a"})
    assert second["tensors"]["b"] == index["tensors"]["b"] and second["tensors"]["a"] != index["tensors"]["a"]
    fs, path = fsspec.core.url_to_fs(f"{store.uri}/blobs")
    assert len(fs.find(path)) == 4  # a, a*2, b, c
    back = dict(load_checkpoint(store, second))
    assert torch.equal(back["a"], first["a"] * 2) and torch.equal(back["b"], first["b"])
    assert back["c"].dtype == torch.bfloat16
    assert checkpoint_blobs(second) == {e["sha256"]: e["size"] for e in second["tensors"].values()}
    # Saving bytes that are already stored writes nothing new.
    assert save_checkpoint(store, {"a": first["a"]}, {})["tensors"]["a"] == index["tensors"]["a"]
    assert len(fs.find(path)) == 4


def test_a_damaged_blob_is_refused_on_first_read(root: str) -> None:
    index = save_checkpoint(RunStore(root, "r"), {"a": torch.randn(16, 8)}, {})
    fs, path = fsspec.core.url_to_fs(f"{RunStore(root, 'r').uri}/{index['weight_map']['a']}")
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    with pytest.raises(CorruptArtifactError, match="corrupt"):
        dict(load_checkpoint(RunStore(root, "r"), index))  # a fresh process (object) verifies what it reads


def _tiny_llama_and_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    return model, tokenizer


def _assert_same_model(directory: Path | str, model: torch.nn.Module) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    expected = model.state_dict()
    got = reloaded.state_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(directory)("w3 w7 w63")["input_ids"][-3:] == [3, 7, 63]


def test_save_pretrained_dir_local(tmp_path: Path) -> None:
    model, tokenizer = _tiny_llama_and_tokenizer()
    uri = str(tmp_path / "model")
    assert save_pretrained_dir(model, tokenizer, uri) == uri
    assert (tmp_path / "model" / "model.safetensors").is_file()
    _assert_same_model(uri, model)


@pytest.mark.parametrize("weights", [True, False])
def test_saved_config_keeps_the_kv_cache_on_that_calibration_turned_off(tmp_path: Path, weights: bool) -> None:
    """load_model sets use_cache False for layer-wise work; an exported or packed folder is for decoding."""
    model, tokenizer = _tiny_llama_and_tokenizer()
    model.config.use_cache = False  # as tierprune.models.load_model leaves it
    save_pretrained_dir(model, tokenizer, str(tmp_path / "model"), weights=weights)
    assert json.loads((tmp_path / "model" / "config.json").read_text())["use_cache"] is True
    assert model.config.use_cache is False  # the working model keeps calibrating without a cache


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_weights_are_as_readable_as_the_config(tmp_path: Path, umask: int) -> None:
    """safetensors writes 0600 whatever the umask (its issue #782): a folder saved for another user must not."""
    model, tokenizer = _tiny_llama_and_tokenizer()
    old = os.umask(umask)
    try:
        save_pretrained_dir(model, tokenizer, str(tmp_path / "model"))
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "model" / "model.safetensors").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "model" / "config.json").stat().st_mode)


def test_save_pretrained_dir_memory(tmp_path: Path, mem_root: str) -> None:
    model, tokenizer = _tiny_llama_and_tokenizer()
    uri = f"{mem_root}/model"
    save_pretrained_dir(model, tokenizer, uri)
    save_pretrained_dir(model, tokenizer, uri)  # saving again overwrites in place, no nested copy
    fs, path = fsspec.core.url_to_fs(uri)
    names = _listing(uri)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    assert all(p.count("/") == path.count("/") + 1 for p in fs.find(path))
    fs.get(path + "/", str(tmp_path / "copy"), recursive=True)
    _assert_same_model(tmp_path / "copy", model)


def test_save_pretrained_dir_onto_file_refused(tmp_path: Path) -> None:
    model, tokenizer = _tiny_llama_and_tokenizer()
    target = tmp_path / "model"
    target.write_text("x")
    with pytest.raises(TierpruneError, match="is a file") as info:
        save_pretrained_dir(model, tokenizer, str(target))
    assert str(target) in str(info.value)


@pytest.mark.parametrize("tensor", [torch.randn(3, 5).bfloat16(), torch.tensor(3), torch.zeros(0), torch.randn(7),
                                    torch.rand(4, 4) > 0.5, torch.randn(2, 3, 4).half(), torch.randn(6, 4).t()])
def test_single_tensor_file_is_what_safetensors_writes(tensor: torch.Tensor) -> None:
    import safetensors.torch

    header, data = single_tensor_file("model.layers.0.mlp.up_proj.weight", tensor)
    assert header + bytes(data) == safetensors.torch.save({"model.layers.0.mlp.up_proj.weight": tensor.contiguous()})
