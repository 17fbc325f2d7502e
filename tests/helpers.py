"""Small helpers shared by all tests: polling (never bare sleeps) and free ports."""

from __future__ import annotations

import socket
import sys
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 60, interval: float = 0.25, message: str = "") -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    Exceptions raised by the predicate count as "not yet"; the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = predicate()
            if last:
                return last  # type: ignore[return-value]
        except Exception as exc:  # noqa: BLE001 - reported below
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message or predicate!r}; last: {last!r}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(message: str) -> None:
    """A measured figure, printed even while a KopfRunner has swapped sys.stdout (shown with -s)."""
    print(message, file=sys.__stdout__, flush=True)
