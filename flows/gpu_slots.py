"""One flow run at a time per GPU: one slot per host and device.

Two scheduled or UI-launched runs that ask for the same GPU queue instead of sharing its memory. The
slot is named after the host and the physical device (CUDA_VISIBLE_DEVICES is followed), so that
`cuda` and `cuda:0` in one process, or two workers that see the same card under different indexes,
take the same slot; another host's cuda:0 is another slot. CPU runs take no slot.

Which lock holds it depends on where Prefect's API lives:
- a Prefect server (PREFECT_API_URL set: workers, `tierprune serve`, the UI): a global concurrency limit
  of 1 slot, visible in the UI, held with a lease that the server takes back when its holder dies;
- the ephemeral API of a plain `tierprune run` (no server): an OS file lock under PREFECT_HOME, which
  the kernel releases the moment its process dies. An ephemeral API runs none of the server's lease
  services and keeps leases in its own memory, so a slot taken there by a run that was then killed
  (SIGKILL, the OOM killer) stayed taken in PREFECT_HOME's database for good, and every later GPU run
  waited on it forever, silently: rerunning a crashed run never started.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["device_limit_name", "ensure_device_limit", "device_slot", "host_slot"]

log = logging.getLogger(__name__)

# A lease is renewed in the background (every 3/4 of it) while the flow runs; if the process dies (SIGKILL,
# OOM killer), the server takes the slot back once the lease has expired, instead of blocking the GPU
# forever. 60 s is the shortest lease Prefect's server accepts: a run relaunched after a crash used to wait
# up to 5 minutes, silently, for the slot of the run it resumes.
LEASE_SECONDS = 60.0
# The server looks for expired leases every 15 s (PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS).
FREED_WITHIN_SECONDS = LEASE_SECONDS + 15


def device_limit_name(device: str, host: str | None = None, visible: str | None = None) -> str | None:
    """`gpu-<host>-<physical device>` for a CUDA device, None for the CPU.

    visible: CUDA_VISIBLE_DEVICES (read from the environment when None): index N of the process is its
    N-th entry (an index or a GPU UUID).
    """
    if device == "cpu":
        return None
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise ValueError(f"unknown device {device!r}")
    index = int(match.group(1) or 0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    entries = [e.strip() for e in visible.split(",") if e.strip()] if visible else []
    physical = entries[index] if index < len(entries) else str(index)
    host = host or socket.gethostname()
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"gpu-{host}-{physical}")


def ensure_device_limit(name: str) -> None:
    """Create the global concurrency limit `name` with one slot, unless it exists (its limit is then kept)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # another run created it between the read and the create


@contextmanager
def device_slot(device: str) -> Iterator[str | None]:
    """Hold the device's slot while the block runs (waits for it); yields the slot's name, None on the CPU."""
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    name = device_limit_name(device)
    if name is None:
        yield None
        return
    if not PREFECT_API_URL.value():
        with host_slot(name, Path(PREFECT_HOME.value()) / "gpu-slots"):
            yield name
        return
    ensure_device_limit(name)
    if _slot_taken(name):
        log.warning("GPU slot %s is taken: waiting for the run that holds it (a run that was killed frees it "
                    "within %d s)", name, FREED_WITHIN_SECONDS)
    # A failed renewal must not end a run of hours: at worst another run may share the GPU.
    with concurrency(name, occupy=1, strict=True, lease_duration=LEASE_SECONDS,
                     raise_on_lease_renewal_failure=False):
        yield name


@contextmanager
def host_slot(name: str, folder: Path, poll_seconds: float = 1.0) -> Iterator[None]:
    """Hold `folder/name.lock` (an exclusive flock) while the block runs, waiting for it if another process has it."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            log.warning("GPU slot %s is taken by %s: waiting for it to finish", name, holder)
            while True:  # polled, not a blocking flock: Ctrl-C and SIGTERM must still reach this process
                time.sleep(poll_seconds)
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    continue
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")  # only for the waiting message
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _slot_taken(name: str) -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    return limit.active_slots >= limit.limit
