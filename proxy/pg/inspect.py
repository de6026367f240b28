"""What the relay does with the messages it looks at: guard, track, mask, record.

How this works. The client side (:meth:`Inspector.from_client`) and the server side
(:meth:`Inspector.from_server`) each get a buffer and its frames from a
:class:`~proxy.pg.codec.Framer` and return the bytes to send on, as slices of unchanged runs
joined once. They are linked by ``expect``, a queue of what the server will answer, in order:
every forwarded Parse, Bind, Describe, Execute, Close, Sync and Query pushes an item that the
matching server reply pops. That queue is how a DataRow is known to belong to portal ``p``
(whose RowDescription came from an earlier Describe, or from the statement's), and how
answers hoop makes itself (a refusal, its ReadyForQuery) are slotted in at the right place
of a pipeline: an ``inject`` item is sent when it reaches the head of the queue.

A statement the guard blocks never reaches the server: a Query gets ErrorResponse 42501 and
ReadyForQuery; a Parse gets ErrorResponse and the rest of its batch is discarded up to Sync,
as the server itself would. A statement under review stops the client side: the relay
pauses reading and resumes at that very message once the reviewer has decided.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from broker.config import PostgresResource
from proxy.guard import Decision
from proxy.mask import Masker
from proxy.pg import codec
from proxy.pg.messages import (
    Backend,
    Field,
    Frontend,
    MalformedMessage,
    decode_bind,
    decode_close,
    decode_command_complete,
    decode_copy_response,
    decode_describe,
    decode_execute,
    decode_fields,
    decode_parse,
    decode_query,
    decode_row_description,
)
from proxy.pg.rows import Catalog, Plan, formats_for, make_plan, mask_message_fields, mask_payload, mask_row, row_text
from proxy.sqlguard import SqlGuard, is_write

RAW = codec.RAW
_F_PASS = frozenset({RAW, Frontend.COPY_DATA, Frontend.COPY_DONE, Frontend.COPY_FAIL, Frontend.FLUSH,
                     Frontend.TERMINATE})
_B_PASS = frozenset({RAW, Backend.PARAMETER_STATUS, Backend.PARAMETER_DESCRIPTION, Backend.COPY_DONE,
                     Backend.COPY_IN_RESPONSE, Backend.COPY_BOTH_RESPONSE, Backend.NEGOTIATE_PROTOCOL_VERSION,
                     Backend.FUNCTION_CALL_RESPONSE})
_SIMPLE_POPS = {Backend.PARSE_COMPLETE: "parse", Backend.BIND_COMPLETE: "bind", Backend.CLOSE_COMPLETE: "close"}

Suspend = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class Stmt:
    sql: str
    text: str  # masked, for records and reviews
    kinds: list[str]
    fields: tuple[Field, ...] | None = None  # None: not described yet


@dataclass(slots=True)
class Portal:
    stmt: Stmt
    formats: tuple[int, ...]
    plan: Plan | None = None
    described: bool = False


@dataclass(slots=True)
class Rec:
    """One statement being executed, recorded when its result is complete."""

    text: str
    kinds: list[str]
    decision: str
    rule: str | None
    t0: float = field(default_factory=time.perf_counter)
    rows: int = 0
    error: str | None = None
    columns: list[str] = field(default_factory=list)
    sample: list[list[str | None]] = field(default_factory=list)


class Inspector:
    """Per-connection protocol state. ``write_client`` sends bytes hoop makes itself."""

    def __init__(self, resource: PostgresResource, guard: SqlGuard | None, masker: Masker | None,
                 catalog: Catalog | None, session: Any, write_client: Callable[[bytes], None],
                 review: Callable[[Stmt, Decision], Awaitable[bool]]) -> None:
        self.resource = resource
        self.guard = guard
        self.masker = masker if masker is not None and masker.enabled else None
        self.detect = self.masker is not None and bool(self.masker.config.detectors)
        self.catalog = catalog
        self.session = session
        self.stats: dict[str, int] = session.stats
        self.write_client = write_client
        self.review = review
        self.read_only = resource.guardrails.read_only
        self.sample_rows = self.masker.config.sample_rows if self.masker else resource.masking.sample_rows
        self.statements: dict[str, Stmt] = {}
        self.portals: dict[str, Portal] = {}
        self.expect: deque[tuple[str, Any]] = deque()
        self.discarding = False  # after a refused Parse, until Sync
        self.batch_sent = False  # something of the current extended batch reached the server
        self.approved: object = None  # the frame a reviewer allowed (held by reference)
        self.status = "I"
        self.plan: Plan | None = None  # of the result being streamed
        self.rec: Rec | None = None
        self.copy_binary = False
        self.fatal: str | None = None  # a FATAL error the server sent
        self.abort: str | None = None  # hoop must end the session (cannot mask safely)
        self._plans: dict[tuple[bytes, tuple[int, ...]], Plan] = {}
        self._texts: dict[str, tuple[str, list[str], Decision | None]] = {}

    # ---- client -> server ---------------------------------------------------------------

    def _check(self, sql: str) -> tuple[str, list[str], Decision | None]:
        hit = self._texts.get(sql)
        if hit is not None:
            return hit
        text = self.masker.mask_text(sql) if self.masker is not None else sql
        decision: Decision | None = None
        kinds: list[str] = []
        if self.guard is not None:
            analysis = self.guard.analyse(sql)
            decision = analysis.decision
            kinds = sorted({k for st in analysis.statements for k in st.kinds})
            if self.read_only and not decision.blocked and is_write(analysis.statements):
                decision = Decision("block", "read_only", "the resource is read-only", decision.subject)
        if len(self._texts) > 2048:
            self._texts.clear()
        self._texts[sql] = (text, kinds, decision)
        return text, kinds, decision

    def _refusal(self, decision: Decision) -> bytes:
        rule = decision.rule or "default"
        return codec.encode_error("42501", f'hoop: statement refused by rule "{rule}"',
                                  detail=decision.reason, hint="ask for review or a different grant")

    def _inject(self, data: bytes | None) -> None:
        """Send ``data`` (None: a ReadyForQuery with the current status) in pipeline order."""
        if not self.expect:
            self.write_client(data if data is not None else codec.encode_ready_for_query(self.status))
        else:
            self.expect.append(("inject", data))

    def _blocked(self, text: str, kinds: list[str], decision: Decision) -> None:
        self.stats["blocked"] += 1
        self.session.record("statement", {"sql": text, "kinds": kinds, "decision": "block",
                                          "rule": decision.rule, "ms": 0, "rows": 0, "error": "refused by hoop"})

    def from_client(self, buf: bytes, frames: list[codec.Frame], start: int) -> tuple[list[bytes], int, Suspend | None]:
        """Returns (parts to send upstream, index reached, a coroutine factory when suspended)."""
        out: list[bytes] = []
        run = -1
        mv = memoryview(buf)
        i = start
        n = len(frames)
        while i < n:
            t, s, e = frames[i]
            if self.discarding and t != Frontend.SYNC:
                if run >= 0:
                    out.append(buf[run:s])
                    run = -1
                i += 1
                continue
            if t in _F_PASS:
                if run < 0:
                    run = s
                i += 1
                continue
            body = mv[s + 5 : e]
            extra: bytes | None = None
            forward = True
            if t == Frontend.QUERY:
                sql = decode_query(body).sql
                text, kinds, decision = self._check(sql)
                if decision is not None and decision.needs_review and frames[i] is not self.approved:
                    return self._hold(out, run, buf, s, i, frames, Stmt(sql, text, kinds), decision)
                if decision is not None and (decision.blocked or (decision.needs_review
                                                                   and frames[i] is not self.approved)):
                    forward = False
                    self._blocked(text, kinds, decision)
                    self._inject(self._refusal(decision))
                    self._inject(None)
                else:
                    self.stats["statements"] += 1
                    self.expect.append(("query", Rec(text, kinds, decision.action if decision else "allow",
                                                     decision.rule if decision else None)))
            elif t == Frontend.PARSE:
                p = decode_parse(body)
                text, kinds, decision = self._check(p.sql)
                if decision is not None and decision.needs_review and frames[i] is not self.approved:
                    return self._hold(out, run, buf, s, i, frames, Stmt(p.sql, text, kinds), decision)
                if decision is not None and decision.blocked:
                    forward = False
                    self._blocked(text, kinds, decision)
                    self._inject(self._refusal(decision))
                    self.discarding = True
                else:
                    self.statements[p.statement] = Stmt(p.sql, text, kinds)
                    self.expect.append(("parse", None))
            elif t == Frontend.BIND:
                b = decode_bind(body)
                stmt = self.statements.get(b.statement)
                if stmt is None:
                    stmt = Stmt("", "", [])  # the server will refuse: unknown statement
                portal = Portal(stmt, tuple(b.result_formats))
                if stmt.fields is not None:
                    portal.plan = self._plan_for(stmt.fields, formats_for(len(stmt.fields), b.result_formats))
                    portal.described = True
                self.portals[b.portal] = portal
                self.expect.append(("bind", None))
            elif t == Frontend.DESCRIBE:
                d = decode_describe(body)
                if d.kind == "S":
                    self.expect.append(("describe_s", self.statements.get(d.name)))
                else:
                    described = self.portals.get(d.name)
                    if described is not None:
                        described.described = True
                    self.expect.append(("describe_p", (described, False)))
            elif t == Frontend.EXECUTE:
                ex = decode_execute(body)
                found = self.portals.get(ex.portal)
                if found is not None and not found.described and self.masker is not None:
                    # never described: ask for the columns ourselves, and keep the answer
                    found.described = True
                    extra = codec.encode_describe("P", ex.portal)
                    self.expect.append(("describe_p", (found, True)))
                stmt = found.stmt if found is not None else Stmt("", "", [])
                self.stats["statements"] += 1
                self.expect.append(("execute", (found, Rec(stmt.text, stmt.kinds, "allow", None))))
            elif t == Frontend.CLOSE:
                c = decode_close(body)
                (self.statements if c.kind == "S" else self.portals).pop(c.name, None)
                self.expect.append(("close", None))
            elif t == Frontend.SYNC:
                if self.discarding:
                    self.discarding = False
                    if not self.batch_sent:
                        forward = False
                        self._inject(None)
                if forward:
                    self.expect.append(("sync", None))
                self.batch_sent = False
            elif t == Frontend.FUNCTION_CALL:
                forward = False
                self._inject(codec.encode_error("42501", "hoop: the function-call protocol is not allowed"))
                self._inject(None)
            else:
                raise MalformedMessage(f"unexpected message type {chr(t)!r} from the client")
            if t in (Frontend.PARSE, Frontend.BIND, Frontend.DESCRIBE, Frontend.EXECUTE, Frontend.CLOSE) and forward:
                self.batch_sent = True
            if forward and extra is None:
                if run < 0:
                    run = s
            else:
                if run >= 0:
                    out.append(buf[run:s])
                    run = -1
                if extra is not None:
                    out.append(extra)
                    out.append(buf[s:e])
            i += 1
        if run >= 0:
            end = frames[-1][2]  # bytes after it are an incomplete message the framer keeps
            out.append(buf if run == 0 and end == len(buf) else buf[run:end])
        return out, n, None

    def _hold(self, out: list[bytes], run: int, buf: bytes, s: int, i: int, frames: list[codec.Frame],
              stmt: Stmt, decision: Decision) -> tuple[list[bytes], int, Suspend]:
        if run >= 0:
            out.append(buf[run:s])
        key = frames[i]

        async def wait() -> None:
            allowed = await self.review(stmt, decision)
            if allowed:
                self.approved = key
            else:
                # refused: decide again as a block
                self._texts[stmt.sql] = (stmt.text, stmt.kinds, Decision("block", decision.rule, "review refused",
                                                                          decision.subject))
                self.approved = None

        return out, i, wait

    # ---- server -> client ---------------------------------------------------------------

    def _plan_for(self, fields: tuple[Field, ...], formats: tuple[int, ...]) -> Plan | None:
        if self.masker is None:
            return None
        key = (str(fields).encode(), formats)
        plan = self._plans.get(key)
        if plan is None:
            tables = self.catalog.names if self.catalog is not None else {}
            plan = make_plan(self.masker, fields, formats, tables)
            if len(self._plans) < 4096:
                self._plans[key] = plan
        return plan

    def _pop_to(self, kind: str) -> Any:
        """Pop the head item (must be ``kind``); emit any injections that become due after it."""
        got = None
        while self.expect:
            k, v = self.expect[0]
            if k == "inject":
                break
            self.expect.popleft()
            if k == kind:
                got = v
                break
            if k == "execute":  # skipped after an error
                self._finish(v[1])
        self._head()
        return got

    def _head(self) -> None:
        """Point ``rec``/``plan`` at the result the server sends next."""
        if not self.expect:
            self.rec, self.plan = None, None
            return
        k, v = self.expect[0]
        if k == "execute":
            self.rec = v[1]
            self.plan = v[0].plan if v[0] is not None else None
        elif k == "query":
            if self.rec is not v:
                self.rec, self.plan = v, None
        else:
            self.rec, self.plan = None, None

    def _due(self, out: list[bytes]) -> None:
        while self.expect and self.expect[0][0] == "inject":
            data = self.expect.popleft()[1]
            out.append(data if data is not None else codec.encode_ready_for_query(self.status))

    def _finish(self, rec: Rec) -> None:
        ms = round((time.perf_counter() - rec.t0) * 1000, 3)
        self.stats["rows"] += rec.rows
        self.session.record("statement", {"sql": rec.text, "kinds": rec.kinds, "decision": rec.decision,
                                          "rule": rec.rule, "ms": ms, "rows": rec.rows, "error": rec.error})
        if rec.sample:
            self.session.record("rows", {"columns": rec.columns, "rows": rec.sample})

    def _result_rec(self) -> Rec | None:
        if not self.expect:
            return None
        k, v = self.expect[0]
        if k == "query":
            return v  # type: ignore[no-any-return]
        if k == "execute":
            return v[1]  # type: ignore[no-any-return]
        return None

    def from_server(self, buf: bytes, frames: list[codec.Frame], start: int) -> tuple[list[bytes], int, Suspend | None]:
        out: list[bytes] = []
        run = -1
        mv = memoryview(buf)
        masker = self.masker
        i = start
        n = len(frames)
        while i < n:
            t, s, e = frames[i]
            if t == Backend.DATA_ROW:
                if masker is None:
                    if run < 0:
                        run = s
                    rec = self.rec
                    if rec is not None:
                        rec.rows += 1
                        if len(rec.sample) < self.sample_rows:
                            rec.sample.append(row_text(mv[s + 5 : e], self.plan))
                    i += 1
                    continue
                j = i
                plan = self.plan
                if plan is None or not plan.masked:
                    # a run of rows with no masked column: one prefilter over all of it
                    while j < n and frames[j][0] == Backend.DATA_ROW:
                        j += 1
                    stop = frames[j - 1][2]
                    if not self.detect or not masker.might_contain(mv[s:stop]):
                        if run < 0:
                            run = s
                        self._count(mv, frames, i, j)
                        i = j
                        continue
                if run >= 0:
                    out.append(buf[run:s])
                    run = -1
                new = mask_row(masker, plan or _EMPTY, mv[s + 5 : e], self.detect)
                row = new if new is not None else buf[s:e]
                out.append(row)
                rec = self.rec
                if rec is not None:
                    rec.rows += 1
                    if len(rec.sample) < self.sample_rows:
                        rec.sample.append(row_text(memoryview(row)[5:], plan))
                i += 1
                continue
            if t in _B_PASS:
                if run < 0:
                    run = s
                i += 1
                continue
            body = mv[s + 5 : e]
            replace: bytes | None = None
            drop = False
            if t == Backend.ROW_DESCRIPTION:
                fields = decode_row_description(body)
                if masker is not None and self.catalog is not None:
                    missing = self.catalog.missing(fields)
                    if missing:
                        if run >= 0:
                            out.append(buf[run:s])
                        return out, i, _resolver(self.catalog, missing)
                drop = self._row_description(fields)
            elif t == Backend.NO_DATA:
                head: tuple[str, Any] = self.expect[0] if self.expect else ("", None)
                if head[0] == "describe_s" and head[1] is not None:
                    head[1].fields = ()
                elif head[0] == "describe_p":
                    drop = head[1][1]
                if head[0] in ("describe_s", "describe_p"):
                    self._pop_to(head[0])
            elif t in (Backend.COMMAND_COMPLETE, Backend.EMPTY_QUERY_RESPONSE, Backend.PORTAL_SUSPENDED):
                rec = self._result_rec()
                if rec is not None and t == Backend.COMMAND_COMPLETE:
                    cc = decode_command_complete(body)
                    if cc.rows is not None and cc.command != "SELECT":
                        rec.rows += cc.rows
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
            elif t in (Backend.ERROR_RESPONSE, Backend.NOTICE_RESPONSE):
                if masker is not None:
                    replace = mask_message_fields(masker, t, body)
                if t == Backend.ERROR_RESPONSE:
                    fields_ = decode_fields(replace[5:] if replace else body)
                    message = f"{fields_.get('C', '')} {fields_.get('M', '')}"
                    rec = self._result_rec()
                    if rec is not None:
                        rec.error = message
                    if fields_.get("S") in ("FATAL", "PANIC"):
                        self.fatal = message
                    # the server skips to Sync: everything queued before it is answered
                    if self.expect and self.expect[0][0] != "query":
                        while self.expect and self.expect[0][0] not in ("sync", "inject", "query"):
                            k, v = self.expect.popleft()
                            if k == "execute":
                                v[1].error = v[1].error or message
                                self._finish(v[1])
                        self._head()
            elif t == Backend.COPY_OUT_RESPONSE:
                self.copy_binary = decode_copy_response(body).overall_format == 1
                if self.copy_binary and masker is not None:
                    self.abort = "binary COPY output cannot be masked"
                    if run >= 0:
                        out.append(buf[run:s])
                    return out, n, None
            elif t == Backend.COPY_DATA:
                if masker is not None:
                    replace = mask_payload(masker, t, body, 0)
                rec = self._result_rec()
                if rec is not None:
                    rec.rows += 1
            elif t == Backend.NOTIFICATION_RESPONSE:
                if masker is not None:
                    replace = mask_payload(masker, t, body, 4)
            elif t in _SIMPLE_POPS:
                self._pop_to(_SIMPLE_POPS[t])
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

    def _count(self, mv: memoryview, frames: list[codec.Frame], i: int, j: int) -> None:
        rec = self.rec
        if rec is None:
            return
        rec.rows += j - i
        k = i
        while len(rec.sample) < self.sample_rows and k < j:
            _, s, e = frames[k]
            rec.sample.append(row_text(mv[s + 5 : e], self.plan))
            k += 1

    def _row_description(self, fields: tuple[Field, ...]) -> bool:
        """Attach a RowDescription to its statement/portal/result; True to keep it from the client."""
        kind: str = ""
        value: Any = None
        if self.expect:
            kind, value = self.expect[0]
        drop = False
        if kind == "describe_s":
            if value is not None:
                value.fields = fields
            self._pop_to("describe_s")
            return False
        if kind == "describe_p":
            portal, hidden = value
            if portal is not None:
                portal.plan = self._plan_for(fields, tuple(f.format for f in fields))
                if hidden or not portal.stmt.fields:
                    portal.stmt.fields = fields
            self._pop_to("describe_p")
            return bool(hidden)
        self.plan = self._plan_for(fields, tuple(f.format for f in fields))
        rec = self.rec = self._result_rec()
        if rec is not None:
            rec.columns = [f.name for f in fields]
        return drop


_EMPTY = Plan((), (), (), (), False)


def _resolver(catalog: Catalog, missing: list[int]) -> Suspend:
    async def lookup() -> None:
        await catalog.resolve(missing)

    return lookup
