"""Running async tests without a plugin: a fresh loop per test, a hard time limit;
and starting and stopping roles in-process."""

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


def start(role_cls, cfg) -> tuple[asyncio.Task, object]:
    """A role running in this loop with its own connection, as `vinyl-mqtt run` starts it."""
    from vinyl_mqtt.messages import Topics
    from vinyl_mqtt.mqtt import Connection

    conn = Connection(cfg.mqtt, node=cfg.node, role=role_cls.name, topics=Topics(cfg.mqtt.base_topic))
    role = role_cls(cfg, conn)
    return asyncio.create_task(role.run()), role


async def stop(*tasks: asyncio.Task) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
