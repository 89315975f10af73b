"""Time spent communicating, for the step-time split (data, teacher, student, communication, optimizer).

Two sources, both measured only on the steps that log (measurement synchronises
the device around every collective, which costs overlap):

* DeepSpeed's own collectives (ZeRO's gradient reduce-scatter and all-reduce,
  its parameter all-gathers, the ZeRO-3 teacher's gathers) through DeepSpeed's
  comms logger, switched on for the measured step and read back afterwards;
* ours: the MoE token exchange (``all_to_all`` forward and backward, and its
  count exchange), which calls ``torch.distributed`` directly and reports here.

Collectives launched asynchronously are counted up to their launch; their wait
falls into the surrounding compute time.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CommClock:
    def __init__(self) -> None:
        self.enabled = False
        self._ours = 0.0

    @staticmethod
    def _deepspeed_timers() -> dict:
        # the comms logger times each collective with a timer named after it; a timer keeps every
        # interval since its last reset, so the sum over timers is this step's total (the logger's
        # own per-call records are running sums, see docs/DECISIONS.md)
        # lazy: the MoE layer imports this module, and DeepSpeed takes seconds to import
        from deepspeed.comm import comm as dscomm

        return dscomm.timers.timers

    def start(self) -> None:
        """Begin a measured step: both sources from zero."""
        from deepspeed import comm as dscomm  # lazy: as above

        self._deepspeed_timers().clear()
        dscomm.configure(enabled=True, prof_all=True)
        self._ours = 0.0
        self.enabled = True

    def stop(self) -> None:
        from deepspeed import comm as dscomm  # lazy: as above

        dscomm.configure(enabled=False)
        dscomm.comms_logger.comms_dict = {}
        self._deepspeed_timers().clear()
        self.enabled = False

    def seconds(self) -> float:
        """Communication so far in this measured step (0 when not measuring)."""
        if not self.enabled:
            return 0.0
        ms = sum(t.elapsed(reset=False) for t in self._deepspeed_timers().values() if not t.started_)
        return self._ours + ms / 1000.0

    def ours_seconds(self) -> float:
        """The part of :meth:`seconds` spent in our own exchanges (the MoE token all_to_all)."""
        return self._ours if self.enabled else 0.0

    @contextlib.contextmanager
    def measure(self, device: torch.device) -> Iterator[None]:
        """Count the enclosed collective as communication (when measuring)."""
        if not self.enabled:
            yield
            return
        _sync(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(device)
            self._ours += time.perf_counter() - t0


COMM_CLOCK = CommClock()
