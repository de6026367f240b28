"""The broker's events, rendered into Slack: one thread per request.

:class:`SlackNotifier` is a broker ``Notifier``. ``RequestCreated`` posts the card in the
resource's channel and saves its channel and ts in the store (``service.set_card``), so any
replica, or this one after a restart, updates the same card with ``chat.update``. Every
later event is a reply in the card's thread, and changes that alter the card update it in
place. ``GrantIssued`` is the only event with the secret: it goes to the requester's DM and
nowhere else. A DM that fails for a passing reason is tried again; one that still fails does
not keep the thread reply and the card update from happening, and the reply says the
credential was not delivered (never the secret). Thread replies, card updates and uploads are
tried again the same way; one that still fails is logged as an error naming the request or
grant, and the posts after it still happen. A card Slack refuses is remembered
(:meth:`SlackNotifier.card_failure`) so the requester is told. Events without a card
(break-glass grants) go to the resource's channel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot import views
from bot.identity import Directory
from bot.views import escape, escape_clipped
from broker.clock import Clock
from broker.config import HoopConfig
from broker.duration import format_duration
from broker.events import (
    ApprovalAdded,
    ApprovalWithdrawn,
    Event,
    GrantEnded,
    GrantExtended,
    GrantIssued,
    GrantReminder,
    RequestCancelled,
    RequestCreated,
    RequestDenied,
    RequestLapsed,
    ReviewDecided,
    ReviewRequested,
    SessionClosed,
    SessionOpened,
    TranscriptReady,
)
from broker.model import AccessRequest, Grant, GrantStatus
from broker.service import Service

log = logging.getLogger(__name__)

#: Slack errors worth another try; any other (``cannot_dm_bot``, ``user_disabled``, ...) will not change
_TRANSIENT = frozenset({"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"})
#: how many failed card posts :meth:`SlackNotifier.card_failure` remembers
_CARD_FAILURES_KEPT = 200


def _slack_error(exc: Exception) -> str:
    """Slack's error code of a failed Web API call, or the kind of transport failure."""
    if isinstance(exc, SlackApiError):
        return str(exc.response.get("error") or "slack_error")
    return type(exc).__name__


class SlackNotifier:
    """Posts and updates cards, thread replies, DMs and transcript uploads."""

    def __init__(self, client: AsyncWebClient, config: HoopConfig, service: Service, clock: Clock,
                 directory: Directory, *, dm_retry_delays: Sequence[float] = (2.0, 10.0),
                 post_retry_delays: Sequence[float] = (2.0, 10.0)) -> None:
        self.client = client
        self.config = config
        self.service = service
        self.clock = clock
        self.directory = directory
        #: pauses between tries of a credential DM that failed for a passing reason
        self.dm_retry_delays = tuple(dm_retry_delays)
        #: pauses between tries of a thread reply, card update or upload that failed for a passing reason
        self.post_retry_delays = tuple(post_retry_delays)
        #: request id -> (channel, Slack error) of cards that could not be posted, newest last
        self._card_failures: dict[str, tuple[str, str]] = {}

    async def publish(self, event: Event) -> None:
        handler = getattr(self, "_on_" + type(event).__name__, None)
        if handler is not None:
            await handler(event)

    # -- where things go --------------------------------------------------------------------
    def _channel_of(self, resource: str) -> str | None:
        res = self.config.resource(resource)
        return res.channel if res is not None else None

    async def _fresh(self, req: AccessRequest) -> AccessRequest:
        """The request with its card reference (an event may predate ``set_card``)."""
        if req.card_ts is not None:
            return req
        async with self.service.store.tx() as tx:
            stored = await tx.get_request(req.id)
        if stored is not None:
            req.card_channel, req.card_ts = stored.card_channel, stored.card_ts
        return req

    async def _thread(self, req: AccessRequest | None, resource: str) -> tuple[str | None, str | None]:
        if req is not None and req.extends_grant:
            # an extension's card is itself a reply: Slack threads hang off the parent only
            async with self.service.store.tx() as tx:
                grant = await tx.get_grant(req.extends_grant)
                orig = await self.service.request_for(tx, grant) if grant is not None else None
            if orig is not None and orig.card_channel and orig.card_ts:
                return orig.card_channel, orig.card_ts
        if req is not None:
            req = await self._fresh(req)
            if req.card_channel and req.card_ts:
                return req.card_channel, req.card_ts
        return self._channel_of(resource), None

    async def _post(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any | None:
        """Make one Web API call, trying again after a passing failure (the web client has already
        retried 429s and connection errors). Its answer, or ``None`` once it has failed for good,
        which is logged as an error naming ``what``: one lost post must not stop the next ones
        (a failed thread reply used to leave the card offering Approve after a grant)."""
        for delay in (*self.post_retry_delays, None):
            try:
                return await call()
            except (SlackApiError, aiohttp.ClientError, TimeoutError) as exc:
                error = _slack_error(exc)
                passing = error in _TRANSIENT or not isinstance(exc, SlackApiError)
            if delay is None or not passing:
                log.error("%s could not be posted to Slack (%s)", what, error)
                return None
            log.warning("%s failed (%s); trying again in %.0fs", what, error, delay)
            await asyncio.sleep(delay)
        return None  # not reached: the last delay is None

    async def _reply(self, req: AccessRequest | None, resource: str, text: str,
                     blocks: list[dict[str, Any]] | None = None) -> tuple[str, str] | None:
        channel, thread_ts = await self._thread(req, resource)
        about = f"request {req.id}" if req is not None else f"resource {resource}"
        if channel is None:
            log.warning("%s: no channel to post %r in (the resource has none)", about, text[:80])
            return None
        kwargs: dict[str, Any] = {"channel": channel, "text": text}
        if thread_ts:
            kwargs["thread_ts"] = thread_ts
        if blocks:
            kwargs["blocks"] = blocks
        resp = await self._post(f"{about}: the message {text[:80]!r} in {channel}",
                                lambda: self.client.chat_postMessage(**kwargs))
        return (str(resp["channel"]), str(resp["ts"])) if resp is not None else None

    async def _update_card(self, req: AccessRequest, grant: Grant | None = None) -> None:
        req = await self._fresh(req)
        if not (req.card_channel and req.card_ts):
            return
        if grant is None and req.grant_id is not None:
            async with self.service.store.tx() as tx:
                grant = await tx.get_grant(req.grant_id)
        text, blocks = views.card(req, self.clock.now(), grant)
        channel, ts = req.card_channel, req.card_ts
        await self._post(f"request {req.id}: the card update ({req.status.value}) of {channel}/{ts}",
                         lambda: self.client.chat_update(channel=channel, ts=ts, text=text, blocks=blocks))

    async def _dm(self, user_id: str, text: str, blocks: list[dict[str, Any]] | None = None) -> None:
        opened = await self.client.conversations_open(users=user_id)
        kwargs: dict[str, Any] = {"channel": opened["channel"]["id"], "text": text}
        if blocks:
            kwargs["blocks"] = blocks
        await self.client.chat_postMessage(**kwargs)

    async def _deliver_secret(self, user_id: str, grant: Grant, text: str, blocks: list[dict[str, Any]]) -> str | None:
        """DM the credential, trying again after a passing failure (the web client has already
        retried 429s and connection errors). ``None`` once delivered; else Slack's reason, which
        never contains the secret."""
        for delay in (*self.dm_retry_delays, None):
            try:
                await self._dm(user_id, text, blocks)
                return None
            except SlackApiError as exc:
                error = str(exc.response.get("error") or "slack_error")
                passing = error in _TRANSIENT
            except (aiohttp.ClientError, TimeoutError) as exc:
                error, passing = type(exc).__name__, True
            if delay is None or not passing:
                log.warning("grant %s: the credential DM could not be delivered (%s)", grant.id, error)
                return error
            log.warning("grant %s: the credential DM failed (%s); trying again in %.0fs", grant.id, error, delay)
            await asyncio.sleep(delay)
        return None  # not reached: the last delay is None

    # -- requests ---------------------------------------------------------------------------
    async def _on_RequestCreated(self, ev: RequestCreated) -> None:
        req = ev.request
        channel, thread_ts = self._channel_of(req.resource), None
        if req.extends_grant:  # an extension is asked in the original request's thread
            channel, thread_ts = await self._thread(req, req.resource)
        if channel is None and req.requester_slack_id:
            channel = (await self.client.conversations_open(users=req.requester_slack_id))["channel"]["id"]
        if channel is None:
            log.warning("request %s: resource %s has no channel and the requester no Slack id", req.id, req.resource)
            return
        text, blocks = views.card(req, self.clock.now())
        kwargs: dict[str, Any] = {"channel": channel, "text": text, "blocks": blocks}
        if thread_ts:
            kwargs["thread_ts"] = thread_ts
        try:
            resp = await self.client.chat_postMessage(**kwargs)
        except (SlackApiError, aiohttp.ClientError, TimeoutError) as exc:
            error = _slack_error(exc)
            log.error("request %s: its card could not be posted in %s (Slack: %s); approvers can still find it "
                      "in their App Home or approve it with /hoop approve", req.id, channel, error)
            self._card_failures[req.id] = (channel, error)
            while len(self._card_failures) > _CARD_FAILURES_KEPT:
                del self._card_failures[next(iter(self._card_failures))]
            return
        await self.service.set_card(req.id, str(resp["channel"]), str(resp["ts"]))
        req.card_channel, req.card_ts = str(resp["channel"]), str(resp["ts"])

    def card_failure(self, request_id: str) -> tuple[str, str] | None:
        """The channel and Slack's error when this process could not post a request's card."""
        return self._card_failures.get(request_id)

    async def _on_ApprovalAdded(self, ev: ApprovalAdded) -> None:
        groups = next((a.groups for a in ev.request.approvals if a.approver == ev.approver.email.lower()), ())
        via = "button" if ev.via == "button" else ev.via
        await self._reply(ev.request, ev.request.resource,
                          f":white_check_mark: {escape(ev.approver.label)} approved ({', '.join(groups)}) via {via}")
        await self._update_card(ev.request)

    async def _on_ApprovalWithdrawn(self, ev: ApprovalWithdrawn) -> None:
        await self._reply(ev.request, ev.request.resource, f":leftwards_arrow_with_hook: {escape(ev.approver.label)} "
                                                           "withdrew their approval")
        await self._update_card(ev.request)

    async def _on_RequestDenied(self, ev: RequestDenied) -> None:
        why = f": {escape_clipped(ev.reason, 2500)}" if ev.reason.strip() else ""
        await self._reply(ev.request, ev.request.resource, f":x: Denied by {escape(ev.by.label)}{why}")
        await self._update_card(ev.request)

    async def _on_RequestLapsed(self, ev: RequestLapsed) -> None:
        await self._reply(ev.request, ev.request.resource,
                          f":zzz: Lapsed: not approved by {views.hhmm(ev.request.lapses_at)}")
        await self._update_card(ev.request)

    async def _on_RequestCancelled(self, ev: RequestCancelled) -> None:
        await self._reply(ev.request, ev.request.resource, f":heavy_minus_sign: Cancelled by {escape(ev.by.label)}")
        await self._update_card(ev.request)

    # -- grants -----------------------------------------------------------------------------
    async def _on_GrantIssued(self, ev: GrantIssued) -> None:
        grant, req = ev.grant, ev.request
        resource = grant.resources[0]
        if grant.parent_id is not None:
            # a delegation: the secret went to the delegating agent, which hands it to its child
            orig = await self._origin(grant)
            await self._reply(orig, resource, f":link: Delegated `{grant.id}` to {escape(grant.chain_text())} until "
                                              f"{views.hhmm(grant.expires_at)} ({', '.join(grant.resources)})")
            return
        # The secret is shown once, to the requester only: by DM to a Slack requester. An API requester
        # collects it from the API; break-glass prints it to the admin's terminal.
        # A failed DM must not keep the thread and the card from saying the request was granted.
        undelivered: str | None = None
        if req is not None and req.requester_slack_id is not None:
            text, blocks = views.grant_dm(grant, ev.secret, ev.hints)
            undelivered = await self._deliver_secret(req.requester_slack_id, grant, text, blocks)
        if ev.breakglass_by is not None:
            by, whom, why = escape(ev.breakglass_by.label), escape(grant.identity), ev.breakglass_reason or "—"
            await self._reply(None, resource, f":rotating_light: *Break-glass*: {by} granted {whom} access to "
                                              f"{', '.join(grant.resources)} until {views.hhmm(grant.expires_at)} "
                                              f"without approval (grant `{grant.id}`). Reason: {escape(why)}")
            return
        granted = f":key: Granted until {views.hhmm(grant.expires_at)} (grant `{grant.id}`, login `{grant.login}`)"
        if undelivered is not None:
            granted += (f". :warning: The credential could not be sent to {escape(grant.identity)} by DM "
                        f"(Slack: {escape(undelivered)}). It is shown only once: revoke the grant "
                        f"(`/hoop revoke {grant.id}`) and request access again.")
        else:
            granted += (f"; details sent to {escape(grant.identity)}"
                        + (" by DM" if req and req.requester_slack_id else " through the API"))
        await self._reply(req, resource, granted)
        if req is not None:
            await self._update_card(req, grant)

    async def _on_GrantExtended(self, ev: GrantExtended) -> None:
        grant = ev.grant
        orig = await self._origin(grant)
        await self._reply(orig or ev.request, grant.resources[0], f":arrow_forward: Extended by {escape(ev.by.label)} "
                                                                  f"until {views.hhmm(grant.expires_at)}")
        if ev.request is not None and ev.request.extends_grant:
            await self._update_card(ev.request, None)
        if orig is not None:
            await self._update_card(orig, grant)

    async def _origin(self, grant: Grant) -> AccessRequest | None:
        async with self.service.store.tx() as tx:
            return await self.service.request_for(tx, grant)

    async def _on_GrantReminder(self, ev: GrantReminder) -> None:
        text, blocks = views.reminder(ev.grant, self.clock.now())
        await self._reply(ev.request, ev.grant.resources[0], text, blocks)
        # and to the requester by DM, with the same Extend button
        user_id = ev.request.requester_slack_id if ev.request is not None else None
        if user_id is None:
            user_id = await self.directory.user_id_for(ev.grant.identity)
        if user_id is not None:
            dm_to = user_id
            await self._post(f"grant {ev.grant.id}: the reminder DM to {dm_to}", lambda: self._dm(dm_to, text, blocks))

    async def _on_GrantEnded(self, ev: GrantEnded) -> None:
        grant = ev.grant
        label = f"`{grant.id}`" + (f" ({escape(grant.label)})" if grant.label else "")
        if grant.status is GrantStatus.REVOKED:
            text = f":no_entry_sign: Revoked by {escape(grant.ended_by or 'hoop')}: access {label} ended"
            if grant.end_reason and grant.end_reason != "revoked":
                text += f" ({escape_clipped(grant.end_reason, 2500)})"
        else:
            text = f":hourglass: Expired: access {label} ended at {views.hhmm(grant.ended_at or grant.expires_at)}"
        await self._reply(ev.request, grant.resources[0], text)
        if ev.request is not None and ev.request.grant_id == grant.id:
            await self._update_card(ev.request, grant)

    # -- sessions, reviews, transcripts -----------------------------------------------------
    async def _on_SessionOpened(self, ev: SessionOpened) -> None:
        s = ev.session
        await self._reply(ev.request, s.resource, f":electric_plug: {escape(' → '.join(s.chain))} connected with "
                                                  f"{s.protocol} from {s.client_addr} (session `{s.id}`)")

    async def _on_SessionClosed(self, ev: SessionClosed) -> None:
        s = ev.session
        length = format_duration((s.closed_at or self.clock.now()) - s.opened_at)
        await self._reply(ev.request, s.resource, f":electric_plug: session `{s.id}` closed after {length}"
                                                  f"{': ' + escape(s.close_reason) if s.close_reason else ''}")

    async def _on_ReviewRequested(self, ev: ReviewRequested) -> None:
        text, blocks = views.review_message(ev.review)
        where = await self._reply(ev.request, ev.review.resource, text, blocks)
        if where is None:
            return
        async with self.service.store.tx() as tx:
            review = await tx.get_review(ev.review.id)
            if review is not None:
                review.channel, review.ts = where
                await tx.update_review(review)
        ev.review.channel, ev.review.ts = where

    async def _on_ReviewDecided(self, ev: ReviewDecided) -> None:
        review = ev.review
        if review.channel and review.ts:
            text, blocks = views.review_message(review)
            channel, ts = review.channel, review.ts
            await self._post(f"review {review.id}: the update ({review.status}) of {channel}/{ts}",
                             lambda: self.client.chat_update(channel=channel, ts=ts, text=text, blocks=blocks))
        by = f" by {escape(review.decided_by)}" if review.decided_by else ""
        await self._reply(ev.request, review.resource, f"review `{review.id}`: {review.status}{by}")

    async def _on_TranscriptReady(self, ev: TranscriptReady) -> None:
        channel, thread_ts = await self._thread(ev.request, ev.grant.resources[0])
        if channel is None:
            return
        await self._reply(ev.request, ev.grant.resources[0], f"*{escape(ev.title)}*\n{escape(ev.summary)}")
        kwargs: dict[str, Any] = {"channel": channel, "content": ev.text, "filename": ev.filename, "title": ev.title}
        if thread_ts:
            kwargs["thread_ts"] = thread_ts
        session = ev.extra.get("session")
        again = f"/hoop transcript {session} posts it again" if session else "the audit log and recording keep it"
        await self._post(f"grant {ev.grant.id}: the transcript file {ev.filename} in {channel} ({again})",
                         lambda: self.client.files_upload_v2(**kwargs))
