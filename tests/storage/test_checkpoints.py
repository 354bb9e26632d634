"""Tests for tierprune.storage.checkpoints: safetensors files and from_pretrained folders."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch

from tierprune.errors import TierpruneError
from tierprune.storage.checkpoints import (
    load_tensor_metadata,
    load_tensors,
    save_pretrained_dir,
    save_tensors,
)

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


def test_round_trip_with_metadata(root: str) -> None:
    uri = f"{root}/run/ckpt.safetensors"
    metadata = {"run_id": "r1", "step": "3", "tiers": "35/45/20"}
    assert save_tensors(_tensors(), uri, metadata) == uri
    loaded = load_tensors(uri)
    assert loaded.keys() == _tensors().keys()
    for name, expected in _tensors().items():
        torch.testing.assert_close(loaded[name], expected, rtol=0, atol=0)
        assert loaded[name].dtype == expected.dtype and loaded[name].device.type == "cpu"
    assert load_tensor_metadata(uri) == metadata
    assert _listing(root) == ["ckpt.safetensors"]


def test_without_metadata_and_overwrite(root: str) -> None:
    uri = f"{root}/a.safetensors"
    save_tensors({"x": torch.zeros(2)}, uri, {"v": "1"})
    save_tensors({"y": torch.ones(3)}, uri)
    assert list(load_tensors(uri)) == ["y"]
    assert load_tensor_metadata(uri) == {}
    assert _listing(root) == ["a.safetensors"]


def test_inputs_are_not_modified(root: str) -> None:
    tensors = _tensors()
    before = {k: v.clone() for k, v in tensors.items()}
    save_tensors(tensors, f"{root}/a.safetensors")
    loaded = load_tensors(f"{root}/a.safetensors")
    loaded["layers.0.weight"].add_(1)  # loaded tensors are independent of the saved ones
    for name in tensors:
        assert torch.equal(tensors[name], before[name])


def test_missing_file_names_uri(root: str) -> None:
    uri = f"{root}/missing.safetensors"
    with pytest.raises(TierpruneError, match="no tensor file at") as info:
        load_tensors(uri)
    assert uri in str(info.value)
    with pytest.raises(TierpruneError, match="no tensor file at"):
        load_tensor_metadata(uri)


def test_bad_metadata_and_values_refused(root: str) -> None:
    uri = f"{root}/a.safetensors"
    with pytest.raises(TierpruneError, match="must map str to str") as info:
        save_tensors({"x": torch.zeros(1)}, uri, {"step": 3})  # type: ignore[dict-item]
    assert uri in str(info.value)
    with pytest.raises(TierpruneError, match="not a torch.Tensor"):
        save_tensors({"x": [1.0, 2.0]}, uri)  # type: ignore[dict-item]
    assert _listing(root) == []


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
