"""Fault injection for crash-safety tests: kill the process at a named point.

`crash_point(name)` does nothing unless the environment variable ``TIERPRUNE_CRASH_AT`` equals
``name`` exactly; then it sends SIGKILL to the current process (no cleanup, no atexit, no
flushing: the closest thing to a power cut or the OOM killer a test can have). Unset, it costs one
dict lookup. It is read at every call, so a test can set it per subprocess.

The names of the points are a contract with tests/test_crash_safety.py:

``step:iter-NNN/<step>:start``
    tierprune.tasks.steps._committed_or_compute, just before a step that is not committed yet is
    computed (a kill at a step boundary). ``<step>`` is the step's folder name without its key:
    start, activations, scores, tiers (demote), checkpoint (finetune), eval, iteration.
``step:iter-NNN/activations:layer-<i>``
    inside collect activations, after layer i (1-based) has been calibrated (a kill mid-step).
``step:iter-NNN/finetune:state-<s>``
    tierprune.tasks.finetune, right after the training state of optimizer step s was committed (a kill
    mid-fine-tuning; the rerun resumes from step s).
``commit:iter-NNN/<step>:before-files``
    RunStore.commit_step, before any file of the step is written.
``commit:iter-NNN/<step>:before-marker``
    RunStore.commit_step, all files in place, COMMIT.json not yet written.
``commit:iter-NNN/<step>:before-manifest``
    RunStore.commit_step, COMMIT.json written, the manifest not yet updated.

``NNN`` is the iteration, zero-padded to three digits as in the run folder (``iter-002``); the
``commit:`` points use exactly the step folder's path relative to the run, with the key dropped,
e.g. ``commit:iter-002/checkpoint:before-marker``.
"""
from __future__ import annotations

import os
import signal

__all__ = ["CRASH_ENV", "crash_point"]

CRASH_ENV = "TIERPRUNE_CRASH_AT"


def crash_point(name: str) -> None:
    """SIGKILL this process when $TIERPRUNE_CRASH_AT equals name (exactly); otherwise return at once."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
