"""``/hoop`` commands: a pure parser, then one method per verb over the :class:`Service`.

:func:`parse` raises :class:`InvalidInput` whose message says exactly what is wrong and
ends with the verb's usage, so the ack itself can carry the refusal. :class:`Commands`
runs a parsed command for an identity and returns the ephemeral reply text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from bot import views
from broker import policy
from broker.clock import Clock
from broker.config import HoopConfig
from broker.duration import format_duration, parse_duration
from broker.errors import Denied, HoopError, InvalidInput
from broker.model import AccessRequest, GrantStatus, Identity, RequestStatus, Session, SessionStatus
from broker.recap import session_transcript
from broker.service import SYSTEM, Service
from broker.transcript import Transcript

_ARITY: dict[str, tuple[int, int | None]] = {  # (min, max) positional words; None: rest is free text
    "request": (2, None), "approve": (1, 1), "deny": (1, None), "cancel": (1, 1), "revoke": (1, None),
    "extend": (2, 2),
    "status": (0, 0), "list": (0, 0), "sessions": (0, 1), "transcript": (1, 1), "help": (0, None),
}
_NAMES = {"request": "a resource and a duration", "approve": "a request id", "deny": "a request id",
          "cancel": "a request id", "revoke": "a grant id", "extend": "a grant id and a duration",
          "transcript": "a session id"}
_DURATION = re.compile(r"^-?\d")  # what is meant as a duration (a negative one is refused as such)
#: open sessions read for ``/hoop sessions`` before keeping those the asker may see
_SESSIONS_SCAN = 1000


@dataclass(frozen=True)
class Command:
    verb: str
    args: tuple[str, ...]
    rest: str = ""


def _refuse(verb: str, what: str) -> InvalidInput:
    return InvalidInput(f"{what}\nUsage: `{views.USAGE[verb]}`", code="usage")


def parse(text: str) -> Command:
    """Parse the text after ``/hoop``. Empty text is ``help``."""
    words = text.split()
    if not words:
        return Command("help", ())
    verb = words[0].lower()
    if verb not in _ARITY:
        raise InvalidInput(f"unknown command {words[0]!r}.\n{views.help_text()}", code="usage")
    lo, hi = _ARITY[verb]
    args = words[1:]
    if len(args) < lo:
        missing = _NAMES.get(verb, "arguments")
        got = f" (got {len(args)} word{'s' if len(args) != 1 else ''})" if args else ""
        raise _refuse(verb, f"`{verb}` needs {missing}{got}.")
    if hi is not None and len(args) > hi:
        extra = " ".join(args[hi:])
        raise _refuse(verb, f"`{verb}` takes {'no arguments' if hi == 0 else f'at most {hi}'}; "
                            f"unexpected {extra!r}.")
    if verb == "request":
        if not _DURATION.match(args[1]):
            raise _refuse(verb, f"{args[1]!r} is not a duration; put the duration (e.g. 30m, 2h) "
                                "right after the resource.")
        # (its value is checked with the resource's maximum, which the refusal states: policy.resolve_duration)
        return Command(verb, (args[0], args[1]), _rest(text, 3))
    if verb == "extend":
        _duration(verb, args[1])
    if verb in ("deny", "revoke"):
        return Command(verb, (args[0],), _rest(text, 2))
    if verb == "help":
        return Command(verb, ())
    return Command(verb, tuple(args))


def _duration(verb: str, text: str) -> None:
    try:
        parse_duration(text)
    except InvalidInput as exc:
        raise _refuse(verb, exc.message) from None


def _rest(text: str, skip: int) -> str:
    """The free text after ``skip`` words, with its own spacing kept."""
    parts = text.strip().split(None, skip)
    return parts[skip].strip() if len(parts) > skip else ""


class Commands:
    """Runs parsed commands. Every method returns the ephemeral reply; errors propagate as
    :class:`HoopError` for the caller to show."""

    def __init__(self, config: HoopConfig, service: Service, clock: Clock,
                 card_failure: Callable[[str], tuple[str, str] | None] | None = None) -> None:
        self.config = config
        self.service = service
        self.clock = clock
        #: the channel and Slack's error when a request's card could not be posted
        self.card_failure = card_failure or (lambda _request_id: None)

    async def run(self, cmd: Command, who: Identity) -> str:
        method = getattr(self, "_" + cmd.verb)
        result: str = await method(cmd, who)
        return result

    async def _help(self, cmd: Command, who: Identity) -> str:
        return views.help_text()

    async def _request(self, cmd: Command, who: Identity) -> str:
        resource, duration = cmd.args
        req = await self.service.request(who, resource, duration, cmd.rest)
        return self._requested(req)

    def _requested(self, req: AccessRequest) -> str:
        if req.status is RequestStatus.APPROVED:
            return f"Request `{req.id}` for {req.resource} was granted at once; see your DMs."
        quorum = " and ".join(f"{s.count} from {s.group}" for s in req.steps)
        if (failed := self.card_failure(req.id)) is not None:
            channel, error = failed
            return (f"Request `{req.id}` for *{req.resource}* is recorded, but hoop could not post the card of "
                    f"`{req.id}` in <#{channel}> (Slack: {views.escape(error)}), so nobody sees it there. "
                    f"Approvers ({quorum}) can still approve it from hoop's App Home or with "
                    f"`/hoop approve {req.id}`; the error is logged for the operators (is hoop in that channel?).")
        res = self.config.resource(req.resource)
        where = f" in <#{res.channel}>" if res is not None and res.channel else ""
        return (f"Request `{req.id}` for *{req.resource}* ({format_duration(req.duration)}) posted{where}; "
                f"it needs {quorum} and lapses at {views.hhmm(req.lapses_at)}.")

    async def _approve(self, cmd: Command, who: Identity) -> str:
        result = await self.service.approve(cmd.args[0], who, via="command")
        if result.grant is not None:
            return f"Approved `{result.request.id}`: the quorum is met and access is granted."
        req = result.request
        if req.status is RequestStatus.DENIED and req.decided_by == SYSTEM.email:  # an extension that no longer fits
            return f"Approved `{req.id}`, but hoop refused it: {req.decision_reason}."
        if req.status is RequestStatus.APPROVED:
            return f"Approved `{req.id}`: the quorum is met."
        if req.status is not RequestStatus.PENDING:  # a denial or cancellation landed between approval and decision
            by = f" by {views.escape(req.decided_by)}" if req.decided_by else ""
            return f"Your approval was recorded, but `{req.id}` was {req.status.value}{by} before it was decided."
        return f"Approved `{result.request.id}`; more approvals are still needed."

    async def _deny(self, cmd: Command, who: Identity) -> str:
        req = await self.service.deny(cmd.args[0], who, cmd.rest)
        return f"Denied `{req.id}`."

    async def _cancel(self, cmd: Command, who: Identity) -> str:
        req = await self.service.cancel(cmd.args[0], who)
        return f"Cancelled `{req.id}`."

    async def _revoke(self, cmd: Command, who: Identity) -> str:
        grant = await self.service.revoke(cmd.args[0], who, cmd.rest)
        return f"Revoked `{grant.id}` ({', '.join(grant.resources)})."

    async def _extend(self, cmd: Command, who: Identity) -> str:
        out = await self.service.extend(cmd.args[0], who, cmd.args[1])
        if isinstance(out, AccessRequest):
            if (failed := self.card_failure(out.id)) is not None:
                return (f"Extending `{cmd.args[0]}` needs approval: request `{out.id}` is recorded, but hoop could "
                        f"not post its card in <#{failed[0]}> (Slack: {views.escape(failed[1])}). Approvers can "
                        f"still approve it from hoop's App Home or with `/hoop approve {out.id}`.")
            return f"Extending `{cmd.args[0]}` needs approval: request `{out.id}` was posted in the thread."
        return f"Extended `{out.id}` until {views.hhmm(out.expires_at)}."

    async def _status(self, cmd: Command, who: Identity) -> str:
        async with self.service.store.tx() as tx:
            pending = await tx.list_requests(status=RequestStatus.PENDING, requester=who.email, limit=50)
            grants = await tx.list_grants(status=GrantStatus.ACTIVE, identity=who.email, limit=50)
        return views.status_text(pending, grants, self.clock.now())

    async def _list(self, cmd: Command, who: Identity) -> str:
        names = []
        for res in self.config.resources:
            try:
                policy.may_request(self.config, who, res.name)
            except HoopError:
                continue
            names.append(res.name)
        return views.resources_text(self.config, names)

    async def _sessions(self, cmd: Command, who: Identity) -> str:
        resource = cmd.args[0] if cmd.args else None
        if resource is not None and self.config.resource(resource) is None:
            raise InvalidInput(f"unknown resource {resource!r}\nUsage: `{views.USAGE['sessions']}`", code="usage")
        async with self.service.store.tx() as tx:
            live = await tx.list_sessions(status=SessionStatus.OPEN, resource=resource, limit=_SESSIONS_SCAN)
        visible = [s for s in live if self.may_see(who, s)][:50]
        return views.sessions_text(visible, self.clock.now())

    def may_see(self, who: Identity, session: Session) -> bool:
        """The API's rule for grants and requests: the session's own chain, an approver of its
        resource, or an admin. Its chain, client address and statements are not for everyone."""
        mine = who.email.lower() in (c.lower() for c in session.chain)
        return mine or policy.is_admin(self.config, who) or policy.is_approver_of(self.config, who, session.resource)

    async def transcript_for(self, session_id: str, who: Identity) -> tuple[Session, Transcript]:
        """The masked transcript of a session, for its owner, an approver of its resource or an admin."""
        session, transcript = await session_transcript(self.service, session_id)
        if not self.may_see(who, session):
            raise Denied("only the session's owner, an approver of its resource or an admin can read its transcript",
                         code="not_allowed")
        return session, transcript

    async def thread_of(self, session: Session) -> tuple[str, str] | None:
        """The channel and ts of the card of the request behind a session's grant, if it has one."""
        async with self.service.store.tx() as tx:
            grant = await tx.get_grant(session.grant_id) if session.grant_id else None
            req = await self.service.request_for(tx, grant) if grant is not None else None
        if req is None or not (req.card_channel and req.card_ts):
            return None
        return req.card_channel, req.card_ts

    @staticmethod
    def transcript_text(transcript: Transcript) -> str:
        return f"{transcript.summary}\n```{views.escape_clipped(transcript.text, 3500)}```"

    async def _transcript(self, cmd: Command, who: Identity) -> str:
        _, transcript = await self.transcript_for(cmd.args[0], who)
        return self.transcript_text(transcript)
