"""Keys hoop keeps in ``state_dir`` as hex text (``roles.key``, ``masking.key``): read, or made once (0600).

Reading and making are separate so that ``hoop check`` reads exactly as ``hoop serve`` does, and says
what serve would make instead of making it. Every failure is a :class:`ConfigError` naming the folder
and the file, never the key.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from broker.errors import ConfigError


def read_hex_key(state_dir: Path, name: str) -> bytes | None:
    """The key in ``state_dir/name``; None when there is none yet."""
    try:
        text = (state_dir / name).read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except OSError as exc:  # a state_dir that is a file, or a file hoop may not read
        raise ConfigError(f"state_dir {state_dir}: cannot keep {name} there ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        text = ""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) < 16:  # (an empty file once gave an empty key: every hash and role password alike)
        raise ConfigError(f"state_dir {state_dir}: {name} is not a key hoop wrote (hex digits)")
    return key


def hex_key(state_dir: Path, name: str) -> bytes:
    """The key in ``state_dir/name``, made (32 random bytes, mode 0600) when there is none yet."""
    key = read_hex_key(state_dir, name)
    if key is not None:
        return key
    key = secrets.token_bytes(32)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(key.hex())
    except OSError as exc:
        raise ConfigError(f"state_dir {state_dir}: cannot keep {name} there ({exc.strerror or exc})") from None
    return key


def unwritable(state_dir: Path) -> str | None:
    """Why hoop could not make files in ``state_dir`` (as ``strerror`` would say it), or None. Writes
    nothing: for ``hoop check``, which says what ``hoop serve`` would fail to make."""
    folder = state_dir
    while not folder.exists():  # the nearest folder that exists is where mkdir would start
        if folder.parent == folder:
            return None
        folder = folder.parent
    if not folder.is_dir():
        return os.strerror(errno.ENOTDIR)
    if not os.access(folder, os.W_OK | os.X_OK):
        return os.strerror(errno.EACCES)
    return None
