"""What an SFTP client asks of the host, read from its request stream: the operations a transcript shows.

How this works. hoop relays an SFTP session as bytes (its files are not masked: ``allow.sftp`` gives
unmasked access to what the host user can read), but on-call still needs to know which files were read,
written, renamed or removed. :class:`SftpRequests` reads the client's half of the stream (SFTP version 3,
draft-ietf-secsh-filexfer-02, which OpenSSH speaks) without changing it: each ``feed`` returns the
operations that the bytes completed. Packets that name a path (open, opendir, remove, rename, mkdir,
rmdir, setstat, symlink and OpenSSH's ``posix-rename``/``hardlink`` extensions) are held, their first
:data:`MAX_HELD` bytes (the paths come first: padding after them, which the server ignores, cannot hide
them; a path longer than that is recorded as unreadable); every other packet (reads, writes, stats,
handles) is skipped as it streams by, so a large upload costs one header parse per packet and no copy.
A stream that is not SFTP stops the reading (one ``unreadable`` operation says so) and the bytes still
flow: this is a record, not a guard.

No I/O here: bytes in, operations out (dicts ready to record, paths not yet masked).
"""

from __future__ import annotations

import struct
from typing import Any

__all__ = ["MAX_HELD", "SftpRequests"]

#: how much of a path-naming packet is held to be read (the rest of a longer one is skipped)
MAX_HELD = 64 * 1024
#: a packet longer than this is not SFTP (OpenSSH's limit is 256 KiB of data plus headers)
_MAX_PACKET = 16 * 1024 * 1024

_U32 = struct.Struct(">I")

# request types (client -> server) that name paths
_OPEN, _SETSTAT, _OPENDIR, _REMOVE, _MKDIR, _RMDIR, _RENAME, _SYMLINK, _EXTENDED = 3, 9, 11, 13, 14, 15, 18, 20, 200
_ONE_PATH = {_SETSTAT: "setstat", _OPENDIR: "list", _REMOVE: "remove", _MKDIR: "mkdir", _RMDIR: "rmdir"}
_TWO_PATHS = {_RENAME: "rename", _SYMLINK: "symlink"}
_EXTENSIONS = {b"posix-rename@openssh.com": "rename", b"hardlink@openssh.com": "hardlink"}
_HELD = frozenset({_OPEN, *_ONE_PATH, *_TWO_PATHS, _EXTENDED})
#: SSH_FXF_* open flags, in the order a transcript names them
_PFLAGS = ((1, "read"), (2, "write"), (4, "append"), (8, "create"), (0x10, "truncate"), (0x20, "exclusive"))


class _Short(Exception):
    """A field runs past the end of its packet."""


def _string(body: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 4 > len(body):
        raise _Short
    (n,) = _U32.unpack_from(body, pos)
    end = pos + 4 + n
    if end > len(body):
        raise _Short
    return body[pos + 4 : end], end


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def operation(kind: int, body: bytes) -> dict[str, Any] | None:
    """The operation of one whole request packet (``body``: after the type byte, from the request id on);
    None for a request that names no path (an extension hoop does not read included)."""
    try:
        pos = 4  # (the request id)
        if kind == _OPEN:
            path, pos = _string(body, pos)
            if pos + 4 > len(body):
                raise _Short
            (flags,) = _U32.unpack_from(body, pos)
            mode = ",".join(name for bit, name in _PFLAGS if flags & bit) or "none"
            return {"op": "open", "path": _text(path), "mode": mode}
        if kind in _ONE_PATH:
            path, _ = _string(body, pos)
            return {"op": _ONE_PATH[kind], "path": _text(path)}
        if kind == _EXTENDED:
            name, pos = _string(body, pos)
            op = _EXTENSIONS.get(name)
            if op is None:
                return None
            kind_op = op
        else:
            kind_op = _TWO_PATHS[kind]
        first, pos = _string(body, pos)
        second, _ = _string(body, pos)
        # (OpenSSH sends SYMLINK's two paths in the opposite order to the draft: they are shown as sent)
        return {"op": kind_op, "path": _text(first), "to": _text(second)}
    except _Short:
        return {"op": "unreadable", "path": "", "why": "a request packet ends inside one of its fields"}


class SftpRequests:
    """The client's SFTP request stream, read as it passes (see the module docstring)."""

    def __init__(self) -> None:
        self._head = b""  # the start of a packet whose length and type have not all arrived
        self._held = bytearray()  # the packet being held whole (a path-naming request)
        self._want = 0  # bytes of the current packet still to come (held or skipped)
        self._keep = 0  # of them, bytes still to hold (the first MAX_HELD of a path-naming request)
        self._kind = -1  # the current packet's type; -1: between packets
        self.stopped = False  # the stream was not SFTP: nothing more is read

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The operations ``data`` completed, in order."""
        ops: list[dict[str, Any]] = []
        if self.stopped:
            return ops
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._kind < 0:  # a packet's header: uint32 length, byte type
                need = 5 - len(self._head)
                self._head += bytes(view[pos : pos + need])
                pos += min(need, end - pos)
                if len(self._head) < 5:
                    break
                (length,) = _U32.unpack_from(self._head)
                kind = self._head[4]
                self._head = b""
                if length < 1 or length > _MAX_PACKET:
                    self.stopped = True
                    ops.append({"op": "unreadable", "path": "",
                                "why": f"a packet of {length} bytes is not SFTP; the rest of the session is not read"})
                    break
                self._kind, self._want = kind, length - 1
                # (a longer one is held in part: its paths come first, and the server ignores what trails them)
                self._keep = min(self._want, MAX_HELD) if kind in _HELD else 0
            take = min(self._want, end - pos)
            if self._keep:
                kept = min(take, self._keep)
                self._held += view[pos : pos + kept]
                self._keep -= kept
            pos += take
            self._want -= take
            if self._want == 0:
                if self._kind in _HELD:
                    got = operation(self._kind, bytes(self._held))
                    if got is not None:
                        ops.append(got)
                    self._held.clear()
                self._kind = -1
        return ops
