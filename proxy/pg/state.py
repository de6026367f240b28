"""Per-connection protocol state shared by both directions of :class:`~proxy.pg.inspect.Inspector`.

How this works. ``expect`` is the queue of what the server will answer, in order: every
forwarded Parse, Bind, Describe, Execute, Close, Sync and Query pushes an item that the
matching server reply pops (see :mod:`proxy.pg.inspect` for the client side and
:mod:`proxy.pg.replies` for the server side); ``inject`` items are answers hoop makes itself,
``refuse`` items hoop's refusal to put in place of the server's error for a stand-in.
``rec``/``plan`` point at the result being streamed, so a DataRow costs no lookup: they
are set whenever a result-bearing item becomes the head, by being popped to or by being
pushed onto an empty queue.

Descriptions go stale. Statements and portals share their namespaces with SQL ``PREPARE``,
``DEALLOCATE``, ``DECLARE`` and ``CLOSE`` (:mod:`proxy.pg.names` says which entries such a
text replaces: :meth:`State._forget`; a parsed statement's :attr:`Stmt.effect` is applied again
when a portal of it is executed, which is when the server applies it), and the server closes every portal when a
transaction ends (:meth:`State._ended`). So a portal's masking plan is trusted only in the
round trip (``round``: the Syncs and Queries sent so far) that bound or described it; an
Execute in a later one, or of a portal hoop never saw bound (a SQL cursor), is preceded by a
hidden Describe whose answer hoop keeps to itself.

Reviews are per execution. A statement the guard sends to review is parsed (and PREPAREd)
without asking, and every execution of it is held (:mod:`proxy.pg.inspect`). Which names may
run such a statement is kept in ``marks``, by name, from the moment its definition is sent
until the server confirms a later message replaced or dropped it (ParseComplete,
CloseComplete, a successful ``DEALLOCATE``): hoop's own view of a name is what the client
sent last, but a message the server skips (after an error in its batch) or refuses leaves the
earlier definition in place. Only a Bind in the same batch as the replacing message can trust
that message (if it failed, the server skips the Bind too).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from broker.config import PostgresResource
from proxy.copyrows import CopyOut
from proxy.guard import Decision
from proxy.mask import Masker
from proxy.pg import codec, names
from proxy.pg.messages import Field, decode_row_description
from proxy.pg.rows import Catalog, Plan, make_plan
from proxy.sqlguard import SqlGuard

Suspend = Callable[[], Awaitable[None]]
_perf = time.perf_counter


class Shape:
    """One distinct RowDescription (cached by its raw bytes) and its masking plans per result formats."""

    __slots__ = ("columns", "fields", "plans")

    def __init__(self, fields: tuple[Field, ...]) -> None:
        self.fields = fields
        self.columns = [f.name for f in fields]  # shared by the records of every result of this shape
        self.plans: dict[tuple[int, ...] | None, Plan | None] = {}


NO_SHAPE = Shape(())  # NoData
#: the ``expect`` item of the ReadyForQuery ending a stand-in Query: unlike a Sync's, it is not
#: sent when an earlier extended-protocol message failed (the server skips a Query until Sync)
QUERY_SYNC = ("sync", "query")
#: the error of a statement the server skipped because an earlier one of its batch failed
SKIPPED = "skipped: an earlier statement of the batch failed"
_NO_COLUMNS: list[str] = []  # never mutated: replaced by a shape's columns


@dataclass(slots=True)
class Stmt:
    sql: str
    text: str  # masked, for records and reviews
    kinds: list[str]
    fields: Shape | None = None  # None: not described yet
    dynamic: bool = False  # its result shape is decided when it runs (EXECUTE, FETCH): fields are not reused
    #: what running it does to the namespaces: applied at each Execute of a portal bound to it
    effect: names.Effect = names.NO_EFFECT
    review: Decision | None = None  # the guard sends it to review: each execution is held
    #: parameter type OIDs (Parse's, then the server's ParameterDescription): a review shows binary values
    param_types: tuple[int, ...] = ()


@dataclass(slots=True)
class Mark:
    """A definition needing review that the server may hold under a statement name."""

    stmt: Stmt
    seq: int


@dataclass(slots=True)
class Portal:
    stmt: Stmt
    formats: tuple[int, ...]
    plan: Plan | None = None
    described: bool = False
    round: int = -1  # the round trip (``State.round``) in which it was bound or described
    marks: tuple[Mark, ...] = ()  # the definitions needing review it may run (found at Bind)
    params: str = ""  # its parameters as a review shows them (only when it may need one)
    name: str = ""  # its statement's name as a review shows it (with ``marks``)
    approved: bool = False  # a reviewer allowed its execution: later Executes (cursor fetches) are part of it


class Rec:
    """One statement being executed, recorded when its result is complete (a plain class: one
    is made per statement, and a dataclass with default factories costs twice as much)."""

    __slots__ = ("columns", "command", "decision", "error", "kinds", "rows", "rule", "sample", "sql", "t0", "text",
                 "unmark")

    def __init__(self, text: str, kinds: list[str], decision: str, rule: str | None, sql: str) -> None:
        self.text = text
        self.sql = sql  # as sent (``text`` is masked): a COPY's rows are matched to their statement
        self.kinds = kinds
        self.decision = decision
        self.rule = rule
        self.t0 = _perf()
        self.rows = 0
        self.error: str | None = None
        self.command: str | None = None  # set when the server ended the transaction with ROLLBACK
        self.columns: list[str] = _NO_COLUMNS
        self.sample: list[list[str | None]] = []
        #: when it succeeds, marks it replaces or drops are gone: (names, None for all; last seq it replaces)
        self.unmark: tuple[frozenset[str] | None, int] | None = None



class State:
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
        #: the server skips every message up to the client's next Sync (an extended-protocol
        #: error came when no Sync was on its way): what the client sends until then is not run
        self.skipping = False
        #: an extended-protocol Execute is in COPY FROM STDIN: the server eats Syncs until CopyDone/CopyFail
        self.copy_in = False
        self.approved: object = None  # the frame a reviewer allowed (held by reference)
        self.refused: object = None  # the frame a reviewer refused, or whose review timed out
        #: statement name -> definitions needing review the server may hold (None: a name hoop
        #: could not read, a PREPARE nested in a DO block: it applies to every name)
        self.marks: dict[str | None, list[Mark]] = {}
        #: name -> (round, seq) of the last message sent that replaces or drops its definitions
        self._superseded: dict[str | None, tuple[int, int]] = {}
        self._seq = 0
        self.status = "I"  # of the last ReadyForQuery the server sent
        self.round = 0  # Syncs and Queries sent upstream: a round trip's portals are described in it
        self.plan: Plan | None = None  # of the result being streamed
        self.rec: Rec | None = None
        self.copy_binary = False
        self.copy_plan: CopyOut | None = None  # the COPY TO STDOUT being relayed, when masked field by field
        self.copy_header = False  # its next row is the header line
        self.fatal: str | None = None  # a FATAL error the server sent
        self.said_goodbye = False  # the client sent Terminate: the server closing next is the client's doing
        self.abort: str | None = None  # hoop must end the session (cannot mask safely)
        self._texts: dict[str, tuple[str, list[str], Decision | None]] = {}
        #: id(analysis) -> (analysis, kinds, decision)
        self._verdicts: dict[int, tuple[Any, list[str], Decision]] = {}
        self._shapes: dict[bytes, Shape] = {}  # raw RowDescription body -> its shape
        self._memo: dict[tuple[int, bytes], Any] = {}  # (type, raw body) -> decoded client message
        #: (Parse body or None, Describe body, Execute body) -> what proxy.pg.fast needs of them
        self._batches: dict[tuple[bytes | None, bytes, bytes], Any] = {}
        self._effects: dict[str, names.Effect] = {}  # SQL text -> what it does to the namespaces
        self._record = session.record

    def _inject(self, data: bytes | None) -> None:
        """Send ``data`` (None: a ReadyForQuery with the current status) in pipeline order."""
        if not self.expect:
            self.write_client(data if data is not None else codec.encode_ready_for_query(self.status))
        else:
            self.expect.append(("inject", data))

    def _shape(self, raw: bytes) -> Shape:
        """The :class:`Shape` of a raw RowDescription body, decoded once per distinct body."""
        shape = self._shapes.get(raw)
        if shape is None:
            shape = Shape(decode_row_description(raw))
            if len(self._shapes) < 1024:
                self._shapes[raw] = shape
        return shape

    def _plan_for(self, shape: Shape, formats: tuple[int, ...] | None = None) -> Plan | None:
        """The masking plan of a result shape (``formats`` None: each field's own format)."""
        if self.masker is None:
            return None
        try:
            return shape.plans[formats]
        except KeyError:
            pass
        fields = shape.fields
        catalog = self.catalog
        plan = make_plan(self.masker, fields, formats if formats is not None else tuple([f.format for f in fields]),
                         catalog.names if catalog is not None else {}, catalog.columns if catalog is not None else None,
                         catalog.parents if catalog is not None else None)
        if len(shape.plans) < 64:
            shape.plans[formats] = plan
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
            portal, rec = v
            self.rec = rec
            if portal is not None:
                self.plan = portal.plan
                if portal.stmt.fields is not None and rec.columns is _NO_COLUMNS:
                    rec.columns = portal.stmt.fields.columns
            else:
                self.plan = None
        elif k == "query":
            if self.rec is not v:
                self.rec, self.plan = v, None
        else:
            self.rec, self.plan = None, None

    def _due(self, out: list[bytes]) -> None:
        while self.expect and self.expect[0][0] == "inject":
            data = self.expect.popleft()[1]
            out.append(data if data is not None else codec.encode_ready_for_query(self.status))
        self._head()

    def _push_execute(self, portal: Portal, rec: Rec) -> None:
        """Expect the result of an Execute; it is streamed next when nothing else is awaited."""
        self.expect.append(("execute", (portal, rec)))
        if len(self.expect) == 1:
            self._head()

    def _effect(self, sql: str, kinds: list[str]) -> names.Effect:
        """What ``sql`` does to the namespaces (cached per text)."""
        if self.guard is not None and "other" not in kinds:  # every statement of names.TAGS is kind other
            return names.NO_EFFECT
        found = self._effects.get(sql)
        if found is None:
            tags = [st.tag for st in self.guard.analyse(sql).statements] if self.guard is not None else None
            found = names.effect(sql, tags)
            if len(self._effects) > 1024:
                self._effects.clear()
            self._effects[sql] = found
        return found

    # ---- marks: which statement names may run a statement needing review --------------------

    def _supersede(self, name: str | None) -> int | None:
        """A message replacing or dropping ``name`` (None: every name) is sent: returns the last
        seq it replaces, to confirm with :meth:`_confirm` once the server ran it; None when no
        mark is concerned."""
        if not self.marks or (name is not None and name not in self.marks):
            return None
        for key in (list(self.marks) if name is None else [name]):
            self._superseded[key] = (self.round, self._seq)
        return self._seq

    def _confirm(self, gone: frozenset[str] | None, seq: int) -> None:
        """The server ran a message that replaced or dropped ``gone`` (None: every name)."""
        for key in (list(self.marks) if gone is None else gone):
            kept = [m for m in self.marks.get(key, ()) if m.seq > seq]
            if kept:
                self.marks[key] = kept
            else:
                self.marks.pop(key, None)
                self._superseded.pop(key, None)

    def _mark(self, name: str | None, stmt: Stmt) -> None:
        self._seq += 1
        self.marks.setdefault(name, []).append(Mark(stmt, self._seq))

    def _marks_of(self, name: str) -> tuple[Mark, ...]:
        """The definitions needing review that running statement ``name`` now may run."""
        got = self.marks.get(name)
        sup = self._superseded.get(name)
        if got and sup is not None and sup[0] == self.round:  # replaced in this very batch: trust it
            got = [m for m in got if m.seq > sup[1]]
        anyname = self.marks.get(None)
        return (*(got or ()), *(anyname or ()))

    def _ran_prepares(self, effect: names.Effect, review: Decision | None, text: str, rec: Rec) -> None:
        """A text with ``effect`` is sent to run (a Query, or the Execute of a parsed statement):
        what it deallocates or replaces is gone once it succeeds, what it PREPAREs under review
        is marked now."""
        gone = effect.statements
        if self.marks and (gone is None or any(n in self.marks for n in gone)):
            seqs = [q for n in ((None,) if gone is None else gone) if (q := self._supersede(n)) is not None]
            if seqs:
                rec.unmark = (gone, max(seqs))
        if review is not None and effect.prepares != frozenset():
            marker = Stmt("", text, [], dynamic=True, review=review)
            for name in (None,) if effect.prepares is None else effect.prepares:
                self._mark(name, marker)

    def _forget(self, sql: str, kinds: list[str]) -> names.Effect:
        """Forget the statements and portals ``sql`` (a Query or a Parse about to go upstream)
        replaces or destroys, and return that effect (its ``dynamic``: its result shape is
        decided when it runs). For a Parse this is only a fail-safe: the server changes its
        namespaces when a portal of the statement is executed, which :meth:`_ran` follows."""
        found = self._effect(sql, kinds)
        if found is not names.NO_EFFECT:
            self._ran(found)
        return found

    def _ran(self, effect: names.Effect) -> None:
        """A statement with ``effect`` is run now (in client order, which is the server's order
        of execution): forget what it replaces or destroys, so that a later Bind or Execute of
        those names is described again."""
        for table, gone in ((self.statements, effect.statements), (self.portals, effect.portals)):
            if gone is None:
                table.clear()
            else:
                for name in gone:
                    table.pop(name, None)

    def _ended(self) -> None:
        """The server's transaction ended (ReadyForQuery ``I``): it closed every portal, except
        those bound by messages still awaiting their answer (sent after that point)."""
        if not self.portals:
            return
        if not self.expect:
            self.portals.clear()
            return
        live = {id(v) for k, v in self.expect if k == "bind"}
        for name in [name for name, p in self.portals.items() if id(p) not in live]:
            del self.portals[name]

    def _unknown(self, name: str, portal: bool = False) -> Stmt:
        """What hoop records for a statement (or portal) it did not see prepared (bound): SQL
        ``PREPARE`` or ``DECLARE``, a function's cursor, or one the server will say is missing."""
        text = f"FETCH FROM {names.label(name)}" if portal else f"EXECUTE {names.label(name)}"
        return Stmt("", self.masker.mask_text(text) if self.masker is not None else text, [], dynamic=True)

    def _finish(self, rec: Rec) -> None:
        ms = round((time.perf_counter() - rec.t0) * 1000, 3)
        self.stats["rows"] += rec.rows
        data: dict[str, Any] = {"sql": rec.text, "kinds": rec.kinds, "decision": rec.decision, "rule": rec.rule,
                                "ms": ms, "rows": rec.rows, "error": rec.error}
        if rec.command is not None:
            data["command"] = rec.command
        if rec.unmark is not None and rec.error is None:
            self._confirm(*rec.unmark)
        if rec.sample:
            data["rows_sample"] = {"columns": rec.columns, "rows": rec.sample}
        self._record("statement", data)

    def end_in_flight(self, reason: str) -> None:
        """Record the statements still awaiting their answer: hoop is ending the session
        (the server may have run them, and the audit trail must show what was sent)."""
        error = f"session ended by hoop: {reason}"
        while self.expect:
            k, v = self.expect.popleft()
            rec = v if k == "query" else v[1] if k == "execute" else None
            if rec is not None:
                rec.error = rec.error or error
                self._finish(rec)
        self.rec, self.plan = None, None

    def _result_rec(self) -> Rec | None:
        if not self.expect:
            return None
        k, v = self.expect[0]
        if k == "query":
            return v  # type: ignore[no-any-return]
        if k == "execute":
            return v[1]  # type: ignore[no-any-return]
        return None
