"""The SSH proxy's host key: loaded from ``state_dir``, or generated once (0600) and kept there.

Replicas behind one address must present the same host key, so ``hoop state init`` makes it
ahead of time for a Secret shared by all of them (see manifests/kubernetes/).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import asyncssh

from broker.errors import ConfigError

log = logging.getLogger(__name__)
KEY_FILE = "ssh_host_ed25519_key"


def read_host_key(state_dir: Path) -> asyncssh.SSHKey | None:
    """The persisted host key; None when there is none yet. A file that cannot be read or is not a private
    key (without a passphrase) is a :class:`ConfigError` naming it, never showing its content."""
    path = state_dir / KEY_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"state_dir {state_dir}: cannot read {KEY_FILE} ({exc.strerror or exc})") from None
    try:
        return asyncssh.import_private_key(data)
    except (asyncssh.KeyImportError, ValueError):
        raise ConfigError(f"state_dir {state_dir}: {KEY_FILE} is not an SSH private key hoop can read "
                          "(OpenSSH or PEM, without a passphrase)") from None


def ensure_host_key(state_dir: Path) -> asyncssh.SSHKey:
    """Load the persisted host key, or generate and persist one (0600)."""
    key = read_host_key(state_dir)
    if key is not None:
        return key
    path = state_dir / KEY_FILE
    key = asyncssh.generate_private_key("ssh-ed25519")
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key())
    except OSError as exc:
        raise ConfigError(f"state_dir {state_dir}: cannot keep {KEY_FILE} there ({exc.strerror or exc})") from None
    log.info("generated SSH host key %s", path)
    return key
