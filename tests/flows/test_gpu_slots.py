"""One run at a time per GPU: the limit's name, and a second holder waiting for the slot."""
from __future__ import annotations

import pytest

from tierprune.flows.gpu_slots import device_limit_name, device_slot


def test_limit_name_follows_the_physical_device():
    assert device_limit_name("cpu") is None
    assert device_limit_name("cuda", host="h", visible="") == device_limit_name("cuda:0", host="h", visible="")
    assert device_limit_name("cuda:1", host="h", visible="") == "gpu-h-1"
    # CUDA_VISIBLE_DEVICES=2,3: the process's cuda:1 is card 3, the same slot as a process that sees all cards.
    assert device_limit_name("cuda:1", host="h", visible="2,3") == device_limit_name("cuda:3", host="h", visible="")
    assert device_limit_name("cuda:0", host="h", visible="GPU-8f2a") == "gpu-h-GPU-8f2a"
    assert device_limit_name("cuda:0", host="a") != device_limit_name("cuda:0", host="b")
    with pytest.raises(ValueError):
        device_limit_name("tpu")


@pytest.mark.slow
def test_a_second_run_on_the_same_gpu_waits_for_the_slot(prefect_harness, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with device_slot("cuda:0") as name:
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(name)
        assert (limit.limit, limit.active_slots) == (1, 1)
        with pytest.raises(TimeoutError):
            with concurrency(name, occupy=1, strict=True, timeout_seconds=2):
                pass
        with device_slot("cpu") as cpu:  # the CPU takes no slot, so it does not wait
            assert cpu is None
    with concurrency(name, occupy=1, strict=True, timeout_seconds=5):  # released at the end of the block
        pass


_HOLD = """
import sys, time
from pathlib import Path
from tierprune.flows.gpu_slots import host_slot
with host_slot("gpu-test-0", Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_killed_holder_frees_the_host_slot_at_once(tmp_path, caplog):
    """The ephemeral API's slot: a run SIGKILLed while holding it must not block the next run."""
    import subprocess
    import sys
    import threading
    import time

    from tierprune.flows.gpu_slots import host_slot

    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        taken = threading.Event()

        def take() -> None:
            with host_slot("gpu-test-0", tmp_path, poll_seconds=0.05):
                taken.set()

        with caplog.at_level("WARNING", logger="tierprune.flows.gpu_slots"):
            waiter = threading.Thread(target=take)
            waiter.start()
            time.sleep(0.5)
            assert not taken.is_set(), "the slot was taken while another process held it"
            assert f"taken by pid {holder.pid}" in caplog.text  # the wait is said, with who holds the slot
            holder.kill()
            holder.wait()
            waiter.join(timeout=10)
        assert taken.is_set(), "the slot of a killed process was not freed"
    finally:
        holder.kill()


def test_without_a_server_the_slot_is_a_file_lock_under_prefect_home(tmp_path):
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings(updates={PREFECT_HOME: str(tmp_path)}, restore_defaults={PREFECT_API_URL}):
        with device_slot("cuda:0") as name:
            lock = tmp_path / "gpu-slots" / f"{name}.lock"
            assert lock.read_text().startswith("pid ")
