"""What an SFTP client asks of the host, and how much it moved: the operations a transcript shows.

How this works. hoop relays an SFTP session as bytes (its files are not masked: ``allow.sftp`` gives
unmasked access to what the host user can read), but on-call still needs to know which files were read,
written, renamed or removed, and how much of each. :class:`SftpLog` reads both halves of the stream
(SFTP version 3, draft-ietf-secsh-filexfer-02, which OpenSSH speaks) without changing them:
``from_client`` and ``from_server`` return the operations the bytes completed.

Each direction is cut into packets by a :class:`_Packets` reader, which holds only the first bytes of
the packets that matter and skips the rest as it streams by, so a large transfer costs one header parse
per packet and no copy of file data. From the client: the packets that name a path (open, opendir,
remove, rename, mkdir, rmdir, setstat, symlink and OpenSSH's ``posix-rename``/``hardlink``
extensions) are held up to :data:`MAX_HELD` bytes (the paths come first: padding after them, which the
server ignores, cannot hide them; a longer path is recorded as unreadable); reads, writes and closes up
to their file handle. From the host: handles (which name the file each open got), data replies (how
much a read returned) and statuses (a failed open). A file's bytes read and written are added up per
handle and recorded when the client closes it.

A stream that is not SFTP stops the reading (one ``unreadable`` operation says so) and the bytes still
flow: this is a record, not a guard. No I/O here: bytes in, operations out (dicts ready to record,
paths not yet masked).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_HELD", "SftpLog"]

#: how much of a path-naming packet is held to be read (the rest of a longer one is skipped)
MAX_HELD = 64 * 1024
#: a packet longer than this is not SFTP (OpenSSH's limit is 256 KiB of data plus headers)
_MAX_PACKET = 16 * 1024 * 1024
#: requests and files followed at once; past this a misbehaving client's oldest are forgotten
_MAX_TRACKED = 4096
#: a request id and a handle (at most 256 bytes, draft-02 section 6.2): what is held of a read, write or close
_HANDLE_HEAD = 4 + 4 + 256

_U32 = struct.Struct(">I")

# requests (client -> server)
_OPEN, _CLOSE, _READ, _WRITE, _SETSTAT, _OPENDIR = 3, 4, 5, 6, 9, 11
_REMOVE, _MKDIR, _RMDIR, _RENAME, _SYMLINK, _EXTENDED = 13, 14, 15, 18, 20, 200
# replies (server -> client)
_STATUS, _HANDLE, _DATA = 101, 102, 103

_ONE_PATH = {_SETSTAT: "setstat", _OPENDIR: "list", _REMOVE: "remove", _MKDIR: "mkdir", _RMDIR: "rmdir"}
_TWO_PATHS = {_RENAME: "rename", _SYMLINK: "symlink"}
_EXTENSIONS = {b"posix-rename@openssh.com": "rename", b"hardlink@openssh.com": "hardlink"}
_PATH_REQUESTS = frozenset({_OPEN, *_ONE_PATH, *_TWO_PATHS, _EXTENDED})
_INIT, _VERSION = 1, 2  # the only packets without a request id
#: what is held of each packet type; every other one (but INIT and VERSION) is held for its request id
_CLIENT_HOLD = {**{k: MAX_HELD for k in _PATH_REQUESTS}, _READ: _HANDLE_HEAD, _WRITE: _HANDLE_HEAD,
                _CLOSE: _HANDLE_HEAD}
_SERVER_HOLD = {_HANDLE: _HANDLE_HEAD, _DATA: 8}
_ID = 4
#: SSH_FXF_* open flags, in the order a transcript names them
_PFLAGS = ((1, "read"), (2, "write"), (4, "append"), (8, "create"), (0x10, "truncate"), (0x20, "exclusive"))

Op = dict[str, Any]


class _Short(Exception):
    """A field runs past the end of what was held of its packet."""


def _u32(body: bytes, pos: int) -> int:
    if pos + 4 > len(body):
        raise _Short
    value: int = _U32.unpack_from(body, pos)[0]
    return value


def _string(body: bytes, pos: int) -> tuple[bytes, int]:
    n = _u32(body, pos)
    end = pos + 4 + n
    if end > len(body):
        raise _Short
    return body[pos + 4 : end], end


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _unreadable(why: str) -> Op:
    return {"op": "unreadable", "path": "", "why": why}


def operation(kind: int, body: bytes) -> Op | None:
    """The operation of one path-naming request (``body``: what was held after the type byte, from the
    request id on); None for an extension that names no change."""
    try:
        pos = 4  # (the request id)
        if kind == _OPEN:
            path, pos = _string(body, pos)
            flags = _u32(body, pos)
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
        else:
            op = _TWO_PATHS[kind]
        first, pos = _string(body, pos)
        second, _ = _string(body, pos)
        # (OpenSSH sends SYMLINK's two paths in the opposite order to the draft: they are shown as sent)
        return {"op": op, "path": _text(first), "to": _text(second)}
    except _Short:
        return _unreadable("a request packet ends inside one of its fields, or names a path longer than hoop reads")


class _Packets:
    """One direction's packets: ``on_packet(type, length, held)`` for each packet whose type is in ``hold``
    (its first ``hold[type]`` bytes after the type byte), once the packet has passed whole."""

    def __init__(self, hold: dict[int, int], on_packet: Callable[[int, int, bytes], list[Op]]) -> None:
        # (every packet with a request id is held for it at least: replies are matched to requests by it)
        self._hold = {k: hold.get(k, _ID) for k in range(256) if k not in (_INIT, _VERSION)}
        self._on_packet = on_packet
        self._head = b""  # the start of a packet whose length and type have not all arrived
        self._held = bytearray()
        self._want = 0  # bytes of the current packet still to come (held or skipped)
        self._keep = 0  # of them, bytes still to hold
        self._kind = -1  # the current packet's type; -1: between packets
        self._length = 0
        self.stopped = False  # the stream was not SFTP: nothing more is read

    def feed(self, data: bytes) -> list[Op]:
        ops: list[Op] = []
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
                length = _U32.unpack_from(self._head)[0]
                kind = self._head[4]
                self._head = b""
                if length < 1 or length > _MAX_PACKET:
                    self.stopped = True
                    ops.append(_unreadable(f"a packet of {length} bytes is not SFTP; the rest of the session is "
                                           "not read"))
                    break
                self._kind, self._length, self._want = kind, length, length - 1
                self._keep = min(self._want, self._hold.get(kind, 0))
            take = min(self._want, end - pos)
            if self._keep:
                kept = min(take, self._keep)
                self._held += view[pos : pos + kept]
                self._keep -= kept
            pos += take
            self._want -= take
            if self._want == 0:
                if self._kind in self._hold:
                    ops.extend(self._on_packet(self._kind, self._length, bytes(self._held)))
                    self._held.clear()
                self._kind = -1
        return ops


class _File:
    """A file the client opened: its path and mode, and the bytes read and written through its handle."""

    __slots__ = ("mode", "path", "read", "written")

    def __init__(self, path: str, mode: str) -> None:
        self.path, self.mode = path, mode
        self.read = self.written = 0


def _transferred(file: _File, **extra: Any) -> Op:
    return {"op": "transferred", "path": file.path, "mode": file.mode, "read": file.read, "written": file.written,
            **extra}


class SftpLog:
    """An SFTP session's two streams, read as they pass (see the module docstring)."""

    def __init__(self) -> None:
        self._client = _Packets(_CLIENT_HOLD, self._request)
        self._server = _Packets(_SERVER_HOLD, self._reply)
        #: request id -> what its reply completes: ("open", the file it opens), ("read", the file it reads),
        #: ("close", the file it closes: reported at the reply, once the reads sent before it are answered)
        self._inflight: dict[int, tuple[str, _File] | None] = {}
        self._files: dict[bytes, _File] = {}  # handle -> open file
        self._noted = False  # the one note that counts may be short has been made

    def from_client(self, data: bytes) -> list[Op]:
        """The operations the client's ``data`` completed, in order."""
        return self._client.feed(data)

    def from_server(self, data: bytes) -> list[Op]:
        """What the host's ``data`` completed: a file closed, or a note should the stream stop being SFTP."""
        return self._server.feed(data)

    def finish(self) -> list[Op]:
        """The session ends: the files that moved bytes and were not reported yet (closed without an answer,
        or never closed)."""
        closing = [p[1] for p in self._inflight.values() if p is not None and p[0] == "close"]
        files, self._files, self._inflight = self._files, {}, {}
        return ([_transferred(f) for f in closing if f.read or f.written]
                + [_transferred(f, unclosed=True) for f in files.values() if f.read or f.written])

    def _note(self, why: str) -> list[Op]:
        if self._noted:
            return []
        self._noted = True
        return [_unreadable(f"{why}; byte counts from here on may be short")]

    def _request(self, kind: int, length: int, held: bytes) -> list[Op]:
        ops: list[Op] = []
        try:
            request_id = _u32(held, 0)
        except _Short:
            return ops
        pending: tuple[str, _File] | None = None
        if kind in _PATH_REQUESTS:
            op = operation(kind, held)
            if op is not None:
                ops.append(op)
                if kind == _OPEN and op["op"] == "open":
                    pending = ("open", _File(op["path"], op["mode"]))
        elif kind in (_READ, _WRITE, _CLOSE):
            try:
                handle, end = _string(held, 4)
            except _Short:
                handle, end = b"", 0  # (a handle longer than the draft allows: its bytes are not counted)
            file = self._files.get(handle) if end else None
            if kind == _READ and file is not None:
                pending = ("read", file)
            elif kind == _WRITE and file is not None:  # what follows the handle: uint64 offset, string data
                file.written += max(length - 1 - end - 8 - 4, 0)
            elif kind == _CLOSE and file is not None:
                del self._files[handle]
                pending = ("close", file)
        if request_id in self._inflight:
            # a reply to either would be taken for the other's: a client can hide what a read returned this way
            ops.extend(self._note("the client reused a request id still in flight"))
            earlier = self._inflight.pop(request_id)
            if earlier is not None and earlier[0] == "close" and (earlier[1].read or earlier[1].written):
                ops.append(_transferred(earlier[1]))  # (a closed file is reported now, not lost with its entry)
        self._inflight[request_id] = pending
        if len(self._inflight) > _MAX_TRACKED:  # (a client that sends requests nobody answers yet)
            dropped = self._inflight.pop(next(iter(self._inflight)))
            if dropped is not None:
                ops.extend(self._note(f"the client had more than {_MAX_TRACKED} requests in flight"))
                if dropped[0] == "close" and (dropped[1].read or dropped[1].written):
                    ops.append(_transferred(dropped[1]))
        return ops

    def _reply(self, kind: int, length: int, held: bytes) -> list[Op]:
        ops: list[Op] = []
        try:
            pending = self._inflight.pop(_u32(held, 0), None)
            if pending is None:
                return ops
            what, file = pending
            if what == "close":  # (the server answers in order: the reads sent before the close are in)
                if file.read or file.written:
                    ops.append(_transferred(file))
            elif what == "open" and kind == _HANDLE:
                handle, _ = _string(held, 4)
                if len(self._files) >= _MAX_TRACKED:  # (a client that never closes: the oldest is said now)
                    oldest = self._files.pop(next(iter(self._files)))
                    if oldest.read or oldest.written:
                        ops.append(_transferred(oldest, unclosed=True))
                self._files[handle] = file
            elif what == "read" and kind == _DATA:  # (a length past the packet's end is not believed)
                file.read += min(_u32(held, 4), max(length - 9, 0))
        except _Short:
            pass  # (a reply shorter than its fields: nothing is counted from it)
        return ops
