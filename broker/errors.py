"""One exception root for hoop, with families grouped by who is at fault.

- the caller: :class:`Denied`, :class:`NotFound`, :class:`Conflict`, :class:`InvalidTransition`,
  :class:`InvalidInput`;
- a peer that spoke badly: :class:`PeerProtocolError`;
- a dependency that failed: :class:`UpstreamError`;
- the operator: :class:`ConfigError`.

Errors carry what the peer needs (SQLSTATE, HTTP status). Never branch on message text.
"""

from __future__ import annotations


class HoopError(Exception):
    """Root of every error hoop raises on purpose."""

    http_status = 500
    sqlstate = "XX000"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: a short stable machine-readable reason, e.g. ``"expired"``; never the message text
        self.code = code or type(self).__name__.lower()


class CallerError(HoopError):
    """The caller asked for something it may not or cannot have."""

    http_status = 400


class Denied(CallerError):
    """Not allowed: policy, authentication or authorisation refused it."""

    http_status = 403
    sqlstate = "28000"


class NotFound(CallerError):
    http_status = 404
    sqlstate = "42704"


class Conflict(CallerError):
    """The thing exists but is in a state that forbids the operation."""

    http_status = 409
    sqlstate = "55000"


class InvalidTransition(Conflict):
    """An illegal lifecycle move: raised by ``lifecycle.step`` and never ignored."""


class InvalidInput(CallerError):
    """Malformed input from a person: a bad duration, an unknown resource name, ..."""

    http_status = 422
    sqlstate = "22023"


class PeerProtocolError(HoopError):
    """A client or server spoke its protocol badly."""

    http_status = 400
    sqlstate = "08P01"


class UpstreamError(HoopError):
    """A dependency (database, host, Slack, identity provider) failed."""

    http_status = 502
    sqlstate = "08006"


class StoreUnavailable(UpstreamError):
    """hoop's own store cannot be reached or logged in to."""


class ConfigError(HoopError):
    """The configuration is invalid. ``str()`` names the file, key path and reason."""
