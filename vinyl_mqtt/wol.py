"""Wake-on-LAN: the magic packet, and sending it as a UDP broadcast.

A magic packet is 6 bytes of 0xFF followed by the target's MAC address 16
times (102 bytes).  It is sent over UDP (port 9, "discard", by convention; 7
also works) to a broadcast address, a few times a short interval apart,
because a single datagram on a busy LAN (or Wi-Fi) may be lost and nothing
acknowledges it.

    packet = magic_packet("aa:bb:cc:dd:ee:ff")
    send("aa-bb-cc-dd-ee-ff", broadcast="192.168.1.255", port=9, repeat=3)
    await asend("aabbccddeeff")
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from .errors import VinylError

DEFAULT_BROADCAST = "255.255.255.255"
DEFAULT_PORT = 9
DEFAULT_REPEAT = 3
DEFAULT_INTERVAL_S = 0.1
PACKET_SIZE = 6 + 16 * 6

_HEX = r"[0-9A-Fa-f]{2}"
_MAC_FORMS = (
    re.compile(rf"^{_HEX}(?::{_HEX}){{5}}$"),  # aa:bb:cc:dd:ee:ff
    re.compile(rf"^{_HEX}(?:-{_HEX}){{5}}$"),  # aa-bb-cc-dd-ee-ff
    re.compile(r"^[0-9A-Fa-f]{12}$"),  # aabbccddeeff
)


class WolError(VinylError, ValueError):
    """A MAC address or broadcast address that cannot be used (the message says why)."""


def parse_mac(mac: str) -> bytes:
    """The 6 bytes of ``mac`` (``aa:bb:cc:dd:ee:ff``, ``aa-bb-cc-dd-ee-ff`` or ``aabbccddeeff``)."""
    if not isinstance(mac, str):
        raise WolError(f"a MAC address must be text, not {type(mac).__name__}")
    text = mac.strip()
    if not any(form.match(text) for form in _MAC_FORMS):
        raise WolError(
            f"{mac!r} is not a MAC address: expected 6 hex bytes as aa:bb:cc:dd:ee:ff, "
            "aa-bb-cc-dd-ee-ff or aabbccddeeff"
        )
    raw = bytes.fromhex(re.sub(r"[:-]", "", text))
    if raw == b"\x00" * 6 or raw == b"\xff" * 6:
        raise WolError(f"{mac!r} is not a network card's MAC address (all zeros / broadcast)")
    return raw


def normalize_mac(mac: str) -> str:
    """``mac`` as lower-case ``aa:bb:cc:dd:ee:ff`` (WolError if it is not one)."""
    return ":".join(f"{b:02x}" for b in parse_mac(mac))


def magic_packet(mac: str | bytes) -> bytes:
    """6 x 0xFF, then the 6-byte MAC 16 times: 102 bytes."""
    raw = mac if isinstance(mac, bytes) else parse_mac(mac)
    if len(raw) != 6:
        raise WolError(f"a MAC address has 6 bytes, not {len(raw)}")
    return b"\xff" * 6 + raw * 16


def check_broadcast(address: str) -> str:
    """``address`` if it is an IPv4 address (the broadcast to send to), else WolError."""
    try:
        return str(ipaddress.IPv4Address(address.strip()))
    except (ipaddress.AddressValueError, AttributeError) as e:
        raise WolError(f"{address!r} is not an IPv4 address (e.g. 255.255.255.255 or 192.168.1.255)") from e


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    return sock


def _check_args(repeat: int, port: int) -> None:
    if repeat < 1:
        raise WolError(f"repeat must be at least 1, not {repeat}")
    if not 1 <= port <= 65535:
        raise WolError(f"port must be from 1 to 65535, not {port}")


def send(
    mac: str,
    *,
    broadcast: str = DEFAULT_BROADCAST,
    port: int = DEFAULT_PORT,
    repeat: int = DEFAULT_REPEAT,
    interval_s: float = DEFAULT_INTERVAL_S,
) -> int:
    """Send the magic packet for ``mac`` ``repeat`` times; the number sent (OSError if none could be)."""
    packet = magic_packet(mac)
    _check_args(repeat, port)
    target = (check_broadcast(broadcast), port)
    with _socket() as sock:
        for i in range(repeat):
            if i:
                time.sleep(interval_s)
            sock.sendto(packet, target)
    return repeat


async def asend(
    mac: str,
    *,
    broadcast: str = DEFAULT_BROADCAST,
    port: int = DEFAULT_PORT,
    repeat: int = DEFAULT_REPEAT,
    interval_s: float = DEFAULT_INTERVAL_S,
) -> int:
    """:func:`send` without blocking the event loop (the pauses are asyncio sleeps).

    Returns how many packets went out; raises OSError only if not even the first could be sent.
    """
    packet = magic_packet(mac)
    _check_args(repeat, port)
    target = (check_broadcast(broadcast), port)
    sent = 0
    error: OSError | None = None
    with _socket() as sock:
        sock.setblocking(False)
        for i in range(repeat):
            if i:
                await asyncio.sleep(interval_s)
            try:
                sock.sendto(packet, target)  # a datagram: never blocks for long
            except OSError as e:  # e.g. network unreachable while an interface comes up: try the next one
                error = e
                continue
            sent += 1
    if sent == 0:
        raise error or OSError(f"no magic packet could be sent to {target[0]}:{target[1]}")
    return sent


class WakerConfig(BaseModel):
    """The ``waker:`` config section: which machine to wake, how, and how long to wait for it.

    It lives here, not in the role's module, so that :mod:`vinyl_mqtt.config` can import it
    without an import cycle (the role imports the config and the MQTT modules).
    """

    model_config = ConfigDict(extra="forbid")

    mac: str  # the matcher node's network card: aa:bb:cc:dd:ee:ff, aa-bb-cc-dd-ee-ff or aabbccddeeff
    broadcast: str = DEFAULT_BROADCAST  # or the LAN's directed broadcast, e.g. 192.168.1.255
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)  # 9 (discard) by convention; some cards want 7
    repeat: int = Field(DEFAULT_REPEAT, ge=1, le=20)  # packets per wake (UDP: one may be lost)
    interval_s: float = Field(DEFAULT_INTERVAL_S, ge=0, le=10)  # between them
    wake_timeout_s: float = Field(120.0, gt=0, le=3600)  # no matcher online by then: the wake failed
    matcher_nodes: list[str] | None = None  # the nodes whose matcher counts (default: any)

    @field_validator("port", "repeat", "interval_s", "wake_timeout_s", mode="before")
    @classmethod
    def _not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # pydantic would take `true` as 1: almost certainly a slip
            raise PydanticCustomError("bool_not_number", "a number is expected, not true/false")
        return v

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        return normalize_mac(v)

    @field_validator("broadcast")
    @classmethod
    def _broadcast(cls, v: str) -> str:
        return check_broadcast(v)
