"""Use cases: request, approve, deny, cancel, lapse, grant, extend, revoke, expire, break-glass,
and the single access check the proxies call (delegation is in ``broker/delegation.py``).

Every use case is one store transaction that changes state through ``lifecycle.step``,
appends an audit entry, and, after commit, publishes events to the :class:`Notifier`.
Secrets are minted here and leave only inside :class:`GrantIssued` (and the return value).

:class:`Service` is composed of one class per area: ``requests`` (requests and approvals),
``grants`` (break-glass, extension, revocation, expiry, reminders) and ``access`` (the access
check). ``core`` holds the collaborators and the steps more than one area takes.
"""

from broker.service.access import AccessCheck
from broker.service.core import SYSTEM, ApproveResult, GrantHooks, NoHooks, new_id
from broker.service.grants import GrantUseCases
from broker.service.requests import RequestUseCases


class Service(RequestUseCases, GrantUseCases, AccessCheck):
    """The broker's use cases, built once by the composition root from config, store, clock,
    notifier and (optionally) the grant hooks."""


__all__ = ["SYSTEM", "ApproveResult", "GrantHooks", "NoHooks", "Service", "new_id"]
