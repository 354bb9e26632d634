"""From outside: `tierprune serve` against a real `prefect server`, runs started with `prefect deployment run`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _deployment(live, name: str) -> dict:
    flow, deployment = name.split("/")
    return live.get(f"/deployments/name/{flow}/{deployment}")


def _runs_show(run: Path) -> dict:
    done = subprocess.run([str(Path(sys.executable).parent / "tierprune"), "runs", "show", str(run), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _artifact_keys(live, flow_run_id: str) -> set[str]:
    rows = live.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {row["key"] for row in rows if row.get("key")}


def _run_deployment(live, params: dict) -> tuple[dict, str]:
    """`prefect deployment run progressive/manual --params ... --watch`; (the flow run, the CLI's output)."""
    done = live.prefect("deployment", "run", "progressive/manual", "--params", json.dumps(params), "--watch",
                        "--watch-timeout", "600", timeout=660)
    output = done.stdout + done.stderr
    runs = live.post("/flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 1})
    assert done.returncode == 0, output + (live.logs / "serve.log").read_text()[-3000:]
    return runs[0], output


def test_serve_registers_the_deployments_with_the_overnight_cron(live_prefect):
    manual = _deployment(live_prefect, "progressive/manual")
    overnight = _deployment(live_prefect, "progressive/overnight")
    assert manual["schedules"] == []
    [schedule] = overnight["schedules"]
    assert schedule["schedule"]["cron"] == "0 22 * * *" and schedule["active"]
    assert overnight["parameters"]["run"] == "{flow}-{deployment}-{date}"
    assert _deployment(live_prefect, "oneshot/manual")["name"] == "manual"
    # The form's fields: flat, described, with choices.
    form = manual["parameter_openapi_schema"]["properties"]
    assert form["device"]["enum"][:2] == ["cpu", "cuda"] and form["plan"]["default"] == "smoke"
    assert all(field.get("description") for field in form.values())


def test_deployment_run_completes_and_a_resumed_run_continues(live_prefect, tiny_llama_dir, data_dir):
    params = live_prefect.flow_params(tiny_llama_dir, data_dir, run="from-cli")
    flow_run, output = _run_deployment(live_prefect, params)
    assert flow_run["state"]["type"] == "COMPLETED" and "Completed" in output, output
    shown = _runs_show(live_prefect.store / "from-cli")
    assert [it["iteration"] for it in shown["iterations"]] == [0, 1, 2, 3]
    assert shown["iterations"][-1]["tiers"]["topk"] > 0
    keys = _artifact_keys(live_prefect, flow_run["id"])
    assert {"iteration-0", "iteration-3", "tier-maps-1", "tier-maps-3"} <= keys, keys

    # Resume from the stored iteration 1 through the form's resume_from: a new run that starts at iteration 2.
    resume = live_prefect.flow_params(tiny_llama_dir, data_dir, run="resumed",
                                      resume_from=str(live_prefect.store / "from-cli" / "iter-001"))
    flow_run, output = _run_deployment(live_prefect, resume)
    assert flow_run["state"]["type"] == "COMPLETED", output
    resumed = _runs_show(live_prefect.store / "resumed")
    assert [it["iteration"] for it in resumed["iterations"]] == [2, 3]  # nothing before iteration 2 recomputed
    # Continued from iteration 1's tier map and checkpoint: the same iterations 2 and 3 as the original run.
    for k in (2, 3):
        assert resumed["iterations"][k - 2]["tiers"] == shown["iterations"][k]["tiers"]
    assert resumed["iterations"][-1]["ppl"] == pytest.approx(shown["iterations"][-1]["ppl"], rel=1e-5)
    keys = _artifact_keys(live_prefect, flow_run["id"])
    assert "tier-maps-2" in keys and "tier-maps-1" not in keys, keys


def test_prefect_deploy_all_registers_the_yaml_deployments_on_the_work_pool(bare_prefect):
    """`prefect deploy --all --prefect-file schedules/prefect.yaml`, as README says, from the repository root.

    On a server of its own: the deployed definitions would replace the served ones that the other live tests use
    (same names, now on the pool), whichever order the tests run in (pytest-xdist runs files on two workers).
    """
    root = Path(__file__).parents[2]
    created = bare_prefect.prefect("work-pool", "create", "gpu", "--type", "process")
    assert created.returncode == 0, created.stdout + created.stderr
    done = subprocess.run([str(Path(sys.executable).parent / "prefect"), "deploy", "--all", "--prefect-file",
                           "schedules/prefect.yaml", "--no-prompt"], env=bare_prefect.env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("progressive/manual", "progressive/overnight", "oneshot/manual", "evaluate/manual"):
        assert _deployment(bare_prefect, name)["work_pool_name"] == "gpu", name
    overnight = _deployment(bare_prefect, "progressive/overnight")
    assert [s["schedule"]["cron"] for s in overnight["schedules"]] == ["0 22 * * *"]
    assert overnight["parameters"]["run"] == "{flow}-{deployment}-{date}"
    form = overnight["parameter_openapi_schema"]["properties"]
    assert form["plan"]["description"].startswith("The plan") and form["select"]["enum"] == ["wanda", "magnitude"]
