"""Fast paths of the relay for the common round trip: one statement in, its whole answer out.

How this works. Most chunks a busy client and server exchange are one statement and its
complete answer: a Query, or a Parse/Bind/Describe/Execute/Sync batch, and ``[ParseComplete]
[BindComplete] RowDescription DataRow* CommandComplete ReadyForQuery``. For such a chunk the
general walk of :class:`~proxy.pg.inspect.Inspector` (a frame tuple, a dispatch and a few
attribute lookups per message) costs more than the work itself. :func:`fast_request` and
:func:`fast_reply` recognise these chunks with one C call each (:func:`batch`,
:func:`reply_stretch`; a Query needs none), check that the protocol state is exactly the one
the chunk completes, and then apply the same state changes the general path would, in one
go; what repeats from one statement to the next (the Parse, Describe and Execute bytes, the
RowDescription, the statement text) is decoded once and looked up after. The chunk is
forwarded whole, in one write.

They never decide anything the general path would not: the guard still sees every
statement through ``Inspector._check`` (its cache holds a decision per identical statement
text, and the guard's own cache per provably decision-preserving shape); anything other
than a plain allow (a statement the guard sends to review is held at each execution, so a
batch binding a name that may hold one, or one that may EXECUTE or replace such a name, is
left to the general path), anything that must be masked or looked at more closely (a masked column,
a detector prefilter hit, an unknown table, a refusal to slot in, a hidden Describe), and
any chunk or state that is not exactly the expected one returns False *before* changing
anything, and the general path handles the chunk as before. Every statement is still
recorded by ``_finish``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.pg import codec
from proxy.pg.messages import (
    ENCODING,
    ERRORS,
    I32,
    MalformedMessage,
    Parse,
    decode_bind_head,
    decode_command_complete,
    decode_describe,
    decode_execute,
    decode_parse,
)
from proxy.pg.names import NO_EFFECT
from proxy.pg.rows import formats_for
from proxy.pg.runs import run_might_contain, run_sample
from proxy.pg.state import Portal, Rec, State, Stmt

if TYPE_CHECKING:
    from proxy.pg.inspect import Inspector

try:
    from proxy.pg import _wire
except ImportError:  # not built: the pure-Python twin runs
    _wire = None  # type: ignore[assignment]

_MAX = codec.SERVER_MAX_MESSAGE
_I32 = I32.unpack_from
#: the ``expect`` kinds an extended-protocol answer completes, by its ``pre`` bits
_EXTENDED = {3: ("parse", "bind", "describe_p", "execute", "sync"), 2: ("bind", "describe_p", "execute", "sync")}

Stretch = tuple[int, int, int, int, int, int, int, int, int]


def reply_stretch(buf: bytes, max_length: int = _MAX) -> Stretch | None:
    """Whether ``buf`` is exactly one statement's whole answer (see :func:`py_reply_stretch`);
    C when built."""
    if _wire is not None:
        return _wire.reply_stretch(buf, max_length)
    return py_reply_stretch(buf, max_length)


def _msg_at(buf: bytes, pos: int, end: int, max_length: int, t: int) -> int:
    """The end of the message of type ``t`` at ``pos`` when it is whole and well-sized, else -1."""
    if end - pos < 5 or buf[pos] != t:
        return -1
    length: int = _I32(buf, pos + 1)[0]
    if length < 4 or length > max_length or length > end - pos - 1:
        return -1
    return pos + 1 + length


def py_reply_stretch(buf: bytes, max_length: int = _MAX) -> Stretch | None:
    """``(pre, ts, te, ds, de, rows, cs, ce, status)`` when ``buf`` is exactly ParseComplete?
    BindComplete? (RowDescription DataRow*)? CommandComplete ReadyForQuery, else None.

    ``pre`` has bit 1 for ParseComplete and bit 2 for BindComplete; ``ts:te`` is the
    RowDescription (-1, -1 when absent), ``ds:de`` the run of ``rows`` DataRows, ``cs:ce`` the
    CommandComplete and ``status`` the ReadyForQuery byte. A bad length gives None too: the
    general path then reports it.
    """
    end = len(buf)
    pos = pre = rows = 0
    ts = te = -1
    for kind, bit in ((0x31, 1), (0x32, 2)):  # ParseComplete, BindComplete: empty, each at most once
        stop = _msg_at(buf, pos, end, max_length, kind)
        if stop >= 0:
            if stop != pos + 5:
                return None
            pre |= bit
            pos = stop
    stop = _msg_at(buf, pos, end, max_length, 0x54)
    if stop >= 0:
        ts, te = pos, stop
        pos = stop
    ds = pos
    while ts >= 0:
        stop = _msg_at(buf, pos, end, max_length, 0x44)
        if stop < 0:
            break
        rows += 1
        pos = stop
    de = pos
    stop = _msg_at(buf, pos, end, max_length, 0x43)
    if stop < 0 or stop - pos < 6:
        return None
    cs, ce = pos, stop
    pos = stop
    stop = _msg_at(buf, pos, end, max_length, 0x5A)
    if stop != pos + 6 or stop != end:
        return None
    return pre, ts, te, ds, de, rows, cs, ce, buf[pos + 5]


def fast_request(insp: Inspector, buf: bytes) -> bool:
    """Handle ``buf`` when it is exactly one simple-protocol Query the guard allows, or one
    extended-protocol statement (:func:`fast_batch`): True when done (forward ``buf`` whole),
    False to leave it, untouched, to the general path."""
    if buf[:1] != b"Q":
        return buf[:1] in (b"P", b"B") and fast_batch(insp, buf)
    if insp.discarding or insp.skipping or insp.copy_in or len(buf) < 6 or buf[-1] != 0:
        return False
    if _I32(buf, 1)[0] != len(buf) - 1 or buf.find(b"\0", 5) != len(buf) - 1:
        return False
    sql = buf[5:-1].decode(ENCODING, ERRORS)
    text, kinds, decision = insp._check(sql)
    if decision is None:
        action, rule = "allow", None
    elif decision.blocked or decision.needs_review:
        return False
    else:
        action, rule = decision.action, decision.rule
    if insp.marks and "other" in kinds:  # it may EXECUTE, DEALLOCATE or PREPARE a statement under review
        return False
    insp.stats["statements"] += 1
    insp._forget(sql, kinds)
    insp.expect.append(("query", Rec(text, kinds, action, rule, sql)))
    insp.round += 1
    return True


Batch = tuple[tuple[bytes | None, bytes, bytes], str, str, tuple[int, ...]]


def batch(buf: bytes, max_length: int = codec.CLIENT_MAX_MESSAGE) -> Batch | None:
    """Whether ``buf`` is exactly one extended-protocol statement (see :func:`py_batch`); C when built."""
    if _wire is not None:
        return _wire.batch(buf, max_length)
    return py_batch(buf, max_length)


def py_batch(buf: bytes, max_length: int = codec.CLIENT_MAX_MESSAGE) -> Batch | None:
    """``(key, portal, statement, result_formats)`` when ``buf`` is exactly [Parse] Bind Describe
    Execute Sync, each whole and well-sized, with a Bind that :func:`decode_bind_head` accepts;
    else None. ``key`` is (Parse body or None, Describe body, Execute body): what repeats from
    one statement to the next, so the decoded messages are memoised by it."""
    end = len(buf)
    pos = 0
    spans = []
    for t in (0x50, 0x42, 0x44, 0x45, 0x53):
        stop = _msg_at(buf, pos, end, max_length, t)
        if stop < 0:
            if t == 0x50:
                spans.append((-1, -1))
                continue
            return None
        spans.append((pos, stop))
        pos = stop
    (ps, pe), (bs, be), (ds, de), (es, ee), (ss, se) = spans
    if se != ss + 5 or se != end:
        return None
    try:
        portal, statement, formats = decode_bind_head(buf[bs + 5 : be])
    except MalformedMessage:
        return None
    key = (buf[ps + 5 : pe] if ps >= 0 else None, buf[ds + 5 : de], buf[es + 5 : ee])
    return key, portal, statement, formats


def _batch_parts(insp: Inspector, key: tuple[bytes | None, bytes, bytes]) -> tuple[Parse | None, str, str] | None:
    """The Parse, the Describe's portal and the Execute's portal of a batch, decoded once per
    ``key`` (decoders are pure); None when the batch is not one the fast path takes."""
    memo = insp._batches
    hit = memo.get(key, _MISSING)
    if hit is _MISSING:
        try:
            p = decode_parse(key[0]) if key[0] is not None else None
            d = decode_describe(key[1])
            ex = decode_execute(key[2])
        except MalformedMessage:
            return None  # not memoised: the general path reports it
        hit = (p, d.name, ex.portal) if d.kind == "P" and ex.max_rows == 0 else None
        if len(memo) > 1024:
            memo.clear()
        memo[key] = hit
    return hit  # type: ignore[no-any-return]


_MISSING = object()
_SYNC = ("sync", None)


def fast_batch(insp: Inspector, buf: bytes) -> bool:
    """Handle ``buf`` when it is exactly one extended-protocol statement: [Parse] Bind
    Describe(portal) Execute Sync of one portal, with a Parse the guard allows. True when done
    (forward ``buf`` whole), False to leave it, untouched, to the general path."""
    if insp.discarding or insp.skipping or insp.copy_in:
        return False
    got = batch(buf)
    if got is None:
        return False
    key, portal_name, statement, result_formats = got
    parts = _batch_parts(insp, key)
    if parts is None:
        return False
    p, described, executed = parts
    if described != portal_name or executed != portal_name:
        return False
    if p is not None:
        if p.statement != statement:
            return False
        text, kinds, decision = insp._check(p.sql)
        if decision is not None and (decision.blocked or decision.needs_review):
            return False
        if insp.marks and (statement in insp.marks or "other" in kinds):  # see inspect: marks
            return False
        effect = insp._forget(p.sql, kinds)
        stmt = insp.statements[statement] = Stmt(p.sql, text, kinds, dynamic=effect.dynamic, effect=effect)
        insp.expect.append(("parse", None))
    else:
        found = insp.statements.get(statement)
        stmt = found if found is not None else insp._unknown(statement)
        if insp.marks and (statement in insp.marks or None in insp.marks or "other" in stmt.kinds):
            return False  # each execution of a statement under review is held (see inspect: marks)
    portal = Portal(stmt, result_formats, round=insp.round)
    if stmt.fields is not None and not stmt.dynamic:
        portal.plan = insp._plan_for(stmt.fields, formats_for(len(stmt.fields.fields), result_formats))
    portal.described = True  # by the Describe of this batch
    insp.portals[portal_name] = portal
    if stmt.effect is not NO_EFFECT:  # the Execute runs it: as Inspector.from_client does
        insp._ran(stmt.effect)
    insp.stats["statements"] += 1
    insp.expect.extend((("bind", portal), ("describe_p", (portal, False)),
                        ("execute", (portal, Rec(stmt.text, stmt.kinds, "allow", None, stmt.sql))), _SYNC))
    insp.round += 1
    insp.batch_sent = False  # the Sync ends the batch
    return True


def fast_reply(insp: State, buf: bytes) -> bool:
    """Handle ``buf`` when it is exactly the whole answer the head of ``expect`` waits for and
    nothing in it needs rewriting: True when done (forward ``buf`` whole), False to leave it,
    untouched, to the general path."""
    hit = reply_stretch(buf)
    if hit is None:
        return False
    pre, ts, te, ds, de, rows, cs, ce, status = hit
    expect = insp.expect
    portal = None
    if pre == 0:
        if len(expect) != 1:
            return False
        kind, rec = expect[0]
        if kind != "query":
            return False
    else:
        kinds = _EXTENDED.get(pre)
        if kinds is None or ts < 0 or len(expect) != len(kinds):
            return False
        for (kind, _), want in zip(expect, kinds, strict=True):
            if kind != want:
                return False
        portal, hidden = expect[-3][1]
        found, rec = expect[-2][1]
        if hidden or portal is None or found is not portal:
            return False
    # checks first: nothing changes before every condition holds
    plan = shape = None
    masker = insp.masker
    if ts >= 0:
        shape = insp._shape(buf[ts + 5 : te])
        if masker is not None and insp.catalog is not None and insp.catalog.missing(shape.fields):
            return False
        plan = insp._plan_for(shape)
        if rows and masker is not None and plan is not None and (
                plan.masked or (insp.detect and run_might_contain(masker, plan, buf, ds, de))):
            return False
    elif rows:
        return False
    # the state changes of the general path, in its order
    if shape is not None:
        if portal is not None:
            portal.plan = plan
            fields = portal.stmt.fields
            if fields is None or not fields.fields:
                portal.stmt.fields = shape
        rec.columns = shape.columns
    if rows:
        rec.rows += rows
        room = insp.sample_rows - len(rec.sample)
        if room > 0:
            rec.sample.extend(run_sample(buf, ds, de, room, plan))
    if buf[cs + 5 : cs + 12] != b"SELECT ":
        cc = decode_command_complete(memoryview(buf)[cs + 5 : ce])
        if cc.rows is not None and cc.command != "SELECT":
            rec.rows += cc.rows
        elif cc.command == "ROLLBACK":
            rec.command = cc.command
    expect.clear()
    insp.rec = insp.plan = None
    insp.status = chr(status)
    if status == 0x49 and insp.portals:  # 'I': the transaction ended, and its portals with it
        insp.portals.clear()
    insp._finish(rec)
    return True
