"""`vinyl-mqtt run`: start the roles a config names, each with its own MQTT session.

Also speaks systemd's notify protocol: READY=1 once every role is connected,
and WATCHDOG=1 only while the event loop turns and every role is alive, so a
wedged process is restarted rather than left silent.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import socket
from typing import Sequence

from .config import Config, redacted
from .messages import Topics
from .mqtt import Connection

log = logging.getLogger(__name__)

ROLE_CLASSES = {
    "listener": "vinyl_mqtt.roles.listener:ListenerRole",
    "matcher": "vinyl_mqtt.roles.matcher:MatcherRole",
    "dedupe": "vinyl_mqtt.roles.dedupe:DedupeRole",
    "nowplaying": "vinyl_mqtt.roles.nowplaying:NowPlayingRole",
    "scrobbler": "vinyl_mqtt.roles.scrobbler:ScrobblerRole",
    "waker": "vinyl_mqtt.roles.waker:WakerRole",
}


class RoleFailed(Exception):
    """A role stopped with an error; the process exits so systemd restarts it."""


def role_class(name: str):
    try:
        module, cls = ROLE_CLASSES[name].split(":")
    except KeyError:
        raise RoleFailed(f"role {name!r} is not available in this version") from None
    return getattr(importlib.import_module(module), cls)


class Systemd:
    """sd_notify without a dependency: a datagram to $NOTIFY_SOCKET, if any."""

    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET")
        self.addr = "\0" + addr[1:] if addr and addr.startswith("@") else addr
        usec = os.environ.get("WATCHDOG_USEC")
        self.watchdog_s = int(usec) / 1e6 if usec and usec.isdigit() else None

    def notify(self, state: str) -> None:
        if not self.addr:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.sendto(state.encode(), self.addr)
            except OSError as e:
                log.debug("sd_notify %s failed: %s", state, e)


async def run(cfg: Config, roles: Sequence[str] | None = None) -> None:
    roles = list(roles or cfg.roles)
    if not roles:
        raise RoleFailed("no roles to run: set `roles:` in the config or pass --roles")
    topics = Topics(cfg.mqtt.base_topic)
    log.info("node %s starting %s; config %s", cfg.node, ", ".join(roles), redacted(cfg))
    conns = [Connection(cfg.mqtt, node=cfg.node, role=r, topics=topics) for r in roles]
    instances = [role_class(r)(cfg, c) for r, c in zip(roles, conns)]
    tasks = [asyncio.create_task(inst.run(), name=r) for r, inst in zip(roles, instances)]
    sd = Systemd()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    helpers = [asyncio.create_task(_ready(sd, conns)), asyncio.create_task(_watchdog(sd, tasks))]
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in done if t is not stopper]
        for t in failed:
            exc = t.exception() if not t.cancelled() else None
            log.error("role %s stopped: %s", t.get_name(), exc or "finished unexpectedly", exc_info=exc)
        if failed:
            raise RoleFailed(f"role {failed[0].get_name()} stopped")
    finally:
        sd.notify("STOPPING=1")
        # close() first: it lets handlers finish and says "offline" explicitly.
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        for t in [*tasks, *helpers, stopper]:
            t.cancel()
        await asyncio.gather(*tasks, *helpers, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _ready(sd: Systemd, conns: Sequence[Connection]) -> None:
    await asyncio.gather(*(c.connected.wait() for c in conns))
    log.info("all roles connected")
    sd.notify("READY=1")


async def _watchdog(sd: Systemd, tasks: Sequence[asyncio.Task]) -> None:
    if not sd.watchdog_s:
        return
    while True:
        await asyncio.sleep(sd.watchdog_s / 3)
        if all(not t.done() for t in tasks):
            sd.notify("WATCHDOG=1")
