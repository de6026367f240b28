"""Connection details shown to the requester with their secret (by DM, or by the CLI)."""

from __future__ import annotations

from broker.config import HoopConfig
from broker.model import Grant


def connection_hints(config: HoopConfig, grant: Grant, secret: str) -> dict[str, str]:
    """Per resource kind: a ``psql`` connection string, an ``ssh`` command or a ``curl`` example."""
    host = config.listen.advertise or config.listen.host
    out: dict[str, str] = {"login": grant.login}
    for name in grant.resources:
        res = config.resource(name)
        if res is None:
            continue
        if res.kind == "postgres":
            out[name] = (f"PGPASSWORD='{secret}' psql \"host={host} port={config.listen.postgres} "
                         f"user={grant.login} dbname={name} sslmode=prefer\"")
        elif res.kind == "ssh":
            out[name] = f"ssh -p {config.listen.ssh} {grant.login}@{host}   # password: the secret"
        else:  # https when the proxy serves it (tls.http_proxy): a bearer secret sent to http:// would leak
            scheme = "https" if config.tls.http_proxy else "http"
            out[name] = (f"curl -H 'Authorization: Bearer {secret}' "
                         f"{scheme}://{host}:{config.listen.http_proxy}/{name}/")
    return out
