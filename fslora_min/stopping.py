"""Stopping a command cleanly: SIGTERM, which job schedulers and `timeout` send, is handled as
Ctrl-C is (the run's checkpoint kept, one line on how to resume, folders it made and left empty
removed), and the exit status says which signal stopped it (128 + its number, as a shell's)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(KeyboardInterrupt):
    """What SIGTERM raises: a KeyboardInterrupt to every handler, but not KeyboardInterrupt itself,
    because CPython remembers a plain KeyboardInterrupt that left an exec of a string (a dataclass
    being made during a lazy import, say) and, under `python -m`, then ends the process by SIGINT
    whatever status it exits with: 130 (-2 to Popen) instead of 143, now and then."""


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[list[int]]:
    """Within: SIGTERM raises Terminated (a KeyboardInterrupt); yields the list the signals
    received go to."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only it may set handlers
        yield received
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_status(received: list[int]) -> int:
    """A stopped command's exit status: 128 + the signal's number (SIGINT's, 130, for Ctrl-C)."""
    return 128 + (received[0] if received else signal.SIGINT)
