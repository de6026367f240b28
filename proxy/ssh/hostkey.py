"""The SSH proxy's host key: loaded from ``state_dir``, or generated once (0600) and kept there.

Replicas behind one address must present the same host key, so ``hoop state init`` makes it
ahead of time for a Secret shared by all of them (see manifests/kubernetes/).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import asyncssh

log = logging.getLogger(__name__)
KEY_FILE = "ssh_host_ed25519_key"


def ensure_host_key(state_dir: Path) -> asyncssh.SSHKey:
    """Load the persisted host key, or generate and persist one (0600)."""
    path = state_dir / KEY_FILE
    if path.exists():
        return asyncssh.read_private_key(str(path))
    state_dir.mkdir(parents=True, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    log.info("generated SSH host key %s", path)
    return key
