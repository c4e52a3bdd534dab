"""Stopping a generation early: a cancel signal and a deadline, checked by the runner's loops.

The runner checks both at the start of every mask step and between video windows, so a stopped request
frees the runner within one mask step and leaves it ready for the next call. A service passes a
`threading.Event` it sets when the client goes away, and a deadline from its per-kind default.
"""

from __future__ import annotations

import dataclasses
import threading
import time


class Cancelled(RuntimeError):
    """The request was cancelled (its client went away, its stream was closed, or the caller set its event)."""


class DeadlineExceeded(Cancelled):
    """The request ran past its deadline."""


@dataclasses.dataclass(frozen=True)
class StopSignal:
    """cancel: set to stop the request; deadline: a `time.monotonic()` instant after which it stops."""

    cancel: threading.Event | None = None
    deadline: float | None = None

    @classmethod
    def after(cls, seconds: float | None, cancel: threading.Event | None = None) -> "StopSignal":
        """A signal whose deadline is `seconds` from now (None: no deadline)."""
        return cls(cancel, None if seconds is None else time.monotonic() + seconds)

    def check(self) -> None:
        """Raise `Cancelled` or `DeadlineExceeded` if the request should stop now."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("the request was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded("the request ran past its deadline")


NEVER = StopSignal()
