"""The server side of the inspector: track replies, mask what the client will see, record results.

How this works. :meth:`Replies.from_server` walks the frames of one received chunk. Runs of
messages it does not change are forwarded as one slice; a DataRow is rewritten only when its
result has a masked column or the detectors' bytes prefilter finds something in a run of
rows. A RowDescription is decoded once per distinct shape (cached by its raw bytes) and
turned into a masking :class:`~proxy.pg.rows.Plan`. When a column's table must be named
(``table.column`` rules) and the :class:`~proxy.pg.rows.Catalog` does not know it yet, the
walk suspends at that message until the lookup is done.

After an error of an extended-protocol message the server ignores everything up to the next
Sync, Queries included; :meth:`Replies._skip_to_sync` pops the same items, so that every later
answer is still matched with its own statement. When the client has not sent that Sync yet,
``skipping`` makes the client side treat what it sends until then as skipped too. An
extended-protocol ``COPY FROM STDIN`` eats the Syncs sent before its CopyDone (``copy_in``).

Rows that match no known description (no plan, or a different number of cells) end the
session with 42501: hoop cannot tell which column rules apply to them, and after the
tracking of :mod:`proxy.pg.state` it never should.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

from proxy.copyrows import mask_copy_row
from proxy.pg import codec
from proxy.pg.messages import (
    Backend,
    MalformedMessage,
    decode_command_complete,
    decode_copy_response,
    decode_fields,
    decode_parameter_description,
    decode_parameter_status,
)
from proxy.pg.rows import Catalog, mask_message_fields, mask_payload, mask_row
from proxy.pg.runs import rewrite_run, row_spans, run_might_contain, run_sample
from proxy.pg.state import NO_SHAPE, QUERY_SYNC, SKIPPED, Rec, Shape, State, Suspend

RAW = codec.RAW
_SYNC = ("sync", None)
_B_PASS = frozenset({RAW, Backend.PARAMETER_DESCRIPTION, Backend.COPY_DONE,
                     Backend.COPY_BOTH_RESPONSE, Backend.NEGOTIATE_PROTOCOL_VERSION,
                     Backend.FUNCTION_CALL_RESPONSE})
_SIMPLE_POPS = {Backend.PARSE_COMPLETE: "parse", Backend.BIND_COMPLETE: "bind", Backend.CLOSE_COMPLETE: "close"}


class Replies(State):
    """Server -> client half of the inspector."""

    def from_server(self, buf: bytes, frames: list[codec.Frame], start: int) -> tuple[list[bytes], int, Suspend | None]:
        out: list[bytes] = []
        run = -1
        mv = memoryview(buf)
        masker = self.masker
        i = start
        n = len(frames)
        while i < n:
            t, s, e = frames[i]
            if t < RAW:  # a run of DataRows (the framer coalesces them)
                count = -1 - t
                rec = self.rec
                if masker is None:
                    if run < 0:
                        run = s
                    if rec is not None:
                        self._count(buf, s, e, count, rec)
                    i += 1
                    continue
                plan = self.plan
                blob = None
                if plan is None:  # rows of no known description: which rules apply is unknown
                    return self._cannot_mask(out, run, buf, s, n)
                if plan.masked:
                    blob = rewrite_run(masker, plan, buf, s, e, self.detect)
                elif not self.detect or not run_might_contain(masker, plan, buf, s, e):
                    # nothing masked, nothing detectable: the run goes on as part of a slice
                    if run < 0:
                        run = s
                    if rec is not None:
                        self._count(buf, s, e, count, rec)
                    i += 1
                    continue
                if run >= 0:
                    out.append(buf[run:s])
                    run = -1
                if blob is None:  # something may be detected: row by row, exactly
                    rows = []
                    width = len(plan.strategies)
                    for rs, re_ in row_spans(buf, s, e):
                        if _I16(buf, rs + 5)[0] != width:
                            return self._cannot_mask(out, -1, buf, s, n)
                        new = mask_row(masker, plan, mv[rs + 5 : re_], self.detect)
                        rows.append(new if new is not None else buf[rs:re_])
                    blob = b"".join(rows)
                out.append(blob)
                if rec is not None:
                    self._count(blob, 0, len(blob), count, rec)
                i += 1
                continue
            if t in _B_PASS:
                if t == Backend.PARAMETER_DESCRIPTION and self.expect and self.expect[0][0] == "describe_s":
                    self._parameter_types(mv[s + 5 : e])
                if run < 0:
                    run = s
                i += 1
                continue
            body = mv[s + 5 : e]
            replace: bytes | None = None
            drop = False
            if t == Backend.ROW_DESCRIPTION:
                shape = self._shape(buf[s + 5 : e])
                if masker is not None and self.catalog is not None:
                    missing = self.catalog.missing(shape.fields)
                    if missing:
                        if run >= 0:
                            out.append(buf[run:s])
                        return out, i, _resolver(self.catalog, missing)
                drop = self._row_description(shape)
            elif t == Backend.NO_DATA:
                head: tuple[str, Any] = self.expect[0] if self.expect else ("", None)
                if head[0] == "describe_s" and head[1] is not None:
                    head[1].fields = NO_SHAPE
                elif head[0] == "describe_p":
                    drop = head[1][1]
                if head[0] in ("describe_s", "describe_p"):
                    self._pop_to(head[0])
            elif t in (Backend.COMMAND_COMPLETE, Backend.EMPTY_QUERY_RESPONSE, Backend.PORTAL_SUSPENDED):
                rec = self._result_rec()
                if rec is not None and t == Backend.COMMAND_COMPLETE and buf[s + 5 : s + 12] != b"SELECT ":
                    cc = decode_command_complete(body)
                    if cc.rows is not None and cc.command != "SELECT":
                        rec.rows += cc.rows
                    elif cc.command == "ROLLBACK":  # also what the server answers COMMIT in a failed transaction
                        rec.command = cc.command
                if self.expect and self.expect[0][0] == "execute":
                    self._pop_to("execute")
                    if rec is not None:
                        self._finish(rec)
                else:
                    self.plan = None  # the next statement of a Query starts with its own RowDescription
            elif t == Backend.READY_FOR_QUERY:
                self.status = chr(body[0]) if len(body) else "I"
                head_kind = self.expect[0][0] if self.expect else ""
                if head_kind == "query":
                    rec = self._pop_to("query")
                    self._finish(rec)
                else:
                    self._pop_to("sync")
                if self.status == "I":
                    self._ended()
            elif t in (Backend.ERROR_RESPONSE, Backend.NOTICE_RESPONSE):
                # an error of an extended-protocol message makes the server skip to Sync
                skips = t == Backend.ERROR_RESPONSE and self._skips_to_sync()
                if (t == Backend.ERROR_RESPONSE and self.expect and self.expect[0][0] == "refuse"
                        and decode_fields(body).get("S") == "ERROR"):
                    # the server's error for the stand-in of a refused statement: hoop's refusal instead
                    replace = self.expect.popleft()[1]
                    self._head()
                elif masker is not None:
                    replace = mask_message_fields(masker, t, body)
                if t == Backend.ERROR_RESPONSE:
                    fields_ = decode_fields(replace[5:] if replace else body)
                    message = f"{fields_.get('C', '')} {fields_.get('M', '')}"
                    rec = self._result_rec()
                    if rec is not None:
                        rec.error = message
                    if fields_.get("S") in ("FATAL", "PANIC"):
                        self.fatal = message
                    self.copy_in = False  # an error ends a COPY: the next Sync is answered
                    if skips:
                        self._skip_to_sync(message)
            elif t == Backend.COPY_IN_RESPONSE:
                if self.expect and self.expect[0][0] == "execute":
                    self._copy_in()
            elif t == Backend.COPY_OUT_RESPONSE:
                copying = decode_copy_response(body)
                self.copy_binary = copying.overall_format == 1
                if masker is not None:
                    self.abort = "binary COPY output cannot be masked" if self.copy_binary else self._copy_plan(
                        len(copying.column_formats))
                    if self.abort is not None:
                        if run >= 0:
                            out.append(buf[run:s])
                        return out, n, None
            elif t == Backend.COPY_DATA:
                if masker is not None:
                    copy_plan = self.copy_plan
                    if copy_plan is not None and not self.copy_header:
                        row = mask_copy_row(copy_plan, bytes(body), masker.apply_bytes)
                        if row is None:
                            return self._cannot_mask(out, run, buf, s, n, "a COPY row does not match its column list")
                        replace = mask_payload(masker, t, row, 0) or codec.frame(t, row)
                    else:
                        replace = mask_payload(masker, t, body, 0)
                    self.copy_header = False
                # (rows are counted from the CommandComplete: COPY n)
            elif t == Backend.NOTIFICATION_RESPONSE:
                if masker is not None:
                    replace = mask_payload(masker, t, body, 4)
            elif t == Backend.PARAMETER_STATUS:
                unsafe = unsafe_parameter(*decode_parameter_status(body), read_only=self.read_only)
                if unsafe is not None:  # the guard missed a change of how the server reads SQL
                    self.abort = unsafe
                    if run >= 0:
                        out.append(buf[run:s])
                    return out, n, None
            elif t in _SIMPLE_POPS:
                done = self._pop_to(_SIMPLE_POPS[t])
                if done is not None and t != Backend.BIND_COMPLETE:  # a Parse or Close replaced marked names
                    self._confirm(*done)
            elif t in (Backend.BACKEND_KEY_DATA, Backend.AUTHENTICATION):
                raise MalformedMessage("unexpected start-up message from the server")
            if replace is None and not drop:
                if run < 0:
                    run = s
            else:
                if run >= 0:
                    out.append(buf[run:s])
                    run = -1
                if replace is not None:
                    out.append(replace)
            if self.expect and self.expect[0][0] == "inject":
                if run >= 0:
                    out.append(buf[run:e])
                    run = -1
                self._due(out)
            i += 1
        if run >= 0:
            end = frames[-1][2]  # bytes after it are an incomplete message the framer keeps
            out.append(buf if run == 0 and end == len(buf) else buf[run:end])
        return out, n, None

    def _skips_to_sync(self) -> bool:
        """Whether an ErrorResponse now is that of an extended-protocol message (Parse, Bind,
        Describe, Execute, Close, or a stand-in Parse), after which the server ignores every
        message up to the next Sync; not that of a Query, of a Sync's commit, or a FATAL one."""
        if not self.expect:
            return False
        kind = self.expect[0][0]
        if kind == "refuse":  # a stand-in Query is followed by its own ReadyForQuery
            return len(self.expect) < 2 or self.expect[1] != QUERY_SYNC
        return kind not in ("query", "sync", "inject")

    def _skip_to_sync(self, message: str) -> None:
        """Pop what the server answers no more, as it skips to the next Sync: the failed
        message, the rest of its batch, and any Query pipelined in it."""
        while self.expect:
            k, v = self.expect[0]
            if k == "inject" or (k == "sync" and v is None):
                break
            self.expect.popleft()
            if k == "execute":
                v[1].error = v[1].error or message
                self._finish(v[1])
            elif k == "query":
                v.error = SKIPPED
                self._finish(v)
        # no Sync on its way: the server skips what the client sends next, up to its Sync
        self.skipping = _SYNC not in self.expect
        self._head()

    def _copy_in(self) -> None:
        """An extended-protocol Execute started COPY FROM STDIN: the server ignores every Sync
        until CopyDone or CopyFail (libpq sends one with the batch, before it knows it is a COPY),
        so the Syncs already queued behind the Execute are answered by nothing."""
        self.copy_in = True
        while len(self.expect) > 1 and self.expect[1] == _SYNC:
            del self.expect[1]

    def _cannot_mask(self, out: list[bytes], run: int, buf: bytes, s: int, n: int,
                     what: str = "a result row does not match its column description") -> tuple[list[bytes], int, None]:
        """End the session (fail closed): rows arrived that do not match any known description."""
        if run >= 0:
            out.append(buf[run:s])
        self.abort = f"hoop: {what}; it cannot be masked safely"
        return out, n, None

    def _copy_plan(self, columns: int) -> str | None:
        """At a CopyOutResponse: how to mask the rows of the COPY (:mod:`proxy.copyrows`), or why
        the session must end. The guard allowed the statement only as a query of its own
        when its column rules must be applied field by field."""
        self.copy_plan = None
        self.copy_header = False
        if self.guard is None or self.guard.launder is None:
            return None  # no column rule: detectors only
        rec = self._result_rec()
        if rec is None:
            return "hoop: a COPY's rows cannot be matched to their statement; they cannot be masked safely"
        plan = self.guard.copy_out(rec.sql)
        if plan is not None and len(plan.strategies) != columns:
            return "hoop: a COPY's columns do not match its column list; they cannot be masked safely"
        self.copy_plan = plan
        self.copy_header = plan is not None and plan.header
        return None

    def _count(self, buf: bytes, s: int, e: int, count: int, rec: Rec) -> None:
        rec.rows += count
        room = self.sample_rows - len(rec.sample)
        if room > 0:
            rec.sample.extend(run_sample(buf, s, e, room, self.plan))

    def _parameter_types(self, body: memoryview) -> None:
        """The server's types of a described statement's parameters: a review then shows binary values."""
        stmt = self.expect[0][1]
        if stmt is not None and stmt.review is not None:
            with contextlib.suppress(MalformedMessage):  # (passed on as it came: the client judges it)
                stmt.param_types = decode_parameter_description(body)

    def _row_description(self, shape: Shape) -> bool:
        """Attach a RowDescription to its statement/portal/result; True to keep it from the client."""
        kind: str = ""
        value: Any = None
        if self.expect:
            kind, value = self.expect[0]
        if kind == "describe_s":
            if value is not None:
                value.fields = shape
            self._pop_to("describe_s")
            return False
        if kind == "describe_p":
            portal, hidden = value
            if portal is not None:
                portal.plan = self._plan_for(shape)
                if hidden or portal.stmt.fields is None or not portal.stmt.fields.fields:
                    portal.stmt.fields = shape
            self._pop_to("describe_p")
            return bool(hidden)
        self.plan = self._plan_for(shape)
        rec = self.rec = self._result_rec()
        if rec is not None:
            rec.columns = shape.columns
        return False


#: what the server must keep reporting: pglast reads SQL exactly so, and hoop pins both at login
PINNED = {"client_encoding": "UTF8", "standard_conforming_strings": "on"}


def unsafe_parameter(name: str, value: str, *, read_only: bool = False) -> str | None:
    """Why the server's report ``name=value`` (ParameterStatus) ends the session, or None.

    On a ``read_only`` resource ``default_transaction_read_only`` must stay on too (servers from
    PostgreSQL 14 report it), whatever turned it off.
    """
    want = PINNED.get(name) or ("on" if read_only and name == "default_transaction_read_only" else None)
    if want is None or value == want:
        return None
    return f"the session's {name} is {value!r}: hoop only relays sessions with {name}={want}"
_I16 = struct.Struct("!h").unpack_from


def _resolver(catalog: Catalog, missing: list[int]) -> Suspend:
    async def lookup() -> None:
        await catalog.resolve(missing)

    return lookup

