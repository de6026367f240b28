"""Slack user -> :class:`Identity`: email from ``users.info``, groups from the config.

Groups come from member emails and from Slack user groups (``usergroups.users.list`` for
each ``slack_usergroup`` the config names). Both lookups are cached for ``ttl`` on the
injected clock, so a burst of reactions costs one Web API call per person and group. A
failed lookup is not cached: it raises :class:`UpstreamError`, and the next call asks again.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from broker import policy
from broker.clock import Clock
from broker.config import HoopConfig
from broker.errors import Denied, UpstreamError
from broker.model import Identity

log = logging.getLogger(__name__)


class Directory:
    """Maps Slack users to hoop identities, with TTL caches."""

    def __init__(self, client: AsyncWebClient, config: HoopConfig, clock: Clock,
                 ttl: timedelta = timedelta(minutes=5)) -> None:
        self.client = client
        self.config = config
        self.clock = clock
        self.ttl = ttl
        self._users: dict[str, tuple[datetime, str | None, str]] = {}
        self._groups: dict[str, tuple[datetime, frozenset[str]]] = {}
        self._by_email: dict[str, tuple[datetime, str | None]] = {}

    async def identify(self, user_id: str) -> Identity:
        """The identity of a Slack user. Raises :class:`Denied` (``unmapped``) when the user
        has no email hoop can see, and :class:`UpstreamError` when Slack fails."""
        email, name = await self._user(user_id)
        if not email:
            raise Denied("hoop cannot map your Slack account to an email address (no email on your "
                         "Slack profile, or the app lacks users:read.email), so it cannot act for you",
                         code="unmapped")
        member_of = [ug for ug in self._configured_usergroups() if user_id in await self._members(ug)]
        groups = policy.groups_of(self.config, email, member_of)
        return Identity(email=email, name=name, groups=groups, slack_id=user_id)

    async def user_id_for(self, email: str) -> str | None:
        """The Slack user id for an email (break-glass DMs), or None."""
        now = self.clock.now()
        hit = self._by_email.get(email.lower())
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            resp = await self.client.users_lookupByEmail(email=email)
            uid: str | None = resp["user"]["id"]
        except SlackApiError:
            uid = None
        self._by_email[email.lower()] = (now + self.ttl, uid)
        return uid

    def _configured_usergroups(self) -> list[str]:
        return sorted({g.slack_usergroup for g in self.config.groups.values() if g.slack_usergroup})

    async def _user(self, user_id: str) -> tuple[str | None, str]:
        now = self.clock.now()
        hit = self._users.get(user_id)
        if hit is not None and hit[0] > now:
            return hit[1], hit[2]
        try:
            resp = await self.client.users_info(user=user_id)
        except SlackApiError as exc:
            if exc.response.get("error") == "user_not_found":
                raise Denied("Slack does not know your user id, so hoop cannot act for you",
                             code="unmapped") from None
            raise UpstreamError(f"Slack users.info failed: {exc.response.get('error')}") from None
        user = resp["user"]
        profile = user.get("profile") or {}
        email = profile.get("email")
        name = profile.get("real_name") or user.get("real_name") or user.get("name") or user_id
        result = (email.strip().lower() if email else None, str(name))
        self._users[user_id] = (now + self.ttl, *result)
        return result

    async def _members(self, usergroup: str) -> frozenset[str]:
        now = self.clock.now()
        hit = self._groups.get(usergroup)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            resp = await self.client.usergroups_users_list(usergroup=usergroup)
        except SlackApiError as exc:
            # Neither "nobody is in it" (an approver would be told they are none, for a whole TTL)
            # nor the last answer (someone removed from the group would keep approving): a failure
            # is said as one, and the next gesture asks Slack again.
            error = exc.response.get("error")
            log.warning("usergroups.users.list %s failed: %s", usergroup, error)
            raise UpstreamError(f"Slack could not say who is in user group {usergroup} ({error}), so hoop cannot "
                                "tell your groups; try again in a moment") from None
        members = frozenset(resp.get("users") or [])
        self._groups[usergroup] = (now + self.ttl, members)
        return members
