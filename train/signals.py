"""Pre-emption: SLURM sends SIGUSR1 (--signal=USR1@grace) or SIGTERM before it stops a job. The
handler only sets a flag; the loop finishes the current step, all ranks agree, then it checkpoints
and exits with REQUEUE_EXIT_CODE."""
from __future__ import annotations

import signal

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", i.e. requeue me


class PreemptionFlag:
    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received = signum

    @property
    def set(self) -> bool:
        return self.received is not None
