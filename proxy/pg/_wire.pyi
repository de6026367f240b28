"""C twins of the relay's hot loops (proxy/pg/_wire.c).

See framer.split, runs.rewrite_run, fast.batch, fast.reply_stretch, sqlshape.shape and
detectors.py_email_hits.
"""

from collections.abc import Callable
from typing import Any

from proxy.pg.messages import Buf

def split(
    buf: Buf, pos: int, max_length: int, out: list[tuple[int, int, int]], coalesce_rows: bool, /
) -> tuple[int, int, int]: ...
def rewrite_run(
    buf: Buf, s: int, e: int, ops: bytes, fixed: tuple[bytes | None, ...], strategies: tuple[object, ...],
    apply: Callable[[bytes, Any], bytes], scanning: bool, err: type[Exception], /
) -> tuple[bytes, bytes | None]: ...
def text_cells(buf: Buf, s: int, e: int, readable: bytes, /) -> bytes | None: ...
def reply_stretch(buf: Buf, max_length: int, /) -> tuple[int, int, int, int, int, int, int, int, int] | None: ...
def shape(sql: str, /) -> str | None: ...
def email_hits(data: bytes, hits: list[Any], label: str, /) -> None: ...
def batch(
    buf: Buf, max_length: int, /
) -> tuple[tuple[bytes | None, bytes, bytes], str, str, tuple[int, ...]] | None: ...
