"""One flow run at a time per GPU: a Prefect global concurrency limit of 1 slot, keyed by host and device.

Two scheduled or UI-launched runs that ask for the same GPU queue instead of sharing its memory. The
limit is named after the host and the physical device (CUDA_VISIBLE_DEVICES is followed), so that
`cuda` and `cuda:0` in one process, or two workers that see the same card under different indexes,
take the same slot; another host's cuda:0 is another limit. CPU runs take no slot.
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["device_limit_name", "ensure_device_limit", "device_slot"]

# A lease is renewed in the background while the flow runs; if the process dies, the slot frees itself
# after this long instead of blocking the GPU forever.
LEASE_SECONDS = 300.0


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
    """Hold the device's slot while the block runs (waits for it); yields the limit's name, None on the CPU."""
    from prefect.concurrency.sync import concurrency

    name = device_limit_name(device)
    if name is None:
        yield None
        return
    ensure_device_limit(name)
    with concurrency(name, occupy=1, strict=True, lease_duration=LEASE_SECONDS):
        yield name
