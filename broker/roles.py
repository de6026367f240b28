"""Ephemeral database roles: one PostgreSQL login per grant, for resources with
``credentials: ephemeral``.

When a grant is issued hoop creates ``hoop_<grant id>`` with LOGIN, a random password,
``VALID UNTIL`` the expiry and membership of the configured roles; the PostgreSQL proxy then
logs in upstream as that role. When the grant ends hoop terminates the role's backends,
drops what it owns and drops it. Extension moves ``VALID UNTIL``.

The password is HMAC(key, grant id): random to anyone without hoop's key, never stored, and
the same after a restart, so a restarted hoop can still connect as a live grant's role.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
from collections.abc import Mapping
from pathlib import Path

import asyncpg

from broker.config import HoopConfig, PostgresResource
from broker.errors import UpstreamError
from broker.keyfiles import hex_key
from broker.model import Grant, GrantStatus
from broker.store import Store

log = logging.getLogger(__name__)
PREFIX = "hoop_"
KEY_FILE = "roles.key"


def load_key(state_dir: Path) -> bytes:
    """The key behind role passwords, created (mode 0600) on first use. A folder hoop cannot write, or a
    key file that is not one, is a :class:`~broker.errors.ConfigError` naming it."""
    return hex_key(state_dir, KEY_FILE)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class EphemeralRoles:
    """``GrantHooks`` for ephemeral roles, and the proxy's upstream credentials for them."""

    def __init__(self, config: HoopConfig, environ: Mapping[str, str], key: bytes) -> None:
        self.config = config
        self.environ = environ
        self.key = key

    def role_name(self, grant: Grant) -> str:
        return PREFIX + grant.id

    def password(self, grant_id: str) -> str:
        return base64.urlsafe_b64encode(hmac.new(self.key, grant_id.encode(), hashlib.sha256).digest()).decode()

    def _resources(self, grant: Grant) -> list[PostgresResource]:
        out = []
        for name in grant.resources:
            res = self.config.resource(name)
            if isinstance(res, PostgresResource) and res.credentials == "ephemeral":
                out.append(res)
        return out

    async def _admin(self, res: PostgresResource) -> asyncpg.Connection:
        assert res.admin_credential is not None
        host, port = res.host_port(5432)
        try:
            return await asyncpg.connect(host=host, port=port, user=res.admin_user or res.user,
                                         password=res.admin_credential.resolve(self.environ), database=res.database,
                                         ssl=None if res.sslmode in ("disable", "prefer") else "require",
                                         timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            raise UpstreamError(f"{res.name}: cannot connect as admin to manage ephemeral roles "
                                f"({type(exc).__name__})") from None

    async def issued(self, grant: Grant) -> str | None:
        resources = self._resources(grant)
        if not resources:
            return None
        role = self.role_name(grant)
        for res in resources:
            conn = await self._admin(res)
            try:
                members = ", ".join(_ident(r) for r in res.roles)
                password = self.password(grant.id)
                await self._execute(conn, res, f"creating role {role}",
                                    f"CREATE ROLE {_ident(role)} LOGIN PASSWORD {_literal(password)} "
                                    f"VALID UNTIL {_literal(grant.expires_at.isoformat())} IN ROLE {members}",
                                    secret=password)
            finally:
                await conn.close()
            log.info("grant=%s created ephemeral role %s on %s", grant.id, role, res.name)
        return role

    async def extended(self, grant: Grant) -> None:
        for res in self._resources(grant):
            conn = await self._admin(res)
            try:
                await self._execute(conn, res, f"moving the end of role {self.role_name(grant)}",
                                    f"ALTER ROLE {_ident(self.role_name(grant))} "
                                    f"VALID UNTIL {_literal(grant.expires_at.isoformat())}")
            finally:
                await conn.close()

    async def ended(self, grant: Grant) -> None:
        for res in self._resources(grant):
            await self._drop(res, self.role_name(grant))

    @staticmethod
    async def _execute(conn: asyncpg.Connection, res: PostgresResource, what: str, sql: str,
                       secret: str | None = None) -> None:
        """Run ``sql``; a failure is an :class:`UpstreamError` saying what failed and the database's reason
        (``secret``, a password in ``sql``, is never in it)."""
        try:
            await conn.execute(sql)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            why = str(exc) if isinstance(exc, asyncpg.PostgresError) else type(exc).__name__
            if secret:
                why = why.replace(secret, "[secret]")
            raise UpstreamError(f"{res.name}: {what} failed: {why}") from None

    async def _drop(self, res: PostgresResource, role: str) -> None:
        conn = await self._admin(res)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
            if not exists:
                return
            what = f"dropping role {role}"
            await self._execute(conn, res, what, f"ALTER ROLE {_ident(role)} NOLOGIN")
            # pg_terminate_backend only signals: wait (bounded) until the backends are gone, or their
            # temporary objects would still depend on the role when it is dropped
            for _ in range(100):
                left = await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1", role)
                if not left:
                    break
                await asyncio.sleep(0.05)
            admin = res.admin_user or res.user
            await self._execute(conn, res, what, f"REASSIGN OWNED BY {_ident(role)} TO {_ident(admin)}")
            await self._execute(conn, res, what, f"DROP OWNED BY {_ident(role)}")
            await self._execute(conn, res, what, f"DROP ROLE {_ident(role)}")
            log.info("dropped ephemeral role %s on %s", role, res.name)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:  # (the reads above)
            raise UpstreamError(f"{res.name}: dropping role {role} failed: {type(exc).__name__}") from None
        finally:
            await conn.close()

    async def reconcile(self, store: Store) -> list[str]:
        """Drop roles whose grants ended while hoop was down. Returns the roles dropped.

        Only the role of a grant this store holds as ended is dropped. A ``hoop_…`` role whose grant the
        store does not know is not this hoop's to drop: a membership role an operator named so, or a live
        grant's role of another hoop using the same server (a role is made only after its grant is stored,
        so this hoop's own roles always have one)."""
        dropped: list[str] = []
        for res in self.config.resources:
            if not isinstance(res, PostgresResource) or res.credentials != "ephemeral":
                continue
            conn = await self._admin(res)
            try:
                names = [r["rolname"] for r in await conn.fetch(
                    "SELECT rolname FROM pg_roles WHERE rolname LIKE 'hoop\\_%' ORDER BY rolname")]
            finally:
                await conn.close()
            for name in names:
                if name in res.roles:
                    continue
                async with store.tx() as tx:
                    grant = await tx.get_grant(name.removeprefix(PREFIX))
                if grant is None:
                    log.info("role %s on %s is not a grant of this hoop's store: left alone", name, res.name)
                elif grant.status is not GrantStatus.ACTIVE:
                    try:
                        await self._drop(res, name)
                    except UpstreamError as exc:  # (the next start tries again; it can no longer log in)
                        log.error("%s", exc.message)
                        continue
                    dropped.append(name)
        return dropped

    async def for_grant(self, resource: PostgresResource, grant: Grant) -> tuple[str, str]:
        """Upstream (user, password) for the PostgreSQL proxy on an ephemeral resource."""
        return self.role_name(grant), self.password(grant.id)
