"""App Home: my pending requests, my active grants with time left, requests waiting for me."""

from __future__ import annotations

from slack_sdk.web.async_client import AsyncWebClient

from bot import views
from bot.identity import Directory
from broker import policy
from broker.errors import HoopError
from broker.model import GrantStatus, RequestStatus
from broker.service import Service


class Home:
    def __init__(self, service: Service, directory: Directory, client: AsyncWebClient) -> None:
        self.service = service
        self.directory = directory
        self.client = client

    async def publish(self, user_id: str) -> None:
        """Render and publish the App Home of one Slack user (``views.publish``)."""
        try:
            who = await self.directory.identify(user_id)
        except HoopError as exc:
            view = {"type": "home", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": exc.message}}]}
            await self.client.views_publish(user_id=user_id, view=view)
            return
        async with self.service.store.tx() as tx:
            mine = await tx.list_requests(status=RequestStatus.PENDING, requester=who.email, limit=50)
            grants = await tx.list_grants(status=GrantStatus.ACTIVE, identity=who.email, limit=50)
            pending = await tx.list_requests(status=RequestStatus.PENDING, limit=500)
        waiting = []
        teams = policy.team_members(self.service.config)
        for req in pending:
            try:
                policy.assign(req, who, teams)
            except HoopError:
                continue
            waiting.append(req)
        now = self.service.clock.now()
        await self.client.views_publish(user_id=user_id, view=views.home_view(mine, grants, waiting, now))
