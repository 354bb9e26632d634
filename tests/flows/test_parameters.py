"""The flat flow parameters: one per CLI flag, the same names and defaults as config_from_flags, described."""
from __future__ import annotations

import datetime as dt
import inspect
import typing

import pytest

from tierprune.config import config_from_flags
from tierprune.errors import TierpruneError
from tierprune.flows.oneshot import evaluate, oneshot
from tierprune.flows.parameters import RUN_NAME_TEMPLATE, expand_run_name
from tierprune.flows.progressive import progressive

FLAGS = inspect.signature(config_from_flags).parameters

# What each flow leaves out of config_from_flags on purpose, and why.
PROGRESSIVE_LEAVES_OUT = {
    "method", "pattern", "sparsity", "tiers",  # a progressive run is Wanda tiers; its fractions come from the plan
}
FINETUNE = {name for name in FLAGS if name.startswith(("ft_", "kd_"))} | {"lora_rank", "lora_targets"}
# plan, store, run, resume_from, keep_checkpoints make a run progressive; one-shot pruning does not fine-tune.
# --obs-update compensates a progressive demotion; one-shot pruning has --method sparsegpt for that.
# --saliency fisher ranks by the gradients of the fine-tuning between iterations, which one-shot pruning has not.
ONESHOT_LEAVES_OUT = {"plan", "store", "run", "resume_from", "keep_checkpoints", "obs_update", "saliency"} | FINETUNE
ONESHOT_ADDS = {"output"}  # prune --output
# The form proposes values where the CLI requires them.
FORM_DEFAULTS = {"plan": "smoke", "store": "runs", "run": RUN_NAME_TEMPLATE}


def _parameters(flow) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(flow.fn).parameters)


PROGRESSIVE_ADDS = {"export"}  # run --export: the last iteration as a model folder once the plan is done


@pytest.mark.parametrize("flow, left_out, added", [
    (progressive, PROGRESSIVE_LEAVES_OUT, PROGRESSIVE_ADDS),
    (oneshot, ONESHOT_LEAVES_OUT, ONESHOT_ADDS),
])
def test_flow_parameters_are_the_flags_of_config_from_flags(flow, left_out, added):
    names = set(_parameters(flow))
    assert names - added == set(FLAGS) - left_out, "a flag was added to config_from_flags: add it to the flow too"
    for name, parameter in _parameters(flow).items():
        if name in added:
            continue
        expected = FORM_DEFAULTS.get(name, FLAGS[name].default) if flow is progressive else FLAGS[name].default
        assert parameter.default == expected, name


def test_tierprune_run_has_a_flag_for_every_parameter_of_the_progressive_flow():
    """The Prefect form and the CLI are two doors to the same run: a setting of one is a setting of the other
    (`tierprune run` once lacked --eval-batch-size, which the form had)."""
    import typer

    from tierprune.cli import app

    run = typer.main.get_command(app).commands["run"]
    flags = {"run" if p.name == "run_name" else p.name: p.default for p in run.params}
    parameters = _parameters(progressive)
    assert set(flags) == set(parameters)
    differing = {name: (flags[name], p.default) for name, p in parameters.items()
                 if name not in FORM_DEFAULTS and flags[name] != p.default}
    assert not differing, differing


def test_tierprune_evaluate_has_a_flag_for_every_parameter_of_the_evaluate_flow():
    import typer

    from tierprune.cli import app

    command = typer.main.get_command(app).commands["evaluate"]
    flags = {p.name: p.default for p in command.params if p.name != "json_path"}
    assert flags == {name: p.default for name, p in _parameters(evaluate).items()}


def test_evaluate_takes_a_subset_of_the_flags_with_their_defaults():
    parameters = _parameters(evaluate)
    assert set(parameters) <= set(FLAGS) and {"model", "eval", "eval_max_windows", "device"} <= set(parameters)
    for name, parameter in parameters.items():
        assert parameter.default == FLAGS[name].default, name


@pytest.mark.parametrize("flow", [progressive, oneshot, evaluate])
def test_every_form_field_has_a_description_and_choices_are_enums(flow):
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(flow).model_dump()["properties"]
    assert list(schema) == list(_parameters(flow))
    missing = [name for name, field in schema.items() if not field.get("description")]
    assert not missing
    hints = typing.get_type_hints(flow.fn, include_extras=True)
    for name, field in schema.items():
        literal = [a for a in typing.get_args(hints[name]) if typing.get_origin(a) is typing.Literal]
        if literal:
            assert field["enum"] == list(typing.get_args(literal[0])), name
            assert field["default"] in field["enum"], name


@pytest.mark.parametrize("name", ["select", "scope", "dtype", "device", "method", "pattern", "ft_method", "ft_schedule",
                                  "ft_train"])
def test_every_choice_the_form_offers_is_accepted_by_the_config(name, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the choices, not this machine, are tested
    flow = progressive if name.startswith("ft_") else oneshot
    hints = typing.get_type_hints(flow.fn, include_extras=True)
    choices = typing.get_args(typing.get_args(hints[name])[0])
    assert len(choices) >= 2
    for choice in choices:
        extra = {"method": "magnitude"} if name == "pattern" else {}
        config_from_flags(**{name: choice, **extra}, calib="c4", eval="none")  # raises on a refused value


def test_form_constraints_are_validated_before_the_flow_starts():
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError):
        progressive.validate_parameters({"calib_samples": 0})
    with pytest.raises(ParameterTypeError):
        progressive.validate_parameters({"device": "tpu"})
    assert progressive.validate_parameters({"plan": "llama2-5iter"})["plan"] == "llama2-5iter"


WHEN = dt.datetime(2026, 12, 2, 22, 0)


@pytest.mark.parametrize("template, expected", [
    ("{flow}-{date}", "progressive-2026-12-02"),
    ("{flow}-{deployment}-{date}", "progressive-overnight-2026-12-02"),
    (RUN_NAME_TEMPLATE, "progressive-2026-12-02-2200"),
    ("nightly", "nightly"),
])
def test_run_name_template(template, expected):
    assert expand_run_name(template, flow="progressive", deployment="overnight", when=WHEN) == expected


def test_run_name_template_without_deployment_and_odd_deployment_names():
    assert expand_run_name("{deployment}", flow="progressive", deployment=None, when=WHEN) == "progressive"
    assert expand_run_name("{deployment}", flow="f", deployment="my night/run", when=WHEN) == "my-night-run"


@pytest.mark.parametrize("template", ["{hour}", "{flow", "{0}"])
def test_run_name_template_with_unknown_fields_is_one_clear_error(template):
    with pytest.raises(TierpruneError, match="run name template"):
        expand_run_name(template, flow="progressive", deployment=None, when=WHEN)


def test_plan_by_name_is_the_shipped_file():
    from importlib.resources import files

    from tierprune.plan import load_plan, shipped_plans

    assert {"smoke", "llama2-5iter"} <= set(shipped_plans())
    shipped = files("tierprune.schedules") / "plans" / "llama2-5iter.csv"
    assert load_plan("llama2-5iter") == load_plan(str(shipped))
    # The seed plan's variants keep its tiers per iteration and its 5 epochs in all; only where they train moves.
    seed = load_plan("llama2-5iter")
    for variant in ("llama2-5iter-backloaded", "llama2-5iter-late"):
        steps = load_plan(variant).steps
        tiers = [step.model_dump(exclude={"epochs"}) for step in steps]
        assert tiers == [step.model_dump(exclude={"epochs"}) for step in seed.steps]
        assert sum(s.epochs for s in steps) == pytest.approx(5.0)
    with pytest.raises(TierpruneError, match=r"nor a shipped plan \(llama2-5iter-backloaded, llama2-5iter-late, llama2-5iter, smoke"):
        load_plan("smokey")
