"""What hoop decides about the statements a client sends, and how a refusal is carried out.

How this works. The inspector is a chain of classes: :class:`~proxy.pg.state.State`, the server
side :class:`~proxy.pg.replies.Replies`, then :class:`Verdicts`, then the client side
:class:`~proxy.pg.inspect.Inspector`, whose walk of the client's messages
(:meth:`~proxy.pg.inspect.Inspector.from_client`) asks these methods. :meth:`Verdicts._check`
gives a statement's masked text, kinds and the guard's decision, cached per text and per analysis
(a read-only resource turns any write into a block). A statement under review holds the client
side: :meth:`Verdicts._held_query` and :meth:`Verdicts._held_portal` say whether an execution must
be reviewed and with what text (the statement, then what the name it runs may hold), and
:meth:`Verdicts._hold` suspends the walk until the reviewer decides.

A refusal must also do to the session what a real error does: inside a transaction block
(``BEGIN ...``) or an extended-protocol batch, an error aborts the transaction, so that the
server answers 25P02 to what follows, turns ``COMMIT`` into ``ROLLBACK`` and honours
``ROLLBACK TO SAVEPOINT``. Rather than imitate that state machine, hoop sends the server a
*stand-in* for the refused message, a Query or Parse of :data:`STAND_IN` (a syntax error:
it fails in the parser, runs nothing, and reads nothing of the catalog), and puts its own
42501 refusal in place of the server's error (the ``refuse`` item of ``expect``). The server
then holds the real transaction state, savepoints included, and every ReadyForQuery after it
is the server's own. Only when the session is provably outside any transaction (the last
ReadyForQuery said ``I``, nothing is in flight and no batch is open) does hoop answer alone,
without a round trip.

On a read-only resource, hoop starts the upstream session with
``default_transaction_read_only=on`` and refuses every write; the guard itself refuses, from
the parse tree, whatever would switch the session back to writing (``READ WRITE``
transactions, SET or ``set_config`` of a ``*transaction_read_only`` setting, ``set_config`` of
a computed name).
"""

from __future__ import annotations

from proxy.guard import Decision
from proxy.pg import codec
from proxy.pg.names import Effect, label
from proxy.pg.replies import Replies
from proxy.pg.state import Mark, Portal, Stmt, Suspend
from proxy.sqlguard import READ_ONLY_RULE, Analysis, is_write

__all__ = ["STAND_IN", "Verdicts"]


#: what the server is sent in place of a refused statement: fails with a syntax error (42601)
STAND_IN = "hoop refused this statement"
_STAND_IN_QUERY = codec.encode_query(STAND_IN)
#: in place of a refused Execute: a named Parse that fails in the parser changes no statement
_STAND_IN_PARSE = codec.encode_parse("hoop_refused", STAND_IN)


def _read_only(decision: Decision) -> Decision:
    return Decision("block", READ_ONLY_RULE, "the resource is read-only", decision.subject)


def _refused(decision: Decision) -> Decision:
    # (as the SSH and HTTP proxies say it: the wait may have ended with no approver deciding in time)
    return Decision("block", decision.rule, "not approved: refused, or no approver decided within the review "
                                            "timeout", decision.subject)


def _shown(text: str, marks: tuple[Mark, ...] | list[Mark], name: str) -> str:
    """A review's text: the statement, then what the name it runs may hold (when that is not itself)."""
    seen = {text}
    for m in marks:
        if m.stmt.text not in seen:
            seen.add(m.stmt.text)
            text += f"\n-- {name} may run: {m.stmt.text}"
    return text


def _review(marks: tuple[Mark, ...] | list[Mark]) -> Decision:
    review = marks[0].stmt.review
    assert review is not None  # only statements needing review are marked
    return review


class Verdicts(Replies):
    """The guard's and the reviewers' verdicts on client statements, and refusals; see the module docstring."""

    def _check(self, sql: str) -> tuple[str, list[str], Decision | None]:
        hit = self._texts.get(sql)
        if hit is not None:
            return hit
        text = self.masker.mask_text(sql) if self.masker is not None else sql
        decision: Decision | None = None
        kinds: list[str] = []
        if self.guard is not None:
            kinds, decision = self._verdict(self.guard.analyse(sql))
        if len(self._texts) > 2048:
            self._texts.clear()
        self._texts[sql] = (text, kinds, decision)
        return text, kinds, decision

    def _verdict(self, analysis: Analysis) -> tuple[list[str], Decision]:
        """Kinds and decision of an analysis, worked out once per analysis (the guard caches
        analyses by statement shape, so texts differing only in literals share one)."""
        hit = self._verdicts.get(id(analysis))
        if hit is None or hit[0] is not analysis:
            decision = analysis.decision
            kinds: list[str] = sorted({k for st in analysis.statements for k in st.kinds})
            if self.read_only and not decision.blocked and is_write(analysis.statements):
                decision = _read_only(decision)
            if len(self._verdicts) > 1024:
                self._verdicts.clear()
            hit = self._verdicts[id(analysis)] = (analysis, kinds, decision)
        return hit[1], hit[2]

    def _refusal(self, decision: Decision) -> bytes:
        rule = decision.rule or "default"
        return codec.encode_error("42501", f'hoop: statement refused by rule "{rule}"',
                                  detail=decision.reason, hint="ask for review or a different grant")

    def _blocked(self, text: str, kinds: list[str], decision: Decision) -> None:
        self.stats["blocked"] += 1
        self.session.record("statement", {"sql": text, "kinds": kinds, "decision": "block",
                                          "rule": decision.rule, "ms": 0, "rows": 0, "error": "refused by hoop"})

    def _idle(self) -> bool:
        """Whether the session is surely outside any transaction: a refusal changes nothing there."""
        return self.status == "I" and not self.expect and not self.batch_sent

    def _stand_in(self, refusal: bytes) -> None:
        """Expect the server's error for a stand-in message; the client gets ``refusal`` instead."""
        self.expect.append(("refuse", refusal))

    def _hold(self, out: list[bytes], run: int, buf: bytes, s: int, i: int, frames: list[codec.Frame],
              stmt: Stmt, decision: Decision) -> tuple[list[bytes], int, Suspend]:
        if run >= 0:
            out.append(buf[run:s])
        key = frames[i]

        async def wait() -> None:
            allowed = await self.review(stmt, decision)
            # one execution is decided: the next one is asked again
            self.approved, self.refused = (key, None) if allowed else (None, key)

        return out, i, wait

    def _held_query(self, text: str, effect: Effect, decision: Decision | None) -> tuple[str, Decision] | None:
        """(review text, decision) when a Query must be reviewed: its own text is sent to review
        (unless it only PREPAREs), or it EXECUTEs a name that may hold such a statement."""
        if decision is not None and decision.blocked:
            return None
        if decision is not None and decision.needs_review and not effect.only_prepare:
            return text, decision
        return self._executes(text, effect)

    def _executes(self, text: str, effect: Effect) -> tuple[str, Decision] | None:
        """(review text, decision) when ``effect`` EXECUTEs a name that may hold a statement needing review."""
        if not self.marks or effect.executes == frozenset():
            return None
        runs = effect.executes if effect.executes is not None else [n for n in self.marks if n is not None]
        for name in runs:
            marks = self._marks_of(name)
            if marks:
                return _shown(text, marks, label(name)), _review(marks)
        anyname = self.marks.get(None)
        if effect.executes is None and anyname:  # a nested EXECUTE: its name is unknown
            return _shown(text, anyname, "a nested EXECUTE"), _review(anyname)
        return None

    def _held_portal(self, portal: Portal) -> tuple[str, Decision] | None:
        """(review text, decision) when executing ``portal`` must be reviewed: it was bound to a
        statement needing review, or its statement EXECUTEs one."""
        stmt = portal.stmt
        if portal.marks:
            own = stmt.review is not None and not stmt.effect.only_prepare
            review = stmt.review if own and stmt.review is not None else _review(portal.marks)
            return _shown(stmt.text, portal.marks, portal.name) + portal.params, review
        got = self._executes(stmt.text, stmt.effect)
        return None if got is None else (got[0] + portal.params, got[1])

    def _refuse_execute(self, stmt: Stmt, decision: Decision) -> bytes | None:
        """Refuse an Execute whose review was refused: the rest of its batch is not run (the
        server's own stand-in error aborts it, and the transaction, as a real error would)."""
        self._blocked(stmt.text, stmt.kinds, decision)
        self.discarding = True
        if self._idle():
            self._inject(self._refusal(decision))
            return None
        self._stand_in(self._refusal(decision))
        self.batch_sent = True
        return _STAND_IN_PARSE
