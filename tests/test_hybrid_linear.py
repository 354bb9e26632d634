"""HybridLinear and model conversion: same outputs as the pruned dense model, safetensors round trip, back to dense."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tierprune.adapters import weight_view
from tierprune.errors import TierpruneError
from tierprune.hybrid_linear import HybridLinear, convert_model_, dense_state_dict, prepare_hybrid_
from tierprune.kernels.tiers import tier_keep_mask
from tierprune.tasks.prune import named_linears

from .conftest import make_tiny_llama

BS, K = 16, 10


def _random_tier_map(shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    nbr, nbc = -(-shape[0] // BS), -(-shape[1] // BS)
    return torch.multinomial(torch.tensor([0.35, 0.45, 0.20]), nbr * nbc, replacement=True,
                             generator=g).view(nbr, nbc).to(torch.int8)


def prune_randomly_(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Give every prunable linear a random tier map and apply its keep-mask (survivors by |w|)."""
    g = torch.Generator().manual_seed(seed)
    tier_maps = {}
    with torch.no_grad():
        for name, module in named_linears(model).items():
            W = weight_view(module)
            tier_maps[name] = _random_tier_map(tuple(W.shape), g)
            W.mul_(tier_keep_mask(W.abs().float(), tier_maps[name], BS, K))
    return tier_maps


def _ids(vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _pruned_linear(in_features: int, out_features: int, g: torch.Generator) -> tuple[nn.Linear, HybridLinear]:
    """A linear whose weight obeys a random tier map, and its HybridLinear."""
    linear = nn.Linear(in_features, out_features)
    tier_map = _random_tier_map((out_features, in_features), g)
    with torch.no_grad():
        linear.weight.mul_(tier_keep_mask(linear.weight.abs(), tier_map, BS, K))
    return linear, HybridLinear.from_linear(linear, tier_map)


def test_from_linear_matches_the_linear() -> None:
    g = torch.Generator().manual_seed(0)
    linear, hybrid = _pruned_linear(52, 40, g)
    x = torch.randn(3, 5, 52, generator=g)
    torch.testing.assert_close(hybrid(x), linear(x))
    assert torch.equal(hybrid.dense_weight(), linear.weight)
    assert hybrid.nbytes < linear.weight.numel() * linear.weight.element_size()
    assert "blocks(dense, 2:4, topk)" in repr(hybrid)


def test_from_linear_refuses_an_unpruned_weight() -> None:
    linear = nn.Linear(32, 16)
    with pytest.raises(ValueError, match="breaks its tier map"):
        HybridLinear.from_linear(linear, torch.tensor([[1, 2]], dtype=torch.int8))


def test_converted_llama_gives_the_same_logits() -> None:
    model = make_tiny_llama()
    tier_maps = prune_randomly_(model)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    converted = convert_model_(model, tier_maps)
    assert len(converted) == 14 and all(isinstance(model.get_submodule(n), HybridLinear) for n in converted)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_converted_gpt2_conv1d_gives_the_same_logits() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_inner=128, n_layer=2, n_head=4, vocab_size=128,
                                       n_positions=64)).eval()
    tier_maps = prune_randomly_(model, seed=1)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    convert_model_(model, tier_maps)
    assert model.transformer.h[0].attn.c_attn.transposed
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    # Back to a plain GPT-2 checkpoint: Conv1D weights transposed back to (in, out).
    fresh = GPT2LMHeadModel(model.config).eval()
    fresh.load_state_dict(dense_state_dict(model.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_safetensors_round_trip_and_back_to_plain_transformers(tmp_path) -> None:
    from safetensors.torch import load_file, load_model, save_model

    model = make_tiny_llama(dtype=torch.bfloat16)
    tier_maps = prune_randomly_(model, seed=2)
    ids = _ids()
    convert_model_(model, tier_maps)
    with torch.no_grad():
        expected = model(ids).logits
    path = tmp_path / "hybrid.safetensors"
    save_model(model, str(path))

    fresh = make_tiny_llama(seed=5, dtype=torch.bfloat16)  # other random weights, dense linears
    names = prepare_hybrid_(fresh, load_file(str(path)))
    assert sorted(names) == sorted(tier_maps)
    load_model(fresh, str(path))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expected, rtol=0, atol=0)

    plain = make_tiny_llama(seed=6, dtype=torch.bfloat16)
    state = dense_state_dict(load_file(str(path)))
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight", "model.embed_tokens.weight"}  # tied, saved once
    plain.tie_weights()
    assert all(isinstance(m, nn.Linear) for m in named_linears(plain).values())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, rtol=2e-2, atol=2e-2)


def test_convert_refuses_unknown_names_and_broken_weights() -> None:
    model = make_tiny_llama()
    with pytest.raises(TierpruneError, match="no linear layer named 'model.layers.9.mlp.up_proj'"):
        convert_model_(model, {"model.layers.9.mlp.up_proj": torch.zeros(8, 4, dtype=torch.int8)})
    name = "model.layers.0.mlp.up_proj"
    with pytest.raises(TierpruneError, match=f"{name}: weight breaks its tier map"):
        convert_model_(model, {name: torch.full((8, 4), 2, dtype=torch.int8)})


def test_hybrid_linear_compiles_fullgraph() -> None:
    g = torch.Generator().manual_seed(3)
    linear, hybrid = _pruned_linear(48, 32, g)
    compiled = torch.compile(hybrid, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 48, generator=g)
    torch.testing.assert_close(compiled(x), linear(x))
