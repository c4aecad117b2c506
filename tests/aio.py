"""Running async tests without a plugin: a fresh loop per test, a hard time limit."""

from __future__ import annotations

import asyncio
import functools
import time


def aio(timeout: float = 20.0):
    """Run an async test function in a fresh event loop, with a hard time limit."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            asyncio.run(asyncio.wait_for(fn(*args, **kwargs), timeout))

        return run

    return wrap


async def until(pred, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
