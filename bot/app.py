"""The Slack bot: a Bolt ``AsyncApp`` on the broker's aiohttp server, or on Socket Mode.

How it works: every listener acknowledges at once (the ack is all Slack waits for, well
inside its 3 seconds) and hands the slow part, identity look-ups and service calls, to a
task the bot owns (``_spawn``); :meth:`SlackBot.drain` waits for them (tests, shutdown).
The deny modal's submission is the exception: it waits up to ``modal_wait`` for the deny, so
a refusal can be shown in the modal (``response_action: errors``) rather than elsewhere.
Events are deduplicated by event id in the store (``tx.mark_processed``), so Slack's
retries and duplicate deliveries act once on any replica. Bolt checks request signatures
and timestamps (forged or stale: 401). The Web API client retries 429s after
``Retry-After``. The bot is also the broker's ``Notifier`` (see :mod:`bot.notifier`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.logger.messages import warning_client_prioritized_and_token_skipped
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from bot import views
from bot.commands import Commands, parse
from bot.home import Home
from bot.identity import Directory
from bot.notifier import SlackNotifier
from bot.reactions import Approvals, Reviews, acts_on
from broker.clock import Clock
from broker.config import HoopConfig, Settings
from broker.errors import ConfigError, HoopError, InvalidInput
from broker.events import Event
from broker.model import Identity
from broker.service import Service

log = logging.getLogger(__name__)


class _ClientGiven(logging.Filter):
    """Drops bolt's start-up warning that the ``SLACK_BOT_TOKEN`` it reads from the environment itself is
    unused because a client was given: hoop builds that client from the same token, so every start of a
    correctly configured replica warned about nothing."""

    TEXT = warning_client_prioritized_and_token_skipped()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.TEXT


log.addFilter(_ClientGiven())

SLACK_API = "https://slack.com/api/"
Ack = Callable[..., Awaitable[Any]]


def web_client(settings: Settings) -> AsyncWebClient:
    """The Slack Web API client every part of hoop posts with (``SLACK_API_URL`` may point elsewhere)."""
    base = settings.slack_api_url or SLACK_API
    base = base if base.endswith("/") else base + "/"
    # slack_sdk logs request bodies at DEBUG, and a DM body carries a grant secret: its
    # logger never goes below INFO, whatever the root level is.
    web_log = logging.getLogger("bot.slack_web")
    web_log.setLevel(logging.INFO)
    return AsyncWebClient(token=settings.slack_bot_token, base_url=base, logger=web_log,
                          retry_handlers=[AsyncConnectionErrorRetryHandler(),
                                          AsyncRateLimitErrorRetryHandler(max_retry_count=3)])


def command_notifier(config: HoopConfig, settings: Settings, service: Service, clock: Clock) -> SlackNotifier | None:
    """What a one-shot command (``hoop breakglass``, ``hoop revoke``) posts to Slack with: the same cards,
    thread replies and DMs as ``hoop serve``, needing only ``SLACK_BOT_TOKEN``; None without it."""
    if not settings.slack_bot_token:
        return None
    client = web_client(settings)
    return SlackNotifier(client, config, service, clock, Directory(client, config, clock))


class SlackBot:
    """Slash commands, reactions, buttons, modals and App Home; and the broker's Slack notifier."""

    def __init__(self, config: HoopConfig, settings: Settings, service: Service, clock: Clock,
                 reviews: Reviews | None = None) -> None:
        if not settings.slack_bot_token:
            raise ConfigError("the Slack bot needs SLACK_BOT_TOKEN")
        if not settings.slack_app_token and not settings.slack_signing_secret:
            raise ConfigError("the Slack bot needs SLACK_SIGNING_SECRET (HTTP mode) or SLACK_APP_TOKEN (Socket Mode)")
        self.config = config
        self.settings = settings
        self.service = service
        self.clock = clock
        self.client = web_client(settings)
        self.directory = Directory(self.client, config, clock)
        self.notifier = SlackNotifier(self.client, config, service, clock, self.directory)
        self.commands = Commands(config, service, clock, self.notifier.card_failure)
        self.approvals = Approvals(service, self.directory, self.client, reviews)
        self.home = Home(service, self.directory, self.client)
        self.socket_mode = bool(settings.slack_app_token)
        self.app = AsyncApp(client=self.client, signing_secret=settings.slack_signing_secret or "",
                            process_before_response=True, request_verification_enabled=not self.socket_mode,
                            raise_error_for_unhandled_request=False, logger=log)
        self._tasks: set[asyncio.Task[None]] = set()
        #: how long a deny modal's submission waits for the deny before closing (Slack waits 3 s)
        self.modal_wait = 2.0
        self._socket: AsyncSocketModeHandler | None = None
        self._session: aiohttp.ClientSession | None = None
        self._register()

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self, web_app: web.Application) -> None:
        """Mount ``POST /slack/events`` on ``web_app`` (HTTP mode; call before the app starts),
        or connect Socket Mode when an app token is set."""
        self._session = aiohttp.ClientSession()
        self.client.session = self._session
        if self.socket_mode:
            self._socket = AsyncSocketModeHandler(self.app, self.settings.slack_app_token, web_client=self.client)
            await self._socket.connect_async()  # type: ignore[no-untyped-call]
        else:
            web_app.router.add_post("/slack/events", self.handle)

    async def stop(self) -> None:
        try:
            async with asyncio.timeout(10):
                await self.drain()
        except TimeoutError:
            for task in list(self._tasks):
                task.cancel()
        if self._socket is not None:
            await self._socket.close_async()  # type: ignore[no-untyped-call]
            self._socket = None
        if self._session is not None:
            await self._session.close()
            self._session = None
            self.client.session = None

    async def drain(self) -> None:
        """Wait until every piece of work started by a Slack request has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def publish(self, event: Event) -> None:
        await self.notifier.publish(event)

    async def handle(self, request: web.Request) -> web.Response:
        """``POST /slack/events``: Bolt verifies the signature and dispatches."""
        bolt_resp = await self.app.async_dispatch(await to_bolt_request(request))
        return await to_aiohttp_response(bolt_resp)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(self._guard(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _guard(work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception:
            log.exception("Slack work failed")

    async def _first(self, body: dict[str, Any]) -> bool:
        """True the first time an event id is seen, on any replica."""
        event_id = body.get("event_id")
        if not event_id:
            return True
        async with self.service.store.tx() as tx:
            return await tx.mark_processed(f"slack:{event_id}", self.clock.now())

    # -- listeners --------------------------------------------------------------------------
    def _register(self) -> None:
        app = self.app
        app.command("/hoop")(self._on_command)
        app.event("reaction_added")(self._on_reaction_added)
        app.event("reaction_removed")(self._on_reaction_removed)
        app.event("app_home_opened")(self._on_home)
        app.action(views.APPROVE_ACTION)(self._on_approve)
        app.action(views.DENY_ACTION)(self._on_deny)
        app.action(views.EXTEND_ACTION)(self._on_extend)
        app.action(views.REVIEW_ALLOW_ACTION)(self._on_review_allow)
        app.action(views.REVIEW_REFUSE_ACTION)(self._on_review_refuse)
        app.view(views.DENY_MODAL)(self._on_deny_submitted)

    async def _on_command(self, ack: Ack, body: dict[str, Any]) -> None:
        try:
            # Slack escapes &, < and > in command text; hoop keeps what was typed and escapes on output
            cmd = parse(views.unescape(str(body.get("text") or "")))
        except InvalidInput as exc:
            await ack(response_type="ephemeral", text=exc.message)
            return
        if cmd.verb == "help":
            await ack(response_type="ephemeral", text=views.help_text())
            return
        await ack()
        user = str(body.get("user_id"))

        async def work() -> None:
            try:
                who = await self.directory.identify(user)
                if cmd.verb == "transcript":
                    text = await self._post_transcript(cmd.args[0], who)
                else:
                    text = await self.commands.run(cmd, who)
            except HoopError as exc:
                text = exc.message
            except SlackApiError as exc:  # Slack, not hoop: say what it answered (not_in_channel, ...)
                error = exc.response.get("error") or "an error"
                log.warning("/hoop %s: Slack answered %s", cmd.verb, error)
                text = f"`/hoop {cmd.verb}` could not finish: Slack refused it ({views.escape(str(error))})."
                if error in ("not_in_channel", "channel_not_found"):
                    text += " Ask an operator to invite hoop to the request's channel."
            except Exception:
                log.exception("/hoop %s failed", cmd.verb)
                text = f"`/hoop {cmd.verb}` failed inside hoop; the error is logged for the operators."
            await self._answer(body, text)

        self._spawn(work())

    async def _post_transcript(self, session_id: str, who: Identity) -> str:
        """`/hoop transcript`: the masked transcript file goes into the thread of the session's request,
        whose audience already gets that session's transcript when it closes; never into the channel
        the command was typed in, whose audience nobody checked. A session without a request thread
        (break-glass) gets the clipped text in the asker's ephemeral answer instead."""
        session, transcript = await self.commands.transcript_for(session_id, who)
        thread = await self.commands.thread_of(session)
        if thread is None:
            return self.commands.transcript_text(transcript)
        channel, thread_ts = thread
        await self.client.files_upload_v2(
            channel=channel, thread_ts=thread_ts, content=transcript.text, filename=f"hoop-{session.id}.txt",
            title=f"Transcript of session {session.id}",
            initial_comment=f":scroll: Transcript of session `{session.id}` on {session.resource} "
                            f"({views.escape(' → '.join(session.chain))}), asked for by {views.escape(who.label)}: "
                            f"{transcript.summary}")
        return f"Posted the transcript of `{session.id}` in its request's thread in <#{channel}>."

    async def _answer(self, body: dict[str, Any], text: str) -> None:
        """The ephemeral reply to a slash command: its response_url, else chat.postEphemeral."""
        url = body.get("response_url")
        if url and self._session is not None:
            try:
                async with self._session.post(url, json={"response_type": "ephemeral", "text": text},
                                              timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    if resp.status < 300:
                        return
                    log.warning("response_url answered %s; answering with chat.postEphemeral", resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("response_url failed (%s); answering with chat.postEphemeral", type(exc).__name__)
        await self.approvals.note(body.get("channel_id"), str(body.get("user_id")), text)

    async def _on_reaction_added(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        # every reaction in hoop's channels arrives here: only gestures cost a store write
        if acts_on(event) and await self._first(body):
            self._spawn(self.approvals.reaction_added(event))

    async def _on_reaction_removed(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        if acts_on(event, removed=True) and await self._first(body):
            self._spawn(self.approvals.reaction_removed(event))

    async def _on_home(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        if event.get("tab", "home") == "home" and await self._first(body):
            self._spawn(self.home.publish(str(event.get("user"))))

    @staticmethod
    def _where(body: dict[str, Any]) -> tuple[str, str | None]:
        channel = (body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id")
        return str((body.get("user") or {}).get("id")), channel

    @staticmethod
    def _from_home(body: dict[str, Any]) -> bool:
        return (body.get("view") or {}).get("type") == "home"

    async def _then_home(self, work: Coroutine[Any, Any, None], user: str) -> None:
        """Do ``work``, then re-publish the clicker's App Home, whose lists it may have changed."""
        try:
            await work
        finally:
            await self.home.publish(user)

    async def _on_approve(self, ack: Ack, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        user, channel = self._where(body)
        work = self.approvals.approve_button(str(action.get("value")), user, channel)
        self._spawn(self._then_home(work, user) if self._from_home(body) else work)

    async def _on_deny(self, ack: Ack, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        self._spawn(self.approvals.open_deny_modal(str(action.get("value")), str(body.get("trigger_id")),
                                                   from_home=self._from_home(body)))

    async def _on_extend(self, ack: Ack, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        user, channel = self._where(body)
        message_ts = (body.get("container") or {}).get("message_ts")
        self._spawn(self.approvals.extend_button(str(action.get("value")), user, channel, message_ts))

    async def _on_review_allow(self, ack: Ack, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        user, channel = self._where(body)
        self._spawn(self.approvals.decide_review(str(action.get("value")), user, True, channel))

    async def _on_review_refuse(self, ack: Ack, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        user, channel = self._where(body)
        self._spawn(self.approvals.decide_review(str(action.get("value")), user, False, channel))

    async def _on_deny_submitted(self, ack: Ack, body: dict[str, Any], view: dict[str, Any]) -> None:
        """Deny within the ack when it is quick, so a refusal shows in the modal itself (Slack's
        ``response_action: errors``); past :attr:`modal_wait` the modal closes and a refusal is
        noted beside the card instead."""
        values = (view.get("state") or {}).get("values") or {}
        reason = ((values.get(views.DENY_REASON_BLOCK) or {}).get(views.DENY_REASON_INPUT) or {}).get("value") or ""
        user = str((body.get("user") or {}).get("id"))
        request_id, from_home = views.deny_modal_origin(str(view.get("private_metadata") or ""))
        task = asyncio.get_running_loop().create_task(self._deny(request_id, user, str(reason)))
        done, _ = await asyncio.wait({task}, timeout=self.modal_wait)
        if task in done and (why := task.result()) is not None:
            await ack(response_action="errors", errors={views.DENY_REASON_BLOCK: views.clip(why, 1000)})
            return
        await ack()

        async def rest() -> None:
            why = await task
            if why is not None:
                await self.approvals.deny_refused_late(request_id, user, why)

        self._spawn(self._then_home(rest(), user) if from_home else rest())

    async def _deny(self, request_id: str, user: str, reason: str) -> str | None:
        try:
            return await self.approvals.deny_submitted(request_id, user, reason)
        except Exception:
            log.exception("denying %s from the modal failed", request_id)
            return f"Denying `{request_id}` failed inside hoop; the error is logged for the operators."
