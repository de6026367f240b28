"""The PostgreSQL listener: TLS, start-up, client authentication, upstream login, CancelRequest.

How this works. Every accepted connection starts in a :class:`~proxy.pg.upstream.Reader`
and one task runs its set-up as plain async code, inside ``asyncio.timeout``:

1. SSLRequest is answered ``S`` and TLS starts (``N`` without TLS); GSSENCRequest gets ``N``;
   a CancelRequest is looked up in the table of live connections and sent to the upstream
   backend it stands for, or, when no session here holds its key, handed to the other
   replicas as a digest (:mod:`proxy.pg.cancel`); a newer protocol minor gets
   NegotiateProtocolVersion.
2. The client logs in with user = grant login, database = resource name, password = grant
   secret: SCRAM-SHA-256 against the grant's stored verifier (a mock verifier for unknown
   logins, so both fail alike and as slowly), or a cleartext password inside TLS when
   ``allow_cleartext``. Then the broker's access check (:meth:`Gate.authorize`) runs.
3. The hub opens the session; hoop logs in upstream with the held credential and hands the
   client the upstream's ParameterStatus, its own BackendKeyData and ReadyForQuery.
4. :class:`~proxy.pg.relay.Relay` takes both transports over.

Refusals are ErrorResponses: 28P01 (bad secret / unknown login), 28000 (expired, revoked,
other resource), 08006 (the database is unreachable or refused hoop; never with its secret),
08P01 (protocol violations), 42501 (a start-up parameter hoop does not pass on).

Start-up parameters. Each one becomes a setting of the upstream session with the client's
priority, so only harmless ones are passed on, including those in ``options``
(:mod:`proxy.pg.params`); any other is refused before anything else happens. hoop then pins
upstream what its SQL guard assumes:
``client_encoding=UTF8`` and ``standard_conforming_strings=on`` (pglast reads SQL exactly so;
a login where the server reports otherwise is refused, and so is a later change, see
:mod:`proxy.pg.replies`), and ``options=-c default_transaction_read_only=on`` for a read-only
resource. A client's ``client_encoding`` is accepted when it means UTF-8 (or SQL_ASCII, which
asks for no conversion at all) and is then served by the pin.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from broker.clock import Clock
from broker.config import HoopConfig, PostgresResource
from broker.errors import Denied, HoopError, UpstreamError
from broker.model import Grant
from proxy.guard import Decision
from proxy.mask import Masker
from proxy.pg import codec, upstream
from proxy.pg.cancel import CancelKeys, CancelPeers, could_be_ours
from proxy.pg.inspect import Inspector, Stmt
from proxy.pg.messages import Frontend, decode_password, decode_sasl_initial_response
from proxy.pg.params import Refusal as _Refusal
from proxy.pg.params import startup_params
from proxy.pg.relay import CLOSE_GRACE, Relay
from proxy.pg.replies import PINNED, unsafe_parameter
from proxy.pg.rows import Catalog, Table, needs_catalog
from proxy.pg.scram import ScramAuthFailed, ScramServer, parse_verifier
from proxy.pg.tls import ServerTls, server_tls
from proxy.pg.upstream import Reader, StaticCredentials, UpstreamCredentials
from proxy.sqlguard import SqlGuard

log = logging.getLogger(__name__)

_ids = itertools.count(1)


class _Accepted(Reader):
    def __init__(self, proxy: PgProxy) -> None:
        super().__init__()
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.proxy._accept(self)


#: what a cancel key stands for: the resource, the upstream backend's pid and key, the connection's log name
_Target = tuple[PostgresResource, int, bytes, str]


class PgProxy:
    """hoop's PostgreSQL endpoint for every ``kind: postgres`` resource of ``config``.

    ``peers`` are the other replicas: a CancelRequest for a session not held here goes to them
    (as a digest; ``None``, one process, drops it as before). ``hash_key`` must be the same on
    every replica: the cancel digests are keyed from it too.
    """

    def __init__(self, config: HoopConfig, gate: Any, hub: Any, clock: Clock, environ: Mapping[str, str], *,
                 state_dir: Path | None = None, tls: ServerTls | None = None,
                 credentials: UpstreamCredentials | None = None, hash_key: bytes | None = None,
                 allow_cleartext: bool = False, setup_timeout: float = 30.0,
                 peers: CancelPeers | None = None) -> None:
        self.config = config
        self.gate = gate
        self.hub = hub
        self.clock = clock
        self.environ = environ
        self.tls = tls if tls is not None else server_tls(config.tls, state_dir or config.state_dir)
        self.credentials: UpstreamCredentials = credentials or StaticCredentials(environ)
        if hash_key is None:
            hash_key = (config.masking_key.resolve(environ).encode() if config.masking_key
                        else secrets.token_bytes(32))
        self.allow_cleartext = allow_cleartext
        self.setup_timeout = setup_timeout
        #: seconds a session's sides have, once it ended, to take in what is queued for them (then reset)
        self.close_grace = CLOSE_GRACE
        self._guards: dict[str, SqlGuard] = {}
        self._maskers: dict[str, Masker] = {}
        self._catalogs: dict[str, Catalog] = {}
        for res in config.resources:
            if isinstance(res, PostgresResource):
                self._guards[res.name] = SqlGuard(res.guardrails, masking=res.masking)
                self._maskers[res.name] = Masker(res.masking, hash_key)
                if needs_catalog(self._maskers[res.name]):
                    self._catalogs[res.name] = Catalog(self._lookup_for(res))
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._relays: set[Relay] = set()
        self.peers = peers
        self._cancel: CancelKeys[_Target] = CancelKeys(hash_key)
        self._cancel_keys: dict[Relay, tuple[int, bytes]] = {}
        self._foreign_keys: set[str] = set()  # key ids of other replicas' cancel digests already warned of

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (``port`` 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Accepted(self), host, port, backlog=1024)
        bound = int(self._server.sockets[0].getsockname()[1])
        log.info("PostgreSQL proxy listening on %s:%d", host, bound)
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for relay in list(self._relays):
            relay.end("hoop is shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        done = [r.done for r in self._relays]
        if done:
            await asyncio.wait(done, timeout=5)
        left = [r for r in self._relays if not r.done.done()]
        for relay in left:
            relay.give_up_cancel()
        if left:
            await asyncio.wait([r.done for r in left], timeout=1)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _accept(self, reader: _Accepted) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(reader))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- set-up -------------------------------------------------------------------------

    async def _handle(self, reader: Reader) -> None:
        assert reader.transport is not None
        peer = reader.transport.get_extra_info("peername")
        addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        conn = f"pg{next(_ids)}"
        try:
            async with asyncio.timeout(self.setup_timeout):
                await self._setup(reader, addr, conn)
        except HoopError as exc:
            self._refuse(reader, exc.sqlstate, exc.message)
        except TimeoutError:
            self._refuse(reader, "08006", "hoop: start-up took too long")
        except (ConnectionError, ssl.SSLError, OSError):
            if reader.transport is not None:
                reader.transport.close()

    def _refuse(self, reader: Reader, sqlstate: str, message: str) -> None:
        transport = reader.transport
        if transport is not None and not transport.is_closing():
            transport.write(codec.encode_error(sqlstate, message, severity="FATAL"))
            transport.close()

    async def _setup(self, reader: Reader, addr: str, conn: str) -> None:
        loop = asyncio.get_running_loop()
        tls_on = False
        while True:
            packet = await reader.startup()
            if isinstance(packet, codec.SSLRequest) and not tls_on:
                if reader.buf:  # bytes after SSLRequest would be read as plaintext: refuse
                    raise HoopError("hoop: unexpected data after SSLRequest", code="08P01")
                reader.write(b"S")
                assert reader.transport is not None
                new = await loop.start_tls(reader.transport, reader, self.tls.context, server_side=True)
                assert new is not None
                reader.transport = new
                tls_on = True
            elif isinstance(packet, codec.GSSENCRequest):
                reader.write(b"N")
            elif isinstance(packet, codec.CancelRequest):
                await self._cancel_request(packet, reader)
                assert reader.transport is not None
                reader.transport.close()
                return
            elif isinstance(packet, codec.StartupMessage):
                break
            else:
                raise HoopError("hoop: unexpected start-up packet", code="08P01")
        params = packet.params
        if packet.needs_negotiation:
            reader.write(codec.encode_negotiate_protocol_version(codec.SUPPORTED_MINOR, packet.protocol_options))
        login, database = params.get("user", ""), params.get("database") or params.get("user", "")
        if not login:
            raise _Refusal("28000", "hoop: no user name given: use the grant's login")
        if params.get("replication", "false").lower() not in ("false", "0", "off", "no"):
            raise _Refusal("28000", "hoop: replication connections are not allowed")
        try:
            passed = startup_params(params)
        except _Refusal as exc:
            log.info("conn=%s user=%s refused at start-up: %s", conn, login, exc.message)
            raise
        grant = await self._authenticate(reader, login, database, tls_on)
        resource = self.config.resource(database)
        assert isinstance(resource, PostgresResource)  # authorize() accepted the name
        await self._open(reader, grant, resource, passed, addr, conn)

    async def _authenticate(self, reader: Reader, login: str, database: str, tls_on: bool) -> Grant:
        if self.allow_cleartext and tls_on:
            reader.write(codec.AUTH_CLEARTEXT_PASSWORD)
            msg_type, body = await reader.message()
            if msg_type != Frontend.PASSWORD:
                raise _Refusal("08P01", "hoop: expected a password message")
            try:
                grant: Grant = await self.gate.authenticate(login, decode_password(body), database)
            except Denied as exc:
                raise self._denied(exc, login) from None
            reader.write(codec.AUTH_OK)
            return grant
        found, verifier_text = await self.gate.scram_lookup(login)
        server = ScramServer(parse_verifier(verifier_text),
                             channel_binding=self.tls.end_point if tls_on else None)
        reader.write(codec.encode_auth_sasl(server.mechanisms))
        msg_type, body = await reader.message()
        if msg_type != Frontend.PASSWORD:
            raise _Refusal("08P01", "hoop: expected a SASLInitialResponse")
        first = decode_sasl_initial_response(body)
        reader.write(codec.encode_auth_sasl_continue(server.handle_client_first(first.mechanism, first.data)))
        msg_type, body = await reader.message()
        if msg_type != Frontend.PASSWORD:
            raise _Refusal("08P01", "hoop: expected a SASLResponse")
        try:
            final = server.handle_client_final(body)
            if found is None:
                raise Denied("unknown login", code="bad_credentials")
            grant = self.gate.authorize(found, database)
        except (ScramAuthFailed, Denied) as exc:
            raise self._denied(exc, login) from None
        reader.write(codec.encode_auth_sasl_final(final) + codec.AUTH_OK)
        return grant

    def _denied(self, exc: Denied, login: str) -> _Refusal:
        if exc.code in ("bad_credentials", "bad_password"):
            return _Refusal("28P01", f'hoop: password authentication failed for user "{login}"')
        return _Refusal("28000", f"hoop: {exc.message}")

    async def _open(self, reader: Reader, grant: Grant, resource: PostgresResource, passed: dict[str, str],
                    addr: str, conn: str) -> None:
        relay: Relay | None = None
        ended: list[str] = []

        def on_end(reason: str) -> None:
            if relay is not None:
                relay.end(reason)
            else:
                ended.append(reason)

        session = await self.hub.open(grant, resource.name, "postgres", addr, on_end, detail={"params": passed})
        try:
            user, password = await self.credentials.for_grant(resource, grant)
            pins = dict(PINNED)  # as start-up parameters, which poolers know, rather than in options
            if resource.guardrails.read_only:
                pins["options"] = "-c default_transaction_read_only=on"
            up = await upstream.connect(resource, user, password, {**passed, **pins})
            unsafe = next(filter(None, (unsafe_parameter(k, up.params.get(k, "(not reported)")) for k in PINNED)),
                          None)
            if unsafe is None and "default_transaction_read_only" in up.params:
                unsafe = unsafe_parameter("default_transaction_read_only", up.params["default_transaction_read_only"],
                                          read_only=resource.guardrails.read_only)
            if unsafe is not None:  # e.g. a pooler in between that ignored the pins
                up.transport.close()
                raise UpstreamError(unsafe)
        except HoopError as exc:
            # said to the operator too, and kept as the session's close reason: once only the client heard
            # why (a credential variable missing from hoop serve's environment, a database down), and the
            # session said "the database refused hoop" whatever the cause
            log.warning("conn=%s grant=%s user=%s resource=%s upstream session not opened: %s", conn, grant.id,
                        grant.login, resource.name, exc.message)
            await session.close(f"upstream session not opened: {exc.message}")
            raise _Refusal("08006", f"hoop: {exc.message}") from None
        except BaseException:
            await session.close("set-up interrupted")
            raise
        pid, key = secrets.randbelow(2**31 - 1) + 1, secrets.token_bytes(4)
        hello = [codec.encode_parameter_status(k, v) for k, v in up.params.items()]
        hello += [codec.encode_backend_key_data(pid, key), codec.encode_ready_for_query(up.status)]
        assert reader.transport is not None
        client = reader.transport
        client.write(b"".join(hello))
        masker = self._maskers[resource.name]
        guard = self._guards[resource.name]
        log.info("conn=%s grant=%s user=%s resource=%s client=%s session open", conn, grant.id, grant.login,
                 resource.name, addr)

        async def review(stmt: Stmt, decision: Decision) -> bool:
            timeout = resource.guardrails.review_timeout.total_seconds()
            return bool(await session.review(stmt.text, decision.rule or "default", timeout))

        insp = Inspector(resource, guard, masker, self._catalogs.get(resource.name), session, client.write, review)
        stream_rows = not masker.enabled
        relay = Relay(client, up, insp, session, self.clock, conn=conn, stream_rows=stream_rows,
                      on_closed=self._closed, max_row=resource.max_row_bytes,
                      cancel=lambda: self._cancel_upstream((resource, up.pid, up.key, conn)),
                      close_grace=self.close_grace)
        self._relays.add(relay)
        self._cancel_keys[relay] = (pid, key)
        self._cancel.add(pid, key, (resource, up.pid, up.key, conn))
        if ended or getattr(session, "end_reason", None):
            # the grant ended while hoop logged in upstream: what the client pipelined behind its login is
            # never read (it once reached the server ahead of the Terminate, and ran)
            relay.start(b"", b"")
            relay.end(ended[0] if ended else session.end_reason)
            return
        relay.start(reader.take(), up.reader.take())

    def _closed(self, relay: Relay) -> None:
        self._relays.discard(relay)
        found = self._cancel_keys.pop(relay, None)
        if found is not None:
            self._cancel.remove(*found)

    async def _cancel_request(self, packet: codec.CancelRequest, reader: Reader) -> None:
        target = self._cancel.get(packet.pid, packet.key)
        if target is not None:
            await self._cancel_upstream(target)
            return
        # Not a session of this replica. Like PostgreSQL, answer nothing either way: the client
        # learns only that the connection closed, before the other replicas are asked.
        assert reader.transport is not None
        reader.transport.close()
        if self.peers is not None and could_be_ours(packet.pid, packet.key):
            await self.peers.ask_cancel(self._cancel.digest(packet.pid, packet.key), self._cancel.key_id)

    def cancel_by_digest(self, digest: bytes, key_id: str) -> None:
        """Another replica's CancelRequest: cancel upstream if a session here has that key."""
        if key_id != self._cancel.key_id:
            if key_id not in self._foreign_keys and len(self._foreign_keys) < 16:
                self._foreign_keys.add(key_id)
                log.warning("a replica digests PostgreSQL cancel keys under key id %r, this one under %r: their "
                            "masking keys differ, so a CancelRequest sent to one for a session on the other does "
                            "nothing (share one state_dir Secret made by `hoop state init`, or one masking_key)",
                            key_id, self._cancel.key_id)
            return
        target = self._cancel.by_digest(digest)
        if target is None:
            return
        log.info("conn=%s cancel request received by another replica", target[3])
        task = asyncio.get_running_loop().create_task(self._cancel_upstream(target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel_upstream(self, target: _Target) -> None:
        resource, pid, key, _conn = target
        try:
            await upstream.cancel(resource, pid, key)
        except HoopError as exc:  # (a ConfigError too: an sslrootcert that no longer loads)
            log.warning("cancel for %s failed: %s", resource.name, exc.message)

    def _lookup_for(self, resource: PostgresResource) -> Any:
        async def lookup(oids: list[int]) -> dict[int, Table]:
            user, password = await self.credentials.for_grant(resource, None)
            up = await upstream.connect(resource, user, password, {"application_name": "hoop catalog"})
            try:
                ids = ",".join(str(int(o)) for o in oids)
                rows = await upstream.simple_query(
                    up, "SELECT c.oid, n.nspname || '.' || c.relname, a.attnum, a.attname FROM pg_catalog.pg_class c "
                        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                        "LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 "
                        f"AND NOT a.attisdropped WHERE c.oid IN ({ids})")
                # ancestors: the partitioned tables (or inheritance parents) above each one, nearest first
                up_rows = await upstream.simple_query(
                    up, "WITH RECURSIVE up(child, parent, depth) AS ("
                        f"SELECT inhrelid, inhparent, 1 FROM pg_catalog.pg_inherits WHERE inhrelid IN ({ids}) "
                        "UNION ALL SELECT up.child, i.inhparent, up.depth + 1 FROM up "
                        "JOIN pg_catalog.pg_inherits i ON i.inhrelid = up.parent WHERE up.depth < 32) "
                        "SELECT up.child, n.nspname || '.' || c.relname FROM up "
                        "JOIN pg_catalog.pg_class c ON c.oid = up.parent "
                        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace ORDER BY up.child, up.depth")
            finally:
                up.transport.write(codec.TERMINATE)
                up.transport.close()
            names: dict[int, str] = {}
            columns: dict[int, dict[int, str]] = {}
            for oid, name, attnum, attname in rows:
                key = int(oid or 0)
                names[key] = name or ""
                cols = columns.setdefault(key, {})
                if attnum is not None and attname is not None:
                    cols[int(attnum)] = attname
            parents: dict[int, list[str]] = {}
            for child, parent in up_rows:
                if parent:
                    parents.setdefault(int(child or 0), []).append(parent)
            return {oid: Table(name, columns.get(oid, {}), tuple(parents.get(oid, ()))) for oid, name in names.items()}

        return lookup
