"""The one flag mapping (config_from_flags): fine-tuning flags land in FinetuneConfig, bad values are one line."""
from __future__ import annotations

import pytest

from tierprune.config import FinetuneConfig, config_from_flags
from tierprune.errors import TierpruneError

RUN = {"plan": "p.csv", "store": "s", "run": "r"}


def test_fine_tuning_flags_map_onto_the_finetune_config():
    cfg = config_from_flags(**RUN, ft_method="lora", ft_data="c4:/data", ft_tokens=4096, ft_seqlen=128,
                            ft_batch_size=2, ft_lr=3e-4, kd_weight=0.25, lora_rank=8, lora_targets=" q_proj, v_proj ,",
                            ft_schedule="cosine", ft_warmup=0.1, ft_eval_every=5, ft_patience=2, seed=7,
                            kd_temperature=2.0, kd_hidden_weight=0.5)
    ft = cfg.finetune
    assert (ft.kd_temperature, ft.hidden_weight) == (2.0, 0.5)
    assert (ft.method, ft.data, ft.tokens_per_epoch, ft.seqlen, ft.batch_size) == ("lora", "c4:/data", 4096, 128, 2)
    assert (ft.lr, ft.kd_weight, ft.lora_rank, ft.lora_targets) == (3e-4, 0.25, 8, ("q_proj", "v_proj"))
    assert (ft.schedule, ft.warmup_fraction, ft.eval_every, ft.patience, ft.seed) == ("cosine", 0.1, 5, 2, 7)
    # The defaults a bare `tierprune run` gets: masked full fine-tuning, distillation only.
    assert config_from_flags(**RUN).finetune == FinetuneConfig()
    assert (FinetuneConfig().method, FinetuneConfig().kd_weight) == ("full", 1.0)


@pytest.mark.parametrize("flags, fragment", [
    ({"ft_method": "qlora"}, "--ft-method: Input should be 'none', 'full' or 'lora'"),
    ({"kd_weight": 1.5}, "--kd-weight: .*less than or equal to 1"),
    ({"lora_targets": " , "}, "--lora-targets needs at least one name"),
    ({"ft_patience": 3}, "early stopping .*--ft-eval-every"),
    ({"ft_lr": float("nan")}, "--ft-lr: .*finite"),
    ({"kd_cache_topk": -4}, "--kd-cache-topk: .*greater than or equal to 1"),
    ({"kd_temperature": 0}, "--kd-temperature: .*greater than 0"),
    ({"kd_hidden_weight": -1}, "--kd-hidden-weight: .*greater than or equal to 0"),
    ({"ft_fade": 1.5}, "--ft-fade: .*less than or equal to 1"),
    ({"ft_fade": -0.1}, "--ft-fade: .*greater than or equal to 0"),
    ({"ft_fade": 0.5, "ft_method": "none"}, "fading .--ft-fade. happens during fine-tuning.*--ft-method none"),
    ({"ft_fade": 0.5, "obs_update": True}, "--obs-update makes up for the removed weights at once, --ft-fade"),
    ({"kd_hidden_weight": 1, "kd_cache_topk": 64}, "--kd-hidden-weight. needs the teacher model.*--kd-cache-topk"),
    ({"keep_checkpoints": 0}, "--keep-checkpoints: .*greater than or equal to 1"),
])
def test_bad_fine_tuning_flags_are_one_line(flags, fragment):
    with pytest.raises(TierpruneError, match=fragment) as info:
        config_from_flags(**RUN, **flags)
    assert "\n" not in str(info.value)


def test_the_default_recipe_is_the_measured_one_everywhere():
    """lr 1e-3, cosine after a 5% warm-up (the H200 sweep): the same in the config, the flags and `tierprune run`."""
    import inspect

    from tierprune import cli

    ft = FinetuneConfig()
    assert (ft.lr, ft.schedule, ft.warmup_fraction) == (1e-3, "cosine", 0.05)
    flags = inspect.signature(config_from_flags).parameters
    options = inspect.signature(cli.run).parameters
    for flag in ("ft_lr", "ft_schedule", "ft_warmup"):
        assert options[flag].default.default == flags[flag].default, flag
    # A warm-up in steps replaces the default fraction; both given explicitly is still an error.
    assert FinetuneConfig(warmup_steps=3).warmup_steps == 3
    with pytest.raises(ValueError, match="not both"):
        FinetuneConfig(warmup_steps=3, warmup_fraction=0.1)
    # The demo keeps the constant 5e-4 its measured numbers were taken with.
    assert (cli.DEMO_FINETUNE["ft_lr"], cli.DEMO_FINETUNE["ft_schedule"], cli.DEMO_FINETUNE["ft_warmup"]) == (
        5e-4, "constant", 0.0)


def test_fading_enters_a_runs_identity_only_when_asked_for(monkeypatch, data_dir):
    """Runs made before --ft-fade existed keep their identity (and so resume); a fading run is another run."""
    from tierprune.plan import load_plan
    from tierprune.tasks import run_state

    monkeypatch.setattr(run_state, "model_identity", lambda name, gguf: {"name": name})
    plan = load_plan("smoke")
    data = {"calib": f"c4:{data_dir}/c4-subset", "eval": "none"}
    plain = run_state.run_identity(config_from_flags(**RUN, **data), plan)["finetune"]
    fading = run_state.run_identity(config_from_flags(**RUN, **data, ft_fade=0.5), plan)["finetune"]
    assert "fade_fraction" not in plain
    assert {k: v for k, v in fading.items() if k != "fade_fraction"} == plain and fading["fade_fraction"] == 0.5
    compensating = run_state.run_identity(config_from_flags(**RUN, **data, obs_update=True), plan)["finetune"]
    assert "obs_update" not in plain
    assert {k: v for k, v in compensating.items() if k != "obs_update"} == plain and compensating["obs_update"]


@pytest.mark.parametrize("flags, prefix", [
    ({"calib_samples": 0}, "--calib-samples: "),
    ({"calib_seqlen": 1}, "--calib-seqlen: "),
    ({"eval_max_windows": 0}, "--eval-max-windows: "),
    ({"eval_seqlen": 0}, "--eval-seqlen: "),
    ({"sparsity": 1.5}, "--sparsity: "),
    ({"block_size": 0}, "--block-size: "),
    ({"pattern": "5:4"}, "--pattern: "),
    ({"topk": -1}, "--topk: "),
    ({"device": "tpu"}, "--device: "),
])
def test_a_refused_value_names_the_flag_the_user_typed(flags, prefix):
    with pytest.raises(TierpruneError) as info:
        config_from_flags(**flags)
    assert str(info.value).startswith(prefix) and "\n" not in str(info.value), str(info.value)


def test_a_sparsity_the_pattern_would_ignore_is_refused_not_dropped():
    with pytest.raises(TierpruneError, match=r"^--sparsity 0.3 does not apply to --pattern 2:4, which prunes 0.5"):
        config_from_flags(pattern="2:4", sparsity=0.3)
    with pytest.raises(TierpruneError, match=r"^--sparsity does not apply to --pattern tiers"):
        config_from_flags(pattern="tiers", sparsity=0.4)
    assert config_from_flags(pattern="1:4", sparsity=0.75).prune.nm == (1, 4)  # agreeing with the pattern: fine
    assert config_from_flags(pattern="1:4").prune.pattern == "1:4"  # the default --sparsity is not "given"
    assert config_from_flags(pattern="unstructured", sparsity=0.3).prune.sparsity == 0.3


@pytest.mark.parametrize("flags", [{}, {"plan": "smoke", "store": "s", "run": "r", "ft_method": "lora"},
                                   {"plan": "smoke", "store": "s", "run": "r", "ft_method": "none"}])
def test_fisher_saliency_needs_a_progressive_run_that_fine_tunes_fully(flags) -> None:
    with pytest.raises(TierpruneError, match="--saliency fisher .* needs a progressive run with --ft-method full"):
        config_from_flags(saliency="fisher", **flags)
    assert config_from_flags(saliency="fisher", plan="smoke", store="s", run="r").prune.saliency == "fisher"
