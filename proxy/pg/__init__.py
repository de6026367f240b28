"""PostgreSQL v3 proxy: codec and SCRAM (no I/O), and the asyncio glue.

Public surface: :class:`proxy.pg.server.PgProxy` (``start(host, port) -> port``, ``stop()``),
:class:`proxy.pg.upstream.UpstreamCredentials` (the injection point for per-grant upstream
logins) and :func:`proxy.pg.tls.server_tls`.
"""
