"""Approvals and denials from Slack gestures: reactions on a card, its buttons, the deny modal,
and decisions on statement reviews.

A reaction is looked up by the message it is on: a request card (``tx.request_by_card``)
or a review message (``reviews.by_message``). A gesture that does not count (the requester,
someone outside the step's groups, a second approval by the same person) changes nothing
and its author gets an ephemeral note saying why. Taking an approve emoji away withdraws only
an approval given by reaction, and only when no other approve emoji of that person is left on
the card (Slack's ``reactions.get`` says which are).
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from typing import Any, Protocol

from slack_sdk.web.async_client import AsyncWebClient

from bot import views
from bot.identity import Directory
from broker.duration import format_duration
from broker.errors import Conflict, Denied, HoopError, NotFound
from broker.model import Identity, Review
from broker.service import Service

log = logging.getLogger(__name__)

APPROVE = frozenset({"white_check_mark", "heavy_check_mark", "+1", "thumbsup"})
DENY = frozenset({"x", "no_entry"})



def _announced(shown: str | None) -> int | None:
    """The end (epoch seconds) a reminder's Extend button announced; None on an older button without it."""
    try:
        return int(shown) if shown is not None else None
    except ValueError:
        return None

class Reviews(Protocol):
    """Decisions on held statements (implemented by ``broker.reviews.Reviews``)."""

    async def decide(self, review_id: str, who: Identity, allow: bool) -> Review: ...
    async def by_message(self, channel: str, ts: str) -> Review | None: ...


def acts_on(event: dict[str, Any], *, removed: bool = False) -> bool:
    """Whether a reaction event is a gesture hoop answers: an approve emoji added or taken away, or
    a deny emoji added, on a message. Others are not even recorded."""
    emoji = emoji_of(str(event.get("reaction", "")))
    return emoji in (APPROVE if removed else APPROVE | DENY) and (event.get("item") or {}).get("type") == "message"


def emoji_of(reaction: str) -> str:
    """``+1::skin-tone-3`` -> ``+1``."""
    return reaction.split("::", 1)[0]


class Approvals:
    def __init__(self, service: Service, directory: Directory, client: AsyncWebClient,
                 reviews: Reviews | None = None) -> None:
        self.service = service
        self.directory = directory
        self.client = client
        self.reviews = reviews

    async def note(self, channel: str | None, user: str, text: str) -> None:
        """An ephemeral note to one person, or a DM when the gesture came from no channel (App
        Home, a modal); never raises (a note is best effort)."""
        try:
            if channel:
                await self.client.chat_postEphemeral(channel=channel, user=user, text=text)
            else:
                opened = await self.client.conversations_open(users=user)
                await self.client.chat_postMessage(channel=opened["channel"]["id"], text=text)
        except Exception:
            log.warning("note to %s in %s failed", user, channel or "a DM", exc_info=True)

    # -- reactions --------------------------------------------------------------------------
    async def reaction_added(self, event: dict[str, Any]) -> None:
        emoji = emoji_of(str(event.get("reaction", "")))
        item = event.get("item") or {}
        if not acts_on(event):
            return
        channel, ts, user = str(item.get("channel")), str(item.get("ts")), str(event.get("user"))
        async with self.service.store.tx() as tx:
            req = await tx.request_by_card(channel, ts)
        if req is None:
            await self._review_reaction(channel, ts, user, emoji in APPROVE)
            return
        try:
            who = await self.directory.identify(user)
            if emoji in APPROVE:
                await self.service.approve(req.id, who, via="reaction")
            else:
                await self.service.deny(req.id, who, "")
        except HoopError as exc:
            await self.note(channel, user, self._why(exc, req.id, f":{emoji}:"))

    async def reaction_removed(self, event: dict[str, Any]) -> None:
        item = event.get("item") or {}
        if not acts_on(event, removed=True):
            return
        channel, ts, user = str(item.get("channel")), str(item.get("ts")), str(event.get("user"))
        async with self.service.store.tx() as tx:
            req = await tx.request_by_card(channel, ts)
        if req is None or await self._still_approving(channel, ts, user):
            return
        try:
            who = await self.directory.identify(user)
            await self.service.withdraw(req.id, who, via="reaction")
        except (NotFound, Conflict):
            return  # nothing to withdraw (never counted, given by button, or decided): nothing changes
        except HoopError as exc:
            await self.note(channel, user, exc.message)

    async def _still_approving(self, channel: str, ts: str, user: str) -> bool:
        """Whether ``user`` still has an approve emoji on the message (they reacted with two and
        took one away). When Slack cannot say, the removal is taken at its word."""
        try:
            resp = await self.client.reactions_get(channel=channel, timestamp=ts, full=True)
        except Exception:
            log.warning("reading the reactions on %s/%s failed; withdrawing", channel, ts, exc_info=True)
            return False
        reactions = (resp.get("message") or {}).get("reactions") or []
        return any(emoji_of(str(r.get("name", ""))) in APPROVE and user in (r.get("users") or [])
                   for r in reactions)

    @staticmethod
    def _why(exc: HoopError, request_id: str, gesture: str) -> str:
        if isinstance(exc, Denied) and exc.code == "duplicate":
            # the message names who already counts: you, or you through one of your agents
            return f"Your {gesture} on `{request_id}` does not count: {exc.message}."
        if isinstance(exc, Conflict):
            return f"{gesture} on `{request_id}` changes nothing: {exc.message}."
        return f"Your {gesture} on `{request_id}` does not count: {exc.message}."

    async def _review_reaction(self, channel: str, ts: str, user: str, allow: bool) -> None:
        if self.reviews is None:
            return
        review = await self.reviews.by_message(channel, ts)
        if review is None:
            return
        await self.decide_review(review.id, user, allow, channel)

    async def decide_review(self, review_id: str, user: str, allow: bool, channel: str | None) -> None:
        if self.reviews is None:
            await self.note(channel, user, "Statement reviews are not enabled on this hoop.")
            return
        try:
            who = await self.directory.identify(user)
            await self.reviews.decide(review_id, who, allow)
        except HoopError as exc:
            await self.note(channel, user, f"Your decision on review `{review_id}` does not count: {exc.message}.")

    # -- buttons and the deny modal ---------------------------------------------------------
    async def approve_button(self, request_id: str, user: str, channel: str | None) -> None:
        try:
            who = await self.directory.identify(user)
            await self.service.approve(request_id, who, via="button")
        except HoopError as exc:
            await self.note(channel, user, self._why(exc, request_id, "Approve"))

    async def open_deny_modal(self, request_id: str, trigger_id: str, *, from_home: bool = False) -> None:
        await self.client.views_open(trigger_id=trigger_id, view=views.deny_modal(request_id, from_home=from_home))

    async def deny_submitted(self, request_id: str, user: str, reason: str) -> str | None:
        """Deny from the modal. ``None`` when denied; else why not, for the modal's error line."""
        try:
            who = await self.directory.identify(user)
            await self.service.deny(request_id, who, reason)
        except HoopError as exc:
            return self._why(exc, request_id, "Deny")
        return None

    async def deny_refused_late(self, request_id: str, user: str, why: str) -> None:
        """Tell the person, beside the card, why a deny the modal stopped waiting for did not count."""
        async with self.service.store.tx() as tx:
            req = await tx.get_request(request_id)
        await self.note(req.card_channel if req is not None else None, user, why)

    async def extend_button(self, value: str, user: str, channel: str | None, message_ts: str | None = None) -> None:
        """The Extend button of a reminder (``value``: :func:`views.extend_value`). A reminder extends
        the end it announced, once: the service extends only that end, checked under the grant's lock, so
        every click on the reminders of one end (a double click, the thread's copy and the DM's, the holder
        and an admin at once, on any replica) after the first finds it moved and only says so. With
        re-approval the service's one-pending-extension rule makes a second click count once. (A button
        posted before it carried its end counts each person's clicks once per message instead.)"""
        grant_id, shown = views.extend_target(value)
        again = f"`/hoop extend {grant_id} <duration>` extends it again."
        try:
            who = await self.directory.identify(user)
            async with self.service.store.tx() as tx:
                grant = await tx.get_grant(grant_id)
            if grant is None:
                raise NotFound(f"no grant {grant_id!r}")
            expected = _announced(shown)
            if shown is not None and expected != int(grant.expires_at.timestamp()):
                # a reminder of an end that has moved (its Extend was used, even a day ago): not a new ask
                await self.note(channel, user, f"`{grant_id}` was extended after this reminder; it now ends at "
                                               f"{views.hhmm(grant.expires_at)}. {again}")
                return
            res = self.service.config.resource(grant.resources[0])
            if expected is None and res is not None and (not res.extension.requires_approval or not res.approval):
                # (the person as a short digest: the store's keys are at most 128 characters, emails are not)
                person = hashlib.sha256(who.email.lower().encode()).hexdigest()[:16]
                once = f"slack:extend:{grant_id}:msg-{str(message_ts)[:32]}:{person}"
                async with self.service.store.tx() as tx:
                    first = await tx.mark_processed(once, self.service.clock.now())
                if not first:
                    await self.note(channel, user, f"You already pressed Extend for `{grant_id}` on this reminder; "
                                                   f"`/hoop status` shows when it ends. {again}")
                    return
            length = res.request.default_duration if res is not None else None
            await self.service.extend(grant_id, who, format_duration(length) if length else "30m",
                                      expected_end=datetime.fromtimestamp(expected, UTC) if expected else None)
        except Conflict as exc:
            if exc.code != "moved":
                await self.note(channel, user, f"Extending `{grant_id}` failed: {exc.message}.")
                return
            async with self.service.store.tx() as tx:
                now_ends = await tx.get_grant(grant_id)
            ends = f"; it now ends at {views.hhmm(now_ends.expires_at)}" if now_ends is not None else ""
            await self.note(channel, user, f"`{grant_id}` was extended after this reminder{ends}. {again}")
        except HoopError as exc:
            await self.note(channel, user, f"Extending `{grant_id}` failed: {exc.message}.")
