"""The unit file is valid for systemd, and the process speaks sd_notify."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vinyl_mqtt.run import Systemd, _watchdog

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "vinyl-mqtt@.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_file_verifies(tmp_path):
    text = UNIT.read_text().replace("/opt/vinyl-mqtt/.venv/bin/vinyl-mqtt", sys.executable)
    unit = tmp_path / "vinyl-mqtt@.service"
    unit.write_text(text)
    (tmp_path / "vinyl-mqtt@listener.service").symlink_to(unit.name)
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / "vinyl-mqtt@listener.service")],
        capture_output=True, text=True,
    )
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def test_unit_is_hardened_and_notifies():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "User=vinyl-mqtt", "SupplementaryGroups=audio", "DeviceAllow=char-alsa rw"):
        assert line in text, line


def _listen(tmp_path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    return s, path


def test_notify_reaches_the_socket(tmp_path, monkeypatch):
    s, path = _listen(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    Systemd().notify("READY=1")
    assert s.recv(100) == b"READY=1"


def test_watchdog_pets_only_while_roles_live(tmp_path, monkeypatch):
    s, path = _listen(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "300000")  # pet every 0.1 s

    async def scenario():
        role = asyncio.create_task(asyncio.sleep(0.35))
        dog = asyncio.create_task(_watchdog(Systemd(), [role]))
        await asyncio.sleep(0.8)
        dog.cancel()

    asyncio.run(scenario())
    s.settimeout(0.05)
    pets = []
    try:
        while True:
            pets.append(s.recv(100))
    except OSError:
        pass
    assert set(pets) == {b"WATCHDOG=1"}
    # ~3 pets while the role lived (0.35 s at 0.1 s), none in the 0.45 s after it ended
    assert 2 <= len(pets) <= 4, pets
