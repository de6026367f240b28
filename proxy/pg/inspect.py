"""What the relay does with the messages it looks at: guard, track, mask, record.

How this works. The client side (:meth:`Inspector.from_client`, here) and the server side
(:meth:`~proxy.pg.replies.Replies.from_server`) each get a buffer and its frames from a
:class:`~proxy.pg.framer.Framer` and return the bytes to send on, as slices of unchanged runs
joined once. They are linked by ``expect`` (:mod:`proxy.pg.state`), a queue of what the
server will answer, in order: every forwarded Parse, Bind, Describe, Execute, Close, Sync and
Query pushes an item that the matching server reply pops. That queue is how a DataRow is
known to belong to portal ``p`` (whose RowDescription came from a Describe in the same round
trip, or from the statement's; otherwise hoop sends a Describe of its own, see
:mod:`proxy.pg.state`), and how answers hoop makes itself (a refusal, its ReadyForQuery) are
slotted in at the right place of a pipeline: an ``inject`` item is sent when it reaches the
head of the queue.

A statement the guard blocks never reaches the server: a Query gets ErrorResponse 42501 and
ReadyForQuery; a Parse gets ErrorResponse and the rest of its batch is discarded up to Sync,
as the server itself would. A statement under review stops the client side at each
execution: the relay pauses reading and resumes at that very message once the reviewer has
decided. A review decides one execution: a Query, or one Execute of a portal (the Executes
that fetch more of an allowed portal are part of it); a Parse or ``PREPARE`` of such a
statement runs nothing and passes unasked, and each Bind of it is reviewed with its
parameters (:mod:`proxy.pg.review`), as is each SQL ``EXECUTE`` of a name that may hold it
(:meth:`~proxy.pg.state.State._marks_of`). A refused execution is refused like a blocked
statement; the next one is asked again. What is decided, and how a refusal is carried out (a
*stand-in* the server fails, so that it keeps the real transaction state), is in
:mod:`proxy.pg.verdicts`, whose :class:`~proxy.pg.verdicts.Verdicts` this class extends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from proxy.pg import codec
from proxy.pg.messages import (
    Buf,
    Frontend,
    MalformedMessage,
    decode_bind,
    decode_bind_head,
    decode_close,
    decode_describe,
    decode_execute,
    decode_parse,
    decode_query,
)
from proxy.pg.names import NO_EFFECT, label
from proxy.pg.review import parameters
from proxy.pg.rows import formats_for
from proxy.pg.state import QUERY_SYNC, SKIPPED, Portal, Rec, Stmt, Suspend
from proxy.pg.verdicts import _STAND_IN_QUERY, STAND_IN, Verdicts, _refused

__all__ = ["STAND_IN", "Inspector", "Portal", "Rec", "Stmt", "Suspend"]

_M = TypeVar("_M")
RAW = codec.RAW
_F_PASS = frozenset({RAW, Frontend.COPY_DATA, Frontend.FLUSH, Frontend.TERMINATE})
#: what the server ignores while it skips to Sync (hoop then drops it: see Inspector._skipped)
_F_SKIPPED = frozenset({Frontend.QUERY, Frontend.PARSE, Frontend.BIND, Frontend.DESCRIBE, Frontend.EXECUTE,
                        Frontend.CLOSE, Frontend.FUNCTION_CALL, Frontend.COPY_DONE, Frontend.COPY_FAIL})


class Inspector(Verdicts):
    """Per-connection protocol state and the client -> server half; see the module docstring."""

    # ---- client -> server ---------------------------------------------------------------

    def _decoded(self, t: int, body: memoryview, decode: Callable[[Buf], _M]) -> _M:
        """``decode(body)``, memoised by the raw body: drivers resend the same Parse, Describe,
        Execute and Close bytes for every statement (decoders are pure; errors are not kept)."""
        key = (t, body.tobytes())
        hit = self._memo.get(key)
        if hit is None:
            hit = decode(body)
            if len(self._memo) > 1024:
                self._memo.clear()
            self._memo[key] = hit
        return hit

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
                if t == Frontend.TERMINATE:
                    self.said_goodbye = True
                i += 1
                continue
            body = mv[s + 5 : e]
            if self.skipping and t in _F_SKIPPED:
                if run >= 0:
                    out.append(buf[run:s])
                    run = -1
                self._skipped(t, body)
                i += 1
                continue
            extra: bytes | None = None
            forward = True
            if t == Frontend.QUERY:
                sql = decode_query(body).sql
                text, kinds, decision = self._check(sql)
                effect = self._effect(sql, kinds) if kinds else NO_EFFECT
                own = decision if decision is not None and decision.needs_review else None
                held = self._held_query(text, effect, decision)
                if held is not None:
                    if frames[i] is self.refused:
                        decision = _refused(held[1])
                    elif frames[i] is not self.approved:
                        return self._hold(out, run, buf, s, i, frames, Stmt(sql, held[0], kinds), held[1])
                    else:
                        decision = held[1]
                elif own is not None:  # nothing but PREPAREs: each EXECUTE is reviewed
                    decision = None
                if decision is not None and decision.blocked:
                    forward = False
                    self._blocked(text, kinds, decision)
                    if self._idle():
                        self._inject(self._refusal(decision))
                        self._inject(None)
                    else:
                        extra = _STAND_IN_QUERY
                        self._stand_in(self._refusal(decision))
                        self.expect.append(QUERY_SYNC)
                        self.round += 1
                else:
                    self.stats["statements"] += 1
                    self._forget(sql, kinds)
                    rec = Rec(text, kinds, decision.action if decision else "allow",
                              decision.rule if decision else None, sql)
                    if effect is not NO_EFFECT:
                        self._ran_prepares(effect, own, text, rec)
                    self.expect.append(("query", rec))
                    self.round += 1
            elif t == Frontend.PARSE:
                p = self._decoded(t, body, decode_parse)
                text, kinds, decision = self._check(p.sql)
                if decision is not None and decision.blocked:
                    forward = False
                    self._blocked(text, kinds, decision)
                    if self._idle():
                        self._inject(self._refusal(decision))
                    else:  # the server fails the batch (and the transaction) as it would for a real error
                        extra = codec.encode_parse(p.statement, STAND_IN)
                        self._stand_in(self._refusal(decision))
                        self.batch_sent = True
                        if not p.statement:
                            self.statements.pop("", None)  # the server drops it before parsing
                    self.discarding = True
                else:
                    effect = self._forget(p.sql, kinds)
                    review = decision if decision is not None and decision.needs_review else None
                    stmt = self.statements[p.statement] = Stmt(p.sql, text, kinds, dynamic=effect.dynamic,
                                                               effect=effect, review=review, param_types=p.param_oids)
                    seq = self._supersede(p.statement)
                    if review is not None and not effect.only_prepare:
                        self._mark(p.statement, stmt)
                    self.expect.append(("parse", None if seq is None else (frozenset((p.statement,)), seq)))
            elif t == Frontend.BIND:
                portal_name, statement, result_formats = decode_bind_head(body)
                known = self.statements.get(statement)
                stmt = known if known is not None else self._unknown(statement)  # SQL PREPARE, or missing
                portal = Portal(stmt, result_formats, round=self.round)
                if self.marks:
                    portal.marks = self._marks_of(statement)
                    portal.name = label(statement)
                    b = decode_bind(body)
                    portal.params = parameters(self.masker, b.param_formats, b.params, stmt.param_types)
                if stmt.fields is not None and not stmt.dynamic:
                    portal.plan = self._plan_for(stmt.fields, formats_for(len(stmt.fields.fields), result_formats))
                    portal.described = True
                self.portals[portal_name] = portal
                self.expect.append(("bind", portal))
            elif t == Frontend.DESCRIBE:
                d = self._decoded(t, body, decode_describe)
                if d.kind == "S":
                    self.expect.append(("describe_s", self.statements.get(d.name)))
                else:
                    described = self.portals.get(d.name)
                    if described is None:  # a SQL cursor, or one the server will say is missing
                        described = self.portals[d.name] = Portal(self._unknown(d.name, portal=True), ())
                    described.described = True
                    described.round = self.round
                    self.expect.append(("describe_p", (described, False)))
            elif t == Frontend.EXECUTE:
                ex = self._decoded(t, body, decode_execute)
                found = self.portals.get(ex.portal)
                if found is None:  # a SQL cursor, or one the server will say is missing
                    found = self.portals[ex.portal] = Portal(self._unknown(ex.portal, portal=True), ())
                stmt = found.stmt
                rec = Rec(stmt.text, stmt.kinds, "allow", None, stmt.sql)
                held = self._held_portal(found) if (found.marks or self.marks) and not found.approved else None
                if held is not None:
                    if frames[i] is self.refused:
                        forward = False
                        extra = self._refuse_execute(stmt, _refused(held[1]))
                    elif frames[i] is not self.approved:
                        return self._hold(out, run, buf, s, i, frames, Stmt(stmt.sql, held[0], stmt.kinds), held[1])
                    else:
                        found.approved = True
                        rec.decision, rec.rule = "review", held[1].rule
                if forward and self.masker is not None and (not found.described or found.round != self.round):
                    # not described in this round trip (a cursor fetch, a SQL cursor): ask for
                    # the columns ourselves, and keep the answer
                    found.described = True
                    found.round = self.round
                    extra = codec.encode_describe("P", ex.portal)
                    self.expect.append(("describe_p", (found, True)))
                if forward:
                    self.stats["statements"] += 1
                    if stmt.effect is not NO_EFFECT:
                        self._ran(stmt.effect)
                        self._ran_prepares(stmt.effect, stmt.review, stmt.text, rec)
                    self._push_execute(found, rec)
            elif t == Frontend.CLOSE:
                c = self._decoded(t, body, decode_close)
                (self.statements if c.kind == "S" else self.portals).pop(c.name, None)
                seq = self._supersede(c.name) if c.kind == "S" else None
                self.expect.append(("close", None if seq is None else (frozenset((c.name,)), seq)))
            elif t in (Frontend.COPY_DONE, Frontend.COPY_FAIL):
                self.copy_in = False
            elif t == Frontend.SYNC:
                self.skipping = False
                if self.copy_in:  # eaten by the COPY: answered by nothing
                    if run < 0:
                        run = s
                    i += 1
                    continue
                if self.discarding:
                    self.discarding = False
                    if not self.batch_sent:
                        forward = False
                        self._inject(None)
                if forward:
                    self.expect.append(("sync", None))
                    self.round += 1
                self.batch_sent = False
            elif t == Frontend.FUNCTION_CALL:
                forward = False
                refusal = codec.encode_error("42501", "hoop: the function-call protocol is not allowed")
                if self._idle():
                    self._inject(refusal)
                    self._inject(None)
                else:
                    extra = _STAND_IN_QUERY
                    self._stand_in(refusal)
                    self.expect.append(QUERY_SYNC)
                    self.round += 1
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
                if extra is not None:  # sent before the message, or in its place
                    out.append(extra)
                    if forward:
                        out.append(buf[s:e])
            i += 1
        if run >= 0:
            end = frames[-1][2]  # bytes after it are an incomplete message the framer keeps
            out.append(buf if run == 0 and end == len(buf) else buf[run:end])
        return out, n, None

    def _skipped(self, t: int, body: memoryview) -> None:
        """A message the server ignores, as it skips to the client's next Sync: it is not sent
        (nothing of it runs, nothing of hoop's state changes); a Query or Execute is recorded
        as skipped."""
        if t == Frontend.QUERY:
            sql = decode_query(body).sql
            text, kinds, decision = self._check(sql)
            rec = Rec(text, kinds, decision.action if decision else "allow", decision.rule if decision else None, sql)
        elif t == Frontend.EXECUTE:
            name = self._decoded(t, body, decode_execute).portal
            found = self.portals.get(name)
            stmt = found.stmt if found is not None else self._unknown(name, portal=True)
            rec = Rec(stmt.text, stmt.kinds, "allow", None, stmt.sql)
        else:
            return
        self.stats["statements"] += 1
        rec.error = SKIPPED
        self._finish(rec)
