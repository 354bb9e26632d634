"""The deployments: names, the overnight schedule (cron, time zone), parameters, and prefect.yaml agreeing."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from tierprune.errors import TierpruneError
from tierprune.schedules.deployments import OVERNIGHT_RUN_NAME, deployments, local_timezone, overnight_cron

YAML = Path(__file__).parents[2] / "schedules" / "prefect.yaml"


def _by_name(items) -> dict[str, object]:
    return {f"{d.flow_name}/{d.name}": d for d in items}


def test_the_contract_names_and_schedules():
    served = _by_name(deployments(tz="Europe/Berlin"))
    assert set(served) == {"progressive/manual", "progressive/overnight", "oneshot/manual", "evaluate/manual"}
    assert all(not d.schedules for name, d in served.items() if name != "progressive/overnight")
    [schedule] = served["progressive/overnight"].schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.slug) == ("0 22 * * *", "Europe/Berlin",
                                                                                   "overnight")
    # A fresh run each night: the run name is a template with the date.
    assert served["progressive/overnight"].parameters["run"] == OVERNIGHT_RUN_NAME
    assert "{date}" in OVERNIGHT_RUN_NAME
    assert "run" not in served["progressive/manual"].parameters  # the form's own default, with the time


def test_time_zone_defaults_to_the_machine_and_at_moves_the_cron(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    overnight = _by_name(deployments(at="3:30"))["progressive/overnight"]
    assert (overnight.schedules[0].schedule.cron, overnight.schedules[0].schedule.timezone) == ("30 3 * * *",
                                                                                                "America/New_York")


def test_local_timezone(tmp_path):
    assert local_timezone({"TZ": "Asia/Tokyo"}) == "Asia/Tokyo"
    link = tmp_path / "localtime"
    link.symlink_to("/usr/share/zoneinfo/Europe/Paris")
    if not Path("/usr/share/zoneinfo/Europe/Paris").exists():
        pytest.skip("no system zoneinfo to point /etc/localtime at")
    assert local_timezone({}, localtime=link) == "Europe/Paris"
    assert local_timezone({"TZ": "Not/AZone"}, localtime=tmp_path / "missing") == "UTC"


@pytest.mark.parametrize("bad", ["25:00", "22", "noon", "22:60"])
def test_bad_time_of_day_is_one_clear_error(bad):
    with pytest.raises(TierpruneError, match="HH:MM"):
        overnight_cron(bad)


def test_bad_time_zone_is_one_clear_error():
    with pytest.raises(TierpruneError, match="IANA"):
        deployments(tz="Mars/Olympus")


def test_store_and_overnight_parameters_reach_the_deployments():
    served = _by_name(deployments(tz="UTC", store="s3://bucket/runs", overnight={"plan": "llama2-5iter"}))
    exporting = _by_name(deployments(tz="UTC", overnight={"export": "models/{run}"}))["progressive/overnight"]
    assert exporting.parameters["export"] == "models/{run}"  # filled in by each night's run
    with pytest.raises(TierpruneError, match=r"^--overnight-export models/\{date\}: unknown field\(s\) date; "
                                             r"use \{run\}"):
        deployments(tz="UTC", overnight={"export": "models/{date}"})
    assert served["progressive/manual"].parameters == {"store": "s3://bucket/runs"}
    assert served["progressive/overnight"].parameters["plan"] == "llama2-5iter"
    # The schema the form is built from: flat fields, with the deployment's parameter overrides as values.
    schema = served["progressive/manual"]._parameter_openapi_schema.model_dump()
    assert {"plan", "store", "run", "resume_from", "model", "calib_samples", "device"} <= set(schema["properties"])


def _flow_of(entrypoint: str):
    path, name = entrypoint.split(":")
    module = importlib.import_module("tierprune." + path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def test_prefect_yaml_parses_and_matches_the_served_deployments():
    spec = yaml.safe_load(YAML.read_text())
    [overnight] = [d for d in spec["deployments"] if d["schedules"]]
    tz = overnight["schedules"][0]["timezone"]
    store = spec["definitions"]["parameters"]["progressive"]["store"]
    served = _by_name(deployments(tz=tz, store=store, overnight={"plan": overnight["parameters"]["plan"]}))
    declared = {}
    for d in spec["deployments"]:
        flow = _flow_of(d["entrypoint"])
        declared[f"{flow.name}/{d['name']}"] = d
        assert d["work_pool"]["name"] == "gpu" and d["tags"] == ["tierprune"]
    assert set(declared) == set(served)
    for name, d in declared.items():
        runner = served[name]
        assert (d.get("parameters") or {}) == runner.parameters, name
        assert d["description"] == runner.description.replace(f" at 22:00 ({tz})", " at 22:00"), name
        crons = [(s["cron"], s["timezone"], s["slug"]) for s in d["schedules"]]
        assert crons == [(s.schedule.cron, s.schedule.timezone, s.slug) for s in runner.schedules], name
