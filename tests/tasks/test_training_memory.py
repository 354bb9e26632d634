"""The fine-tuning memory estimate and the warning `run` prints before a step that may not fit starts."""
from __future__ import annotations

from tierprune.config import config_from_flags
from tierprune.tasks import training_memory
from tierprune.tasks.run_state import check_run_inputs
from tierprune.tasks.training_memory import GIB, HEADROOM, estimated_training_bytes, memory_warning


def _cfg(model, data_dir, tmp_path, **flags):
    return config_from_flags(model=str(model), calib=f"c4:{data_dir}/c4-subset", calib_samples=2, calib_seqlen=16,
                             eval="none", ft_seqlen=16, plan="smoke", store=str(tmp_path / "store"), run="r", **flags)


def test_the_estimate_is_linear_in_tokens_and_counts_the_teacher(tiny_llama_dir, data_dir, tmp_path) -> None:
    at = {b: estimated_training_bytes(_cfg(tiny_llama_dir, data_dir, tmp_path, ft_batch_size=b)) for b in (1, 2, 3)}
    per_window = at[2] - at[1]
    assert abs((at[3] - at[2]) - per_window) <= 1 and per_window > 0
    vocab = 128  # make_tiny_llama's
    assert per_window > 16 * 5 * vocab * 4  # at least the logits of its 16 positions
    # Cross-entropy alone holds no teacher; cached teacher logits free it too.
    for flags in ({"kd_weight": 0.0}, {"kd_cache_topk": 8}):
        assert (estimated_training_bytes(_cfg(tiny_llama_dir, data_dir, tmp_path, ft_batch_size=1, **flags))
                < at[1]), flags


def test_the_warning_names_a_split_that_fits(tiny_llama_dir, data_dir, tmp_path) -> None:
    cfg = _cfg(tiny_llama_dir, data_dir, tmp_path, ft_batch_size=16, ft_grad_accum=2)
    needed = estimated_training_bytes(cfg)
    assert memory_warning(cfg, int(needed * HEADROOM) + 1) is None  # a quarter more than the step: the run's rest
    short = int(needed * HEADROOM) - 1
    warning = memory_warning(cfg, short)
    assert warning.startswith(f"fine-tuning needs about {needed / GIB:.1f} GiB at --ft-batch-size 16 × --ft-seqlen "
                              "16 (estimated)")
    split = warning.rsplit("; ", 1)[1]
    assert split.startswith("--ft-batch-size 8 --ft-grad-accum 4 trains the same steps")
    assert estimated_training_bytes(cfg, 8) * HEADROOM <= short
    hopeless = memory_warning(cfg, 1024)
    assert hopeless.endswith(f"even one window per forward needs about {estimated_training_bytes(cfg, 1) / GIB:.1f} GiB")


def test_run_inputs_return_the_warning_and_the_run_is_not_refused(tiny_llama_dir, data_dir, tmp_path,
                                                                  monkeypatch) -> None:
    cfg = _cfg(tiny_llama_dir, data_dir, tmp_path, ft_tokens=16 * 16 * 10 * 10)  # 10 steps an iteration
    assert check_run_inputs(cfg) == []  # a tiny model fits anywhere
    monkeypatch.setattr(training_memory, "available_bytes", lambda device: 1024)
    [warning] = check_run_inputs(cfg)
    assert "the run may be killed for memory" in warning
    assert check_run_inputs(_cfg(tiny_llama_dir, data_dir, tmp_path, ft_method="none")) == []  # nothing trains


def test_an_iteration_of_a_few_steps_at_a_high_rate_is_warned_about(tiny_llama_dir, data_dir, tmp_path) -> None:
    """smoke's epochs are 0.1: --ft-tokens 81920 at 16 windows of 512 is one optimizer step an iteration, which
    at the default lr 1e-3 took SmolLM2 from ppl 43.8 to 88.7."""
    few = _cfg(tiny_llama_dir, data_dir, tmp_path, ft_tokens=16 * 16 * 10)  # 0.1 × that: one step of 16 windows
    [warning] = check_run_inputs(few)
    assert warning.startswith("an iteration trains only 1 optimizer step(s) (16 windows of 16 each) at --ft-lr 0.001")
    assert check_run_inputs(_cfg(tiny_llama_dir, data_dir, tmp_path, ft_tokens=16 * 16 * 10, ft_lr=5e-4)) == []
