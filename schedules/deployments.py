"""The deployments, built in Python: what `tierprune serve` serves from one process.

- `progressive/manual`: no schedule; launched from the UI's run form (flat parameters) or
  `prefect deployment run progressive/manual --params '{...}'`.
- `progressive/overnight`: a cron schedule, 22:00 in the machine's time zone by default; each night's run
  gets a fresh run name (`{flow}-{deployment}-{date}`), so it does not resume last night's finished run.
- `oneshot/manual` and `evaluate/manual`.

schedules/prefect.yaml defines the same deployments for a work pool (`prefect deploy --all`); a test
checks that the two agree.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tierprune.errors import TierpruneError

__all__ = ["OVERNIGHT_AT", "OVERNIGHT_RUN_NAME", "TAGS", "local_timezone", "overnight_cron", "deployments"]

OVERNIGHT_AT = "22:00"
OVERNIGHT_RUN_NAME = "{flow}-{deployment}-{date}"
TAGS = ["tierprune"]


def local_timezone(environ: dict[str, str] | None = None, localtime: Path = Path("/etc/localtime")) -> str:
    """This machine's IANA time zone: $TZ, else where /etc/localtime points into zoneinfo, else UTC."""
    environ = os.environ if environ is None else environ
    tz = environ.get("TZ", "").lstrip(":")
    if tz and _valid_timezone(tz):
        return tz
    try:
        target = str(localtime.resolve())
    except OSError:
        target = ""
    match = re.search(r"/zoneinfo/(.+)$", target)
    if match and _valid_timezone(match.group(1)):
        return match.group(1)
    return "UTC"


def _valid_timezone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def overnight_cron(at: str = OVERNIGHT_AT) -> str:
    """'22:00' -> '0 22 * * *' (every day)."""
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", at)
    if not match or int(match.group(1)) > 23 or int(match.group(2)) > 59:
        raise TierpruneError(f"--at {at!r}: give a time of day as HH:MM, e.g. 22:00")
    return f"{int(match.group(2))} {int(match.group(1))} * * *"


def deployments(tz: str | None = None, at: str = OVERNIGHT_AT, store: str = "runs",
                overnight: dict | None = None) -> list:
    """The RunnerDeployments of progressive/manual, progressive/overnight, oneshot/manual and evaluate/manual.

    tz: the overnight schedule's IANA time zone (default: this machine's); at: its time of day; store: the
    run store the progressive forms propose; overnight: more parameters of the nightly run (e.g. its plan).
    """
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from tierprune.flows.oneshot import evaluate, oneshot
    from tierprune.flows.progressive import progressive
    from tierprune.tasks.export import export_path

    if (overnight or {}).get("export"):
        export_path(overnight["export"], "check", flag="--overnight-export")  # a bad field now, not at 22:00
    tz = tz or local_timezone()
    if not _valid_timezone(tz):
        raise TierpruneError(f"--tz {tz!r} is not an IANA time zone (e.g. Europe/Berlin, America/New_York, UTC)")
    # By module path, not file path: the runner finds the flows wherever tierprune is installed.
    common = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": TAGS}
    return [
        progressive.to_deployment("manual", parameters={"store": store}, **common,
                                  description="Progressive three-tier pruning, launched by hand (Custom run)."),
        progressive.to_deployment(
            "overnight", **common,
            schedules=[Cron(overnight_cron(at), timezone=tz, slug="overnight")],
            parameters={"store": store, "run": OVERNIGHT_RUN_NAME, **(overnight or {})},
            description=f"Progressive three-tier pruning every night at {at} ({tz}); each night a fresh run."),
        oneshot.to_deployment("manual", **common, description="One-shot pruning and evaluation."),
        evaluate.to_deployment("manual", **common, description="Perplexity and sparsity of a model as it is."),
    ]
