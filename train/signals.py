"""Pre-emption: SLURM sends SIGUSR1 (--signal=USR1@grace) or SIGTERM before it stops a job. The
handler only sets a flag; the loop finishes the current step, all ranks agree, then it checkpoints
and exits with REQUEUE_EXIT_CODE.

Ctrl-C (SIGINT; torchrun's agent passes it on to each rank) takes the same way the first time, so that stopping a
run by hand keeps its last steps; a second Ctrl-C is Python's KeyboardInterrupt, at once, with no checkpoint."""
from __future__ import annotations

import os
import signal

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", i.e. requeue me


class PreemptionFlag:
    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM, signal.SIGINT), announce: bool = True):
        """`announce`: say on stderr what a Ctrl-C does (rank 0 only: every rank gets it)."""
        self.received: int | None = None
        self.announce = announce
        for sig in signals:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C stops at once
            if self.announce:
                # os.write, not print: a handler that prints while the loop prints raises "reentrant call".
                os.write(2, b"\nCtrl-C: stopping after this step with a checkpoint (exit 75; the same command "
                            b"resumes). Ctrl-C again to stop at once without one.\n")

    @property
    def set(self) -> bool:
        return self.received is not None
