"""What the hosts of a run agree on: their settings, their data positions, the step they stop at.

With one process everything here is local and cheap. With several (``jax.distributed``), the
hosts exchange small integer vectors through ``process_allgather``, only at start-up and at
checkpoints, never between two log steps.

Stopping: a preemption notice (SIGTERM) reaches the hosts of a pod at different moments. With
several processes, JAX's preemption notifier owns SIGTERM (a Python handler would replace it):
the host that gets the signal tells the coordination service, every host asks it once per
training step through Orbax's ``CheckpointManager.reached_preemption`` (JAX's
``reached_preemption_sync_point``: a host-side query, no device sync), and all of them get True
at the same step, save that step and exit. Ctrl-C on one host is forwarded as SIGTERM to its own
process, so it goes through the same agreement.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

# Exit status of a run stopped by a signal after saving its checkpoint (sysexits' EX_TEMPFAIL:
# "try again later"): rerunning the same command resumes it. Errors exit with 2, success with 0.
EXIT_INTERRUPTED = 75


class HostMismatchError(ValueError):
    """Hosts that cannot run together, or a run resumed on another number of hosts or devices."""


def topology() -> dict[str, int]:
    """The hosts and local devices of this process's run, as checkpoints record them."""
    return {"hosts": jax.process_count(), "local_devices": jax.local_device_count()}


def gather_ints(values: Sequence[int]) -> np.ndarray:
    """[hosts, len(values)] int32: every host's ``values``, on every host (a collective)."""
    row = np.asarray(values, dtype=np.int32)
    if jax.process_count() == 1:
        return row[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(row)).reshape(jax.process_count(), -1)


def check_same_settings(settings: dict[str, Any]) -> None:
    """HostMismatchError on every host when some host's settings differ from host 0's."""
    text = json.dumps(settings, sort_keys=True, default=str)
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF
    digests = gather_ints([digest])[:, 0]
    differing = [i for i, d in enumerate(digests) if d != digests[0]]
    if differing:
        hosts = ", ".join(map(str, differing))
        raise HostMismatchError(
            f"the settings of host {hosts} differ from host 0's: every host must run the same "
            "command with the same --config and --set values"
        )


def gather_data_states(state: dict[str, int]) -> dict[str, Any]:
    """Every host's loader position (``get_state()``: integers), for host 0 to save.

    Each host keeps its own record: its shard index and the unreadable files it skipped differ
    from the others' (the epoch and step are the same on all hosts, which read equal shares).
    """
    keys = sorted(state)
    rows = gather_ints([int(state[k]) for k in keys])
    return {"hosts": [dict(zip(keys, map(int, row), strict=True)) for row in rows]}


def own_data_state(saved: dict[str, Any]) -> dict[str, Any]:
    """This host's loader position from a checkpoint's ``data`` record (``gather_data_states``);
    single-host checkpoints written before per-host records hold the state itself."""
    hosts = saved.get("hosts")
    return saved if hosts is None else hosts[jax.process_index()]


def check_topology(saved: dict[str, int] | None, where: Any) -> None:
    """HostMismatchError when a run is resumed on another number of hosts or local devices.

    The data shards, the global batch and with it the lr schedule depend on both, so such a run
    cannot continue bit for bit; it is refused rather than silently changed.
    """
    now = topology()
    if saved is None or saved == now:
        return
    raise HostMismatchError(
        f"{where}: this run was started on {saved['hosts']} host(s) x {saved['local_devices']} "
        f"local device(s), it is now on {now['hosts']} x {now['local_devices']}; resume it on "
        "the same hosts and devices, or start a new run with another --workdir"
    )


def check_same_checkpoint(step: int | None, where: Any) -> None:
    """HostMismatchError on every host when the hosts found different latest checkpoints in
    ``where``: each host restores on its own, so they must all see the same workdir."""
    steps = gather_ints([-1 if step is None else step])[:, 0]
    if len(set(steps.tolist())) == 1:
        return
    seen = ", ".join(
        f"host {i}: {'none' if s < 0 else f'step {s}'}" for i, s in enumerate(steps.tolist())
    )
    raise HostMismatchError(
        f"{where}: the hosts see different latest checkpoints ({seen}); the workdir must be one "
        "that every host reads and writes (a gs:// bucket or a shared file system)"
    )


class StopRequest:
    """SIGTERM and SIGINT turned into a stop that every host takes at the same step.

    ``should_stop()`` is called once per training step by every host, in the same order; it is
    True at the step the run must save and exit, on all hosts alike. ``signal`` names what
    stopped the run. ``reached_preemption`` is the multi-host agreement (Orbax's
    ``CheckpointManager.reached_preemption``, given here or through ``agree_through`` once the
    manager exists); it is consulted only with several processes. The handlers stay until the
    context exits, which a run does after its last save completed: a signal during that save
    is noted, not fatal. A second signal stops at once (KeyboardInterrupt).
    """

    def __init__(self, reached_preemption: Callable[[int], bool] | None = None):
        self.signal: int | None = None
        self._reached = reached_preemption
        self._distributed = jax.process_count() > 1
        self._calls = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        signals = (signal.SIGINT,) if self._distributed else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def agree_through(self, reached_preemption: Callable[[int], bool]) -> None:
        """Set the multi-host agreement (once the run's checkpoint manager exists)."""
        self._reached = reached_preemption

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        if self._distributed:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier tells the other hosts

    def should_stop(self) -> bool:
        # The agreement needs the same increasing id on every host: the number of calls, which
        # all hosts make once per step from the same restored step.
        self._calls += 1
        if self._distributed and self._reached(self._calls):
            self.signal = self.signal or signal.SIGTERM
            return True
        return not self._distributed and self.signal is not None

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
