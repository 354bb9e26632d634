"""tasks.placement: layers that do not fit the device are streamed through it, and the model is left as it was."""
from __future__ import annotations

import pytest
import torch
from accelerate.utils import compute_module_sizes

from tests.conftest import make_tiny_llama
from tierprune.tasks.evaluate import perplexity
from tierprune.tasks.placement import placed_for_inference, resident_layer_count, streamed

pytestmark = pytest.mark.unit


def _outside_bytes(model) -> int:
    sizes = compute_module_sizes(model)
    return sizes[""] - sizes["model.layers"]


def test_resident_layers_fill_the_budget_in_order(tiny_llama) -> None:
    sizes = compute_module_sizes(tiny_llama)
    layer = sizes["model.layers.0"]
    outside = _outside_bytes(tiny_llama)
    assert resident_layer_count(tiny_llama, None) == 2  # no budget (CPU): everything stays where it runs
    assert resident_layer_count(tiny_llama, outside + layer) == 1
    assert resident_layer_count(tiny_llama, outside + layer - 1) == 0
    assert resident_layer_count(tiny_llama, outside - 1) == 0
    assert resident_layer_count(tiny_llama, sizes[""]) == 2


def test_streamed_layers_give_the_same_numbers_and_leave_no_trace(tiny_llama) -> None:
    model = make_tiny_llama(layers=4)
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    plain_ppl, _ = perplexity(model, ids, 32)
    plain_logits = model(ids[:, :32]).logits
    forwards = [layer.forward for layer in model.model.layers]
    budget = _outside_bytes(model) + compute_module_sizes(model)["model.layers.0"]  # one layer fits
    calls = []
    with streamed(model, "cpu", budget=budget) as n_streamed:
        assert n_streamed == 3
        hooked = [hasattr(layer, "_hf_hook") for layer in model.model.layers]
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda m, a: calls.append(m))
        ppl, _ = perplexity(model, ids, 32)
        logits = model(ids[:, :32]).logits
    assert hooked == [False, True, True, True]
    assert len(calls) == 4 * 5  # every layer ran on every one of the 4 windows and the extra call
    assert ppl == plain_ppl
    assert torch.equal(logits, plain_logits)
    assert not any(hasattr(layer, "_hf_hook") for layer in model.model.layers)
    assert [layer.forward.__func__ for layer in model.model.layers] == [f.__func__ for f in forwards]
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_placed_for_inference_without_offload_moves_the_whole_model(tiny_llama) -> None:
    with placed_for_inference(tiny_llama, "cpu", offload=False):
        assert not any(hasattr(layer, "_hf_hook") for layer in tiny_llama.model.layers)
    with placed_for_inference(tiny_llama, "cpu", offload=True):
        pass  # CPU: no budget, nothing streamed
    assert not any(hasattr(layer, "_hf_hook") for layer in tiny_llama.model.layers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_layers_run_on_the_gpu_and_return_to_cpu(tiny_llama) -> None:
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    plain, _ = perplexity(tiny_llama.cuda(), ids, 32, device="cuda")
    tiny_llama.cpu()
    seen = []
    for layer in tiny_llama.model.layers:  # inside the layer's forward, after the streaming hook moved it
        layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(m.weight.device.type))
    with streamed(tiny_llama, "cuda", budget=_outside_bytes(tiny_llama)) as n_streamed:
        ppl, _ = perplexity(tiny_llama, ids, 32, device="cuda")
    assert n_streamed == 2 and set(seen) == {"cuda"}
    assert ppl == pytest.approx(plain, rel=1e-5)
    assert {p.device.type for p in tiny_llama.parameters()} == {"cpu"}
