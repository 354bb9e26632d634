"""Recovery fine-tuning (tasks.training) on tiny LLaMAs: exact masks, exact LoRA merge, determinism, resume, data."""
from __future__ import annotations

import copy
import json
import math
import random
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from tests.conftest import make_tiny_llama
from tierprune.adapters import weight_view
from tierprune.errors import TierpruneError
from tierprune.storage.datasets import load_texts
from tierprune.tasks.calibration import sample_calibration
from tierprune.tasks.prune import named_linears
from tierprune.config import FinetuneConfig as _ProjectFinetuneConfig
from tierprune.tasks.training import (
    TeacherTopK,
    TrainState,
    apply_masks_,
    calibration_doc_indices,
    check_disjoint,
    corpus_stream,
    distillation_loss,
    finetune_model_,
    fade_factor,
    finetune_windows,
    hidden_state_loss,
    iteration_tokens,
    mask_gradients,
    masks_applied,
    merge_lora_,
    teacher_topk_logits,
    wrap_lora,
)



def FinetuneConfig(**fields) -> _ProjectFinetuneConfig:
    # The library's tests train with cross-entropy and no state commits unless a test asks for them
    # (the project's defaults, distillation and commits every 100 steps, need a teacher and a store).
    return _ProjectFinetuneConfig(**{"kd_weight": 0.0, "commit_every": 0, **fields})


VOCAB = 128


def random_masks(model, keep: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(weight_view(m).shape, generator=gen) < keep for name, m in named_linears(model).items()}


def token_windows(n: int, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    """Windows of a simple learnable language: token t+1 = (token t · 5 + 3) mod VOCAB, with random restarts."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, seqlen, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (n,), generator=gen)
    for t in range(1, seqlen):
        restart = torch.rand(n, generator=gen) < 0.1
        ids[:, t] = torch.where(restart, torch.randint(0, VOCAB, (n,), generator=gen), (ids[:, t - 1] * 5 + 3) % VOCAB)
    return ids


def pruned_nonzeros(model, masks) -> int:
    return sum(int((weight_view(m)[~masks[n]] != 0).sum()) for n, m in named_linears(model).items())


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_params(a, b) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n


def storage_roundtrip(state: TrainState) -> TrainState:
    """The state through safetensors bytes and JSON, as the run store keeps it."""
    tensors, meta = state.as_dicts()
    return TrainState.from_dicts(load_safetensors(save_safetensors(tensors)), json.loads(json.dumps(meta)))


# ------------------------------------------------------------------------------------------ config, budget

def test_config_is_frozen_strict_and_consistent() -> None:
    cfg = FinetuneConfig(tokens_per_epoch=1000, lora_targets=["q_proj"])
    assert cfg.lora_targets == ("q_proj",)
    with pytest.raises(ValueError):
        FinetuneConfig(unknown_field=1)
    with pytest.raises(ValueError):
        FinetuneConfig(warmup_steps=5, warmup_fraction=0.1)
    with pytest.raises(ValueError):
        FinetuneConfig(patience=2)  # early stopping needs evaluations
    with pytest.raises(ValueError):
        FinetuneConfig(kd_weight=1.5)
    with pytest.raises(Exception):
        cfg.lr = 1.0  # frozen


def test_budget_is_epochs_times_tokens_per_epoch() -> None:
    cfg = FinetuneConfig(tokens_per_epoch=4096)
    assert iteration_tokens(cfg, 3) == 3 * 4096
    assert iteration_tokens(cfg, 0) == 0
    assert iteration_tokens(cfg, 0.1) == 410  # the smoke plan's epochs
    assert iteration_tokens(cfg.model_copy(update={"method": "none"}), 3) == 0
    with pytest.raises(TierpruneError):
        iteration_tokens(cfg, -1)


def test_zero_tokens_trains_nothing_but_applies_masks() -> None:
    model = make_tiny_llama()
    masks = random_masks(model)
    before = params(model)
    result = finetune_model_(model, masks, torch.empty(0, 32, dtype=torch.long), FinetuneConfig())
    assert result.steps == 0 and result.tokens == 0 and pruned_nonzeros(model, masks) == 0
    for name, m in named_linears(model).items():  # kept weights untouched
        assert torch.equal(m.weight[masks[name]], before[f"{name}.weight"][masks[name]])  # LLaMA: (out, in) as stored


# -------------------------------------------------------------------------------------------------- masks

def test_gradients_of_pruned_weights_are_zero() -> None:
    model = make_tiny_llama()
    masks = random_masks(model)
    apply_masks_(model, masks)
    x = token_windows(2)

    model(input_ids=x, labels=x).loss.backward()
    leaking = sum(int((m.weight.grad[~masks[n]] != 0).sum()) for n, m in named_linears(model).items())
    assert leaking > 0  # without the hooks, pruned weights do get gradients

    model.zero_grad(set_to_none=True)
    handles = mask_gradients(model, masks)
    model(input_ids=x, labels=x).loss.backward()
    for name, m in named_linears(model).items():
        grad = m.weight.grad
        assert torch.count_nonzero(grad[~masks[name]]) == 0, name
        assert torch.count_nonzero(grad[masks[name]]) > 0, name
    for h in handles:
        h.remove()


def test_bad_masks_are_refused() -> None:
    model = make_tiny_llama()
    masks = random_masks(model)
    name = "model.layers.0.mlp.up_proj"  # (128, 64): not square, so a transposed mask is the wrong shape
    with pytest.raises(TierpruneError, match="not a module"):
        apply_masks_(model, {"model.layers.9.mlp.up_proj": masks[name]})
    with pytest.raises(TierpruneError, match="bool mask"):
        apply_masks_(model, {name: masks[name].t()})
    with pytest.raises(TierpruneError, match="bool mask"):
        apply_masks_(model, {name: masks[name].float()})


@pytest.mark.parametrize("train", ["linears", "all_but_embeddings", "all"])
def test_mask_holds_after_optimizer_steps_with_weight_decay(train: str) -> None:
    model = make_tiny_llama()
    masks = random_masks(model, keep=0.4)
    start = params(model)
    cfg = FinetuneConfig(method="full", train=train, lr=1e-2, weight_decay=0.5, batch_size=4, schedule="constant")
    result = finetune_model_(model, masks, token_windows(12), cfg)
    assert result.steps == 3 and result.tokens == 12 * 32
    assert pruned_nonzeros(model, masks) == 0
    after = params(model)
    for name in masks:  # every masked linear trained
        kept = masks[name]
        assert not torch.equal(after[f"{name}.weight"][kept], start[f"{name}.weight"][kept])
    embed = "model.embed_tokens.weight"
    assert torch.equal(after[embed], start[embed]) == (train != "all")
    norm = "model.norm.weight"
    assert torch.equal(after[norm], start[norm]) == (train == "linears")
    assert all(p.requires_grad for p in model.parameters())  # flags restored as they were


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_bf16_model_trains_on_fp32_master_weights_and_stays_bf16(method: str) -> None:
    model = make_tiny_llama(dtype=torch.bfloat16)
    masks = random_masks(model, keep=0.4)
    start = params(model)
    # Steps of lr 2e-5 are under half a bf16 ulp for weights above ~0.008: applied to bf16 weights they
    # vanish one by one; summed in fp32 copies over 16 steps they change the weight.
    cfg = FinetuneConfig(method=method, lr=2e-5, batch_size=1, schedule="constant", lora_rank=4, lora_alpha=64)
    result = finetune_model_(model, masks, token_windows(16), cfg, val_ids=token_windows(4, seed=9))
    assert result.steps == 16 and all(math.isfinite(v) for v in result.losses)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert pruned_nonzeros(model, masks) == 0
    large = {n: masks[n] & (start[f"{n}.weight"].abs() > 0.01) for n in masks}
    changed = sum(int((params(model)[f"{n}.weight"] != start[f"{n}.weight"])[large[n]].sum()) for n in masks)
    assert changed > 0.5 * sum(int(m.sum()) for m in large.values())


# ------------------------------------------------------------------------------------------------ fading

def test_masks_applied_zeroes_inside_and_restores_bit_for_bit() -> None:
    model = make_tiny_llama()
    masks = random_masks(model)
    start = params(model)
    with masks_applied(model, masks):
        assert pruned_nonzeros(model, masks) == 0
    after = params(model)
    assert all(torch.equal(after[n], start[n]) for n in start)


def test_fade_factor_goes_linearly_from_one_to_zero() -> None:
    assert [fade_factor(s, 4) for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert fade_factor(0, 0) == 0.0  # no fade: removed at once


def _nested_masks(model, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(before, after) keep-masks of one demotion: `after` keeps a subset of what `before` keeps."""
    before = random_masks(model, keep=0.7, seed=seed)
    after = {n: m & random_masks(model, keep=0.6, seed=seed + 1)[n] for n, m in before.items()}
    return before, after


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_demoted_weights_fade_linearly_while_frozen_then_the_masks_are_exact(method: str, dtype) -> None:
    model = make_tiny_llama(dtype=dtype)
    earlier, masks = _nested_masks(model)
    apply_masks_(model, earlier)  # the previous iteration's pruning
    start = params(model)
    linears = named_linears(model)
    removed = {n: earlier[n] & ~masks[n] for n in masks}
    seen = []

    def check(step: int, total: int) -> None:
        factor = fade_factor(step, 4)
        for name, m in linears.items():
            w, w0 = m.weight.detach(), start[f"{name}.weight"]
            # the demoted weights at their fraction of what they were: frozen, only fading
            # (bf16: full fine-tuning trains fp32 master weights, LoRA leaves the base weights in bf16)
            assert torch.equal(w[removed[name]], (w0[removed[name]].float() * factor).to(w.dtype)), (step, name)
            assert torch.count_nonzero(w[~earlier[name]]) == 0  # pruned before stays pruned
        seen.append(step)

    cfg = FinetuneConfig(method=method, lr=1e-2, batch_size=2, schedule="constant", lora_rank=4, fade_fraction=0.5)
    result = finetune_model_(model, masks, token_windows(16), cfg, on_progress=check)
    assert result.steps == 8 and seen == list(range(0, 9))  # before the first step, then 8; the fade over 4
    assert pruned_nonzeros(model, masks) == 0
    kept = "model.layers.0.mlp.up_proj"
    assert not torch.equal(linears[kept].weight[masks[kept]], start[f"{kept}.weight"][masks[kept]])  # trained

    assert {p.dtype for p in model.parameters()} == {dtype}
    unfaded = make_tiny_llama(dtype=dtype)
    apply_masks_(unfaded, earlier)
    finetune_model_(unfaded, masks, token_windows(16), cfg.model_copy(update={"fade_fraction": 0.0}))
    assert not torch.equal(unfaded.model.layers[0].mlp.up_proj.weight, linears[kept].weight)  # fading trains otherwise


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_in_the_middle_of_a_fade_equals_an_uninterrupted_run(method: str) -> None:
    teacher, ids, val = make_tiny_llama(seed=1), token_windows(20), token_windows(4, seed=9)
    cfg = _run_cfg(method).model_copy(update={"fade_fraction": 0.6})  # 5 steps, fading over 3; a state at step 2
    whole = make_tiny_llama()
    masks = random_masks(whole)
    states: list[TrainState] = []
    full_result = finetune_model_(whole, masks, ids, cfg, teacher=teacher, val_ids=val, on_step=states.append)
    resumed = make_tiny_llama()  # as loaded at the start of the iteration: the demoted weights whole again
    result = finetune_model_(resumed, masks, ids, cfg, teacher=teacher, val_ids=val, state=storage_roundtrip(states[0]))
    assert_same_params(resumed, whole)
    assert result.losses == full_result.losses and result.val_losses == full_result.val_losses
    assert pruned_nonzeros(whole, masks) == 0


# --------------------------------------------------------------------------------------------------- LoRA

def test_lora_merge_is_exact_and_keeps_the_sparsity() -> None:
    model = make_tiny_llama()
    masks = random_masks(model, keep=0.3)
    apply_masks_(model, masks)
    base = params(model)
    keys_before = sorted(model.state_dict())
    cfg = FinetuneConfig(method="lora", lora_rank=4, lora_alpha=8, lr=2e-2, batch_size=4,
                         lora_targets=["q_proj", "v_proj", "down_proj"], commit_every=100)
    states: list[TrainState] = []
    result = finetune_model_(model, masks, token_windows(16), cfg, on_step=states.append)
    assert result.steps == 4 and states[-1].step == 4

    assert pruned_nonzeros(model, masks) == 0  # zero new non-zeros
    assert sorted(model.state_dict()) == keys_before  # a plain model again, no adapter left behind
    adapters = {k.removeprefix("param/"): v for k, v in states[-1].tensors.items() if k.startswith("param/")}
    scaling = cfg.lora_alpha / cfg.lora_rank
    after = params(model)
    for name in masks:
        W = f"{name}.weight"
        lora = [k for k in adapters if f".{name}." in k]
        if name.rsplit(".", 1)[-1] not in cfg.lora_targets:
            assert not lora and torch.equal(after[W], base[W])
            continue
        A = next(adapters[k] for k in lora if "lora_A" in k)  # (r, in)
        B = next(adapters[k] for k in lora if "lora_B" in k)  # (out, r)
        want = (base[W] + (B @ A) * scaling).masked_fill(~masks[name], 0)
        torch.testing.assert_close(after[W], want, rtol=0, atol=1e-7)
        assert not torch.equal(after[W], base[W])  # the adapter did learn something


def test_masked_lora_computes_what_the_merged_model_computes() -> None:
    model = make_tiny_llama()
    masks = random_masks(model, keep=0.3)
    apply_masks_(model, masks)
    cfg = FinetuneConfig(method="lora", lora_rank=4)
    peft_model = wrap_lora(model, masks, cfg)
    with torch.no_grad():  # B starts at zero: give the adapters a dense update to mask
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x = token_windows(2)
    with torch.no_grad():
        during = peft_model(input_ids=x).logits
    merged = merge_lora_(peft_model, masks)
    assert merged is model
    with torch.no_grad():
        after = merged(input_ids=x).logits
    torch.testing.assert_close(after, during, rtol=1e-5, atol=1e-5)
    assert pruned_nonzeros(merged, masks) == 0


def test_unknown_lora_targets_are_refused() -> None:
    model = make_tiny_llama()
    with pytest.raises(TierpruneError, match="LoRA targets"):
        finetune_model_(model, random_masks(model), token_windows(4),
                        FinetuneConfig(method="lora", lora_targets=["no_such_proj"]))


# ------------------------------------------------------------------------------ determinism and resume

def _run_cfg(method: str) -> FinetuneConfig:
    return FinetuneConfig(method=method, lr=5e-3, weight_decay=0.1, batch_size=2, grad_accum=2, schedule="cosine",
                          warmup_steps=2, kd_weight=0.5, kd_temperature=2.0, lora_rank=4, eval_every=2,
                          commit_every=2, seed=7)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_runs_are_bit_identical(method: str) -> None:
    teacher, ids, val = make_tiny_llama(seed=1), token_windows(20), token_windows(4, seed=9)
    runs = []
    for _ in range(2):
        model = make_tiny_llama()
        masks = random_masks(model)
        result = finetune_model_(model, masks, ids, _run_cfg(method), teacher=teacher, val_ids=val)
        runs.append((model, result))
    (a, ra), (b, rb) = runs
    assert_same_params(a, b)
    assert ra.losses == rb.losses and ra.val_losses == rb.val_losses and len(ra.losses) == 5


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_mid_training_equals_an_uninterrupted_run(method: str) -> None:
    teacher, ids, val = make_tiny_llama(seed=1), token_windows(20), token_windows(4, seed=9)
    cfg = _run_cfg(method)
    whole = make_tiny_llama()
    masks = random_masks(whole)
    states: list[TrainState] = []
    full_result = finetune_model_(whole, masks, ids, cfg, teacher=teacher, val_ids=val, on_step=states.append)
    assert [s.step for s in states] == [2, 4, 5]

    # A fresh process: the model as loaded at the start of the iteration, the state from the store.
    resumed = make_tiny_llama()
    result = finetune_model_(resumed, masks, ids, cfg, teacher=teacher, val_ids=val, state=storage_roundtrip(states[0]))
    assert_same_params(resumed, whole)
    assert result.losses == full_result.losses and result.val_losses == full_result.val_losses
    assert result.steps == full_result.steps and result.tokens == full_result.tokens

    other = cfg.model_copy(update={"lr": 1e-3})
    with pytest.raises(TierpruneError, match="another run"):
        finetune_model_(make_tiny_llama(), masks, ids, other, teacher=teacher, state=states[0])


def test_fisher_is_the_bias_corrected_mean_squared_masked_gradient_and_survives_a_resume() -> None:
    teacher, ids = make_tiny_llama(seed=1), token_windows(20)
    cfg = _run_cfg("full")
    model = make_tiny_llama()
    masks = random_masks(model)
    states: list[TrainState] = []
    result = finetune_model_(model, masks, ids, cfg, teacher=teacher, on_step=states.append, fisher=True)
    assert set(result.fisher) == set(masks)
    for name, F in result.fisher.items():
        assert F.dtype == torch.bfloat16 and F.shape == masks[name].shape  # (out, in), as the masks
        assert (F[~masks[name]] == 0).all()  # pruned weights get no gradient
        assert (F[masks[name]] > 0).float().mean() > 0.99  # (a kept weight may see exact-zero gradients)

    # One weight by hand: AdamW's second moment over the 5 steps, divided by 1 - β2^5.
    replay = make_tiny_llama()
    name = next(iter(masks))
    module = named_linears(replay)[name]
    sums = []
    hooks = []
    for p_name, p in replay.named_parameters():
        if p is module.weight:
            hooks.append(p.register_hook(lambda g: sums.append(g.detach().clone())))
    finetune_model_(replay, masks, ids, cfg, teacher=teacher)
    for h in hooks:
        h.remove()
    # gradients arrive per micro-batch (grad_accum 2, weighted by their share of the step's windows)
    steps = [sums[i] + sums[i + 1] for i in range(0, len(sums) - 1, 2)] + ([sums[-1]] if len(sums) % 2 else [])
    beta2 = 0.999
    v = torch.zeros_like(steps[0])
    for g in steps:
        v = beta2 * v + (1 - beta2) * (g * masks[name]) ** 2
    expected = v / (1 - beta2 ** len(steps))
    torch.testing.assert_close(result.fisher[name].float(), expected.bfloat16().float(), rtol=0.02, atol=0)

    # A run resumed from its first committed state ends with the same statistics.
    resumed = make_tiny_llama()
    again = finetune_model_(resumed, masks, ids, cfg, teacher=teacher, state=storage_roundtrip(states[0]), fisher=True)
    for n in masks:
        assert torch.equal(again.fisher[n], result.fisher[n])
    # LoRA leaves the base weights frozen: nothing to measure.
    lora = finetune_model_(make_tiny_llama(), masks, ids, _run_cfg("lora"), teacher=teacher, fisher=True)
    assert lora.fisher == {}


def test_a_resume_may_commit_at_another_interval_and_compile() -> None:
    """How often states are committed, and compiling, change how a run goes, not what it trains: a state
    saved with one setting resumes under the other (the run's identity leaves both out as well)."""
    teacher, ids, val = make_tiny_llama(seed=1), token_windows(20), token_windows(4, seed=9)
    cfg = _run_cfg("full")
    masks = random_masks(make_tiny_llama())
    states: list[TrainState] = []
    finetune_model_(make_tiny_llama(), masks, ids, cfg, teacher=teacher, val_ids=val, on_step=states.append)
    changed = cfg.model_copy(update={"commit_every": 3})
    result = finetune_model_(make_tiny_llama(), masks, ids, changed, teacher=teacher, val_ids=val,
                             state=storage_roundtrip(states[0]))
    assert result.steps == 5


def test_states_are_committed_by_time_unless_a_step_interval_is_given(monkeypatch) -> None:
    """The default commits every commit_minutes of training (plus the last step), not every N steps."""
    import tierprune.tasks.training as training

    assert _ProjectFinetuneConfig().commit_every is None and _ProjectFinetuneConfig().commit_minutes > 0
    clock = iter(float(t) for t in range(0, 10_000, 50))  # each reading of the clock 50 s after the last
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    teacher, ids = make_tiny_llama(seed=1), token_windows(20)
    cfg = _run_cfg("full").model_copy(update={"commit_every": None, "commit_minutes": 1.5})
    states: list[TrainState] = []
    result = finetune_model_(make_tiny_llama(), random_masks(make_tiny_llama()), ids, cfg, teacher=teacher,
                             on_step=states.append)
    steps = [s.step for s in states]
    # 50 s a step: a state once 90 s have passed since the last one, and one at the end
    assert steps == [2, 4, 5], steps
    assert len(result.losses) == 5 and states[0].meta["losses"] == result.losses[:2]
    never = cfg.model_copy(update={"commit_minutes": 0.0})
    states.clear()
    finetune_model_(make_tiny_llama(), random_masks(make_tiny_llama()), ids, never, teacher=teacher,
                    on_step=states.append)
    assert states == []


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_compiled_training_matches_eager_and_keeps_the_masks(method: str) -> None:
    teacher, ids = make_tiny_llama(seed=1), token_windows(12)
    runs = {}
    for compiled in (False, True):
        model = make_tiny_llama()
        masks = random_masks(model)
        cfg = FinetuneConfig(method=method, lr=5e-3, batch_size=4, kd_weight=0.5, lora_rank=4, compile=compiled)
        compiled_during = []  # decoder layers (student's and teacher's) compiled while it trains

        def count_compiled(step: int, total: int) -> None:
            compiled_during.append(sum(getattr(m, "_compiled_call_impl", None) is not None
                                       for net in (model, teacher) for m in net.modules()))

        result = finetune_model_(model, masks, ids, cfg, teacher=teacher, on_progress=count_compiled)
        assert pruned_nonzeros(model, masks) == 0
        layers = 2 * len(model.model.layers)
        assert compiled_during == [layers if compiled else 0] * 4  # compiled before the first step, until the last
        assert not any(getattr(m, "_compiled_call_impl", None) for net in (model, teacher) for m in net.modules())
        runs[compiled] = (params(model), result.losses)
    (eager, eager_losses), (fast, fast_losses) = runs[False], runs[True]
    assert len(fast_losses) == len(eager_losses) == 3
    assert fast_losses == pytest.approx(eager_losses, rel=1e-4)  # fused kernels round differently, no more
    for name in eager:  # Adam turns a rounding-sized gradient difference into up to lr-sized steps: 1e-4 of 5e-3
        torch.testing.assert_close(fast[name], eager[name], rtol=1e-3, atol=2e-4)


def test_compiled_training_of_a_gpt2_compiles_its_blocks_and_keeps_the_masks() -> None:
    """Regional compilation finds any stack of identical blocks: GPT-2's `transformer.h`, whose linears are
    transposed Conv1D. (All eleven adapters' tiny models were checked this way once, each in a process of
    its own: dynamo allows 8 traces of one code object, and transformers' layers share their __call__.)"""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(seed: int):
        torch.manual_seed(seed)
        config = GPT2Config(n_embd=64, n_inner=128, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                            bos_token_id=0, eos_token_id=0, use_cache=False)
        return GPT2LMHeadModel(config).eval()

    ids = token_windows(8, seqlen=16)  # cross-entropy only: no teacher to compile, half the compile time
    runs = {}
    for compiled in (False, True):
        model = gpt2(0)
        masks = random_masks(model)
        cfg = FinetuneConfig(method="full", lr=5e-3, batch_size=4, kd_weight=0.0, compile=compiled)
        compiled_during = []

        def count_compiled(step: int, total: int) -> None:
            compiled_during.append(sum(getattr(m, "_compiled_call_impl", None) is not None
                                       for m in model.modules()))

        result = finetune_model_(model, masks, ids, cfg, on_progress=count_compiled)
        assert pruned_nonzeros(model, masks) == 0
        assert compiled_during == [len(model.transformer.h) if compiled else 0] * 3
        runs[compiled] = result.losses
    assert runs[True] == pytest.approx(runs[False], rel=1e-2)  # rounding, through Adam: see the LLaMA test


def test_early_stopping_on_held_out_loss() -> None:
    model = make_tiny_llama()
    # A learning rate far too high: the held-out loss stops improving, and patience 2 ends the run.
    cfg = FinetuneConfig(method="full", lr=0.5, batch_size=2, eval_every=1, patience=2, schedule="constant")
    result = finetune_model_(model, random_masks(model), token_windows(40), cfg, val_ids=token_windows(4, seed=9))
    assert result.stopped_early and result.steps < 20
    vals = [v for _, v in result.val_losses]
    assert min(vals[-2:]) >= min(vals[:-2])


# ------------------------------------------------------------------------------------ distillation

def _mean_kl(student, teacher, ids) -> float:
    with torch.no_grad():
        return distillation_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits).item()


@pytest.fixture(scope="module")
def trained_teacher():
    """A tiny LLaMA trained on token_windows' language: a randomly initialised one hardly depends on its
    linears (pruning 70% of them moves its outputs by a KL of 1e-4), so there would be nothing to recover."""
    teacher = make_tiny_llama(seed=3)
    everything = {n: torch.ones_like(m) for n, m in random_masks(teacher).items()}
    cfg = FinetuneConfig(method="full", train="all", lr=1e-2, batch_size=8, schedule="constant")
    finetune_model_(teacher, everything, token_windows(256, seed=5), cfg)
    return teacher.requires_grad_(False)


@pytest.mark.parametrize("teacher_form", ["model", "topk"])
def test_distillation_only_moves_the_student_towards_the_teacher(trained_teacher, teacher_form: str) -> None:
    teacher = trained_teacher
    student = copy.deepcopy(teacher)
    masks = random_masks(student, keep=0.3)
    apply_masks_(student, masks)
    train, held_out = token_windows(32, seed=1), token_windows(8, seed=2)
    before = _mean_kl(student, teacher, held_out)
    source = teacher if teacher_form == "model" else teacher_topk_logits(teacher, train, k=32, batch_size=8)
    if teacher_form == "topk":
        assert source.values.shape == (32, 32, 32) and source.indices.dtype == torch.int32
    cfg = FinetuneConfig(method="full", kd_weight=1.0, kd_temperature=1.0, lr=3e-3, batch_size=4, schedule="constant")
    finetune_model_(student, masks, train, cfg, teacher=source)
    after = _mean_kl(student, teacher, held_out)
    assert before > 0.5 and after < 0.6 * before, (before, after)
    assert pruned_nonzeros(student, masks) == 0


def test_hidden_state_loss(trained_teacher) -> None:
    h = [torch.randn(2, 4, 8) for _ in range(3)]
    assert hidden_state_loss(h, h).item() == 0
    assert hidden_state_loss([x * 1.1 for x in h], h).item() == pytest.approx(0.01, rel=1e-4)

    teacher = trained_teacher
    student = copy.deepcopy(teacher)
    masks = random_masks(student, keep=0.3)
    ids = token_windows(8, seed=2)

    def hidden_gap() -> float:
        with torch.no_grad():
            s = student(input_ids=ids, output_hidden_states=True).hidden_states[1:]
            t = teacher(input_ids=ids, output_hidden_states=True).hidden_states[1:]
        return hidden_state_loss(s, t).item()

    cfg = FinetuneConfig(method="full", kd_weight=1.0, hidden_weight=1.0, lr=3e-3, batch_size=4, schedule="constant")
    apply_masks_(student, masks)
    before = hidden_gap()
    finetune_model_(student, masks, token_windows(32, seed=1), cfg, teacher=teacher)
    assert hidden_gap() < before
    with pytest.raises(TierpruneError, match="teacher"):
        finetune_model_(student, masks, ids, cfg)


# -------------------------------------------------------------------------------------------------- data

class DocTokenizer:
    """One token per word 'd{doc}w{i}': id doc·1000 + i + 1, so every id tells its document; EOS is 0."""

    eos_token_id = 0

    def __call__(self, text: str | list[str], return_tensors: str | None = None):
        if isinstance(text, list):  # a batch, as transformers answers it without tensors: lists of ids
            return {"input_ids": [self(t).input_ids[0].tolist() for t in text]}
        ids = [int(d) * 1000 + int(i) + 1 for d, i in (w[1:].split("w") for w in text.split())]
        return SimpleNamespace(input_ids=torch.tensor([ids], dtype=torch.long))


def _corpus(n_docs: int = 60, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"d{d}w{i}" for i in range(rng.randint(1, 60))) for d in range(n_docs)]


def test_calibration_doc_indices_replay_the_reference_draw() -> None:
    texts, tok = _corpus(), DocTokenizer()
    used = calibration_doc_indices(texts, tok, nsamples=10, seqlen=30, seed=0)
    # The reference draw, written out: a drawn document is used when it is longer than seqlen.
    rng, want = random.Random(0), set()
    for _ in range(10):
        while True:
            doc = rng.randint(0, len(texts) - 1)
            n = len(texts[doc].split())
            if n > 30:
                break
        rng.randint(0, n - 30 - 1)
        want.add(doc)
    assert used == sorted(want)
    windows = sample_calibration(texts, tok, 10, 30, 0)
    assert set((windows // 1000).flatten().tolist()) == set(used)


def test_corpus_stream_is_each_document_tokenized_alone_then_eos(data_dir, monkeypatch) -> None:
    """The batched tokenization gives the ids of one call per document, across batch boundaries too."""
    from tests.conftest import make_tiny_tokenizer
    from tierprune.tasks import training

    texts = pd.read_parquet(data_dir / "c4-subset").text[:40].tolist() + ["   ", "short one"]
    tokenizer = make_tiny_tokenizer(texts)
    monkeypatch.setattr(training, "CORPUS_TOKENIZE_BATCH", 7)  # 41 kept documents: six batches, the last short
    stream = corpus_stream(texts, tokenizer, exclude_docs=[3, 10])
    eos = torch.tensor([tokenizer.eos_token_id])
    one_by_one = [torch.cat([tokenizer(t, return_tensors="pt").input_ids[0], eos])
                  for i, t in enumerate(texts) if i not in (3, 10) and t.strip()]
    assert stream.dtype == torch.long and torch.equal(stream, torch.cat(one_by_one))


def test_finetune_windows_leave_out_the_calibration_documents() -> None:
    texts, tok = _corpus(), DocTokenizer()
    calib = calibration_doc_indices(texts, tok, nsamples=10, seqlen=30, seed=0)
    windows = finetune_windows(texts, tok, seqlen=16, n_tokens=16 * 50 + 5, exclude_docs=calib, seed=1)
    assert windows.shape == (50, 16)
    docs = {int(t) // 1000 for t in windows.flatten() if t != 0}
    assert docs and not docs & set(calib)
    assert torch.equal(windows, finetune_windows(texts, tok, 16, 16 * 50, calib, seed=1))
    assert not torch.equal(windows, finetune_windows(texts, tok, 16, 16 * 50, calib, seed=2))
    # A budget beyond the corpus takes more passes over the same windows.
    total = sum(len(t.split()) + 1 for i, t in enumerate(texts) if i not in set(calib))
    many = finetune_windows(texts, tok, 16, 16 * (2 * (total // 16) + 3), calib, seed=1)
    assert many.shape[0] == 2 * (total // 16) + 3
    assert len(set(map(tuple, many.tolist()))) <= total // 16
    with pytest.raises(TierpruneError, match="no fine-tuning documents"):
        finetune_windows(texts, tok, 16, 160, exclude_docs=range(len(texts)))


def test_overlapping_evaluation_text_is_refused(data_dir) -> None:
    wiki_test = load_texts(f"wikitext2:{data_dir / 'wikitext-2-raw'}", "test")
    c4 = pd.read_parquet(data_dir / "c4-subset").text.tolist()
    check_disjoint(c4, wiki_test)  # the real corpora share nothing

    paragraph = max(wiki_test, key=len)
    # The same paragraph re-typed: detokenized WikiText (no " @-@ ", no space before commas), other case.
    retyped = paragraph.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" ,", ",").replace(" .", ".").upper()
    excerpt = " ".join(paragraph.split()[10:40])  # a 30-word quote inside a document of other text
    for leak in (retyped, f"{c4[0]} {excerpt} {c4[1]}"):
        with pytest.raises(TierpruneError) as err:
            check_disjoint([*c4[:50], leak], wiki_test)
        assert "\n" not in str(err.value) and "document 50" in str(err.value)
    with pytest.raises(TierpruneError, match="overlaps the evaluation text"):
        check_disjoint(wiki_test, wiki_test)


# ------------------------------------------------------------------------------------- recovery works

def test_finetuning_lowers_the_held_out_loss(tiny_llama_dir, data_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    texts = pd.read_parquet(data_dir / "c4-subset").text[:300].tolist()
    calib = calibration_doc_indices(texts, tokenizer, nsamples=8, seqlen=64, seed=0)
    train = finetune_windows(texts[:250], tokenizer, seqlen=64, n_tokens=64 * 96, exclude_docs=calib, seed=0)
    val = finetune_windows(texts[250:], tokenizer, seqlen=64, n_tokens=64 * 16, seed=0)
    masks = random_masks(model, keep=0.5)
    # train="all": the random tiny model's tied embeddings are too small to express even unigram
    # frequencies, so linears alone plateau just under log(vocab); a real model has trained ones.
    cfg = FinetuneConfig(method="full", train="all", lr=1e-2, batch_size=8, warmup_fraction=0.1, eval_every=6)
    result = finetune_model_(model, masks, train, cfg, val_ids=val)
    steps, losses = zip(*result.val_losses)
    assert steps == (0, 6, 12)
    assert losses[0] > math.log(len(tokenizer)) - 0.1  # a random model starts near uniform
    assert losses[-1] < losses[0] - 1.0, result.val_losses
    assert pruned_nonzeros(model, masks) == 0
