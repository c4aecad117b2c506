"""`vinyl-mqtt lastfm login`: Last.fm web authentication, keeping only the session key.

1. ``auth.getToken`` (signed with the API key and secret);
2. the user opens ``<auth_url>/api/auth/?api_key=...&token=...`` and grants access;
3. ``auth.getSession`` turns the authorised token into a session key, which
   is written to ``scrobbler.session_key_file`` with mode 0600 (created that
   way, never world-readable for an instant).

No password is asked for, and no password or password hash is ever written
anywhere: a session key does not expire and can be revoked by the user on
Last.fm's "Applications" page.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .roles.scrobbler import ScrobblerConfig, network

PENDING = {14}  # Unauthorized Token: not granted yet


class LoginError(Exception):
    pass


def write_session_key(path: Path, key: str) -> None:
    """Atomically replace ``path`` with the key (mode 0600 from the start)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lastfm-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def login(cfg: ScrobblerConfig, *, prompt: Callable[[str], None] | None = None, wait_s: float = 300.0,
          poll_s: float = 3.0, out=sys.stdout) -> str:
    """Run the web authentication; returns the user name. The session key goes to the file only.

    ``prompt(url)`` shows the URL to the user (default: print it and wait for
    Enter, on a terminal); then ``auth.getSession`` is polled until the user
    has granted access or ``wait_s`` has passed.
    """
    import pylast

    if not cfg.api_key or not cfg.api_secret.get_secret_value():
        raise LoginError("scrobbler.api_key and scrobbler.api_secret must be set first "
                         "(create an API account at https://www.last.fm/api/account/create)")
    net = network(cfg.api_key, cfg.api_secret.get_secret_value(), api_root=cfg.api_root, auth_url=cfg.auth_url)
    gen = pylast.SessionKeyGenerator(net)
    try:
        url = gen.get_web_auth_url()  # auth.getToken
    except pylast.PyLastError as e:
        raise LoginError(f"could not get a token from {cfg.api_root}: {e}") from e
    if prompt is None:
        print(f"Open this page, log in to {net.name} and allow access:\n\n    {url}\n", file=out, flush=True)
        if sys.stdin.isatty():
            try:
                input("Press Enter once you have allowed access... ")
            except EOFError:
                pass
    else:
        prompt(url)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            key, user = gen.get_web_auth_session_key_username(url)  # auth.getSession
            break
        except pylast.WSError as e:
            if str(e.status) not in {str(c) for c in PENDING} or time.monotonic() > deadline:
                raise LoginError(f"Last.fm did not give a session key: {e} (error {e.status})") from e
            time.sleep(poll_s)
        except pylast.PyLastError as e:
            raise LoginError(f"could not reach {cfg.api_root}: {e}") from e
    write_session_key(cfg.session_key_file, key)
    print(f"Logged in as {user}; session key saved to {cfg.session_key_file} (mode 0600).", file=out)
    return user


def cmd_lastfm_login(args) -> int:
    """The CLI command: ``vinyl-mqtt [--config FILE] lastfm login [--wait S]``."""
    from .config import load

    cfg = getattr(load(args.config), "scrobbler", None) if getattr(args, "config", None) else None
    cfg = cfg or ScrobblerConfig()
    try:
        login(cfg, wait_s=getattr(args, "wait", 300.0))
    except LoginError as e:
        print(f"lastfm login: {e}", file=sys.stderr)
        return 1
    return 0
