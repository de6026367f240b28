"""The guard's common vocabulary: the :class:`Decision` and how rules produce one.

How this works: each protocol guard (:mod:`proxy.sqlguard`, :mod:`proxy.shellguard`,
:mod:`proxy.httpguard`) turns its input into one or more *units* (a SQL statement, a simple
shell command, one HTTP request) and asks :func:`decide` about each unit with a predicate
that says whether a :class:`~broker.config.Rule` matches it. Rules are tried in order and the
first match decides; no match means ``guardrails.default``. A rule whose non-empty selectors
belong to another protocol never matches (a ``commands`` rule says nothing about SQL). The
decisions of several units are folded with :func:`strictest` (block > review > allow; on a
tie the earlier unit names the decision). Every guard fails closed: a failure to classify is
:func:`unparsed`, which applies ``guardrails.on_unparsed`` under the rule name
``"on_unparsed"``. Everything here is pure: no I/O, no clocks, no globals that change.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

from broker.config import Action, Guardrails, Rule

__all__ = [
    "ON_UNPARSED",
    "Decision",
    "decide",
    "glob",
    "name_matches",
    "rank",
    "strictest",
    "unparsed",
]

#: the rule name a decision carries when the input could not be classified
ON_UNPARSED = "on_unparsed"

_RANK: dict[Action, int] = {"allow": 0, "review": 1, "block": 2}
_VERB: dict[Action, str] = {"allow": "allows", "review": "holds for review", "block": "blocks"}


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one input (a query string, a command line, a request).

    ``rule`` is the name of the rule that decided, ``None`` when ``guardrails.default`` did,
    or ``"on_unparsed"`` when the input could not be classified. ``subject`` names the unit
    that caused the decision without quoting literals (``"DROP TABLE"``, ``"rm -rf /"``,
    ``"DELETE /api/v1/x"``) and ``index`` is its 0-based position in the input. ``kinds``,
    ``tables`` and ``functions`` describe the deciding unit (SQL; for shell, ``kinds`` holds
    the program names), for recording.
    """

    action: Action
    rule: str | None
    reason: str
    subject: str = ""
    index: int = 0
    kinds: frozenset[str] = frozenset()
    tables: frozenset[str] = frozenset()
    functions: frozenset[str] = frozenset()

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    @property
    def needs_review(self) -> bool:
        return self.action == "review"


def rank(action: Action) -> int:
    """Strictness of an action: allow 0 < review 1 < block 2."""
    return _RANK[action]


def strictest(decisions: Iterable[Decision]) -> Decision:
    """The strictest of ``decisions``; on a tie, the first. Raises ``ValueError`` if empty."""
    best: Decision | None = None
    for d in decisions:
        if best is None or _RANK[d.action] > _RANK[best.action]:
            best = d
    if best is None:
        raise ValueError("no decisions to fold")
    return best


def unparsed(guardrails: Guardrails, why: str, subject: str = "", index: int = 0) -> Decision:
    """The fail-closed decision for input that could not be classified."""
    action = guardrails.on_unparsed
    return Decision(action, ON_UNPARSED, f"{_VERB[action]} unclassifiable input: {why}", subject, index)


def decide(
    guardrails: Guardrails,
    matches: Callable[[Rule], bool],
    subject: str,
    *,
    index: int = 0,
    kinds: frozenset[str] = frozenset(),
    tables: frozenset[str] = frozenset(),
    functions: frozenset[str] = frozenset(),
) -> Decision:
    """Decide one unit: the first rule for which ``matches`` is true, else the default."""
    for rule in guardrails.rules:
        if matches(rule):
            reason = f'rule "{rule.name}" {_VERB[rule.action]} {subject}'
            return Decision(rule.action, rule.name, reason, subject, index, kinds, tables, functions)
    action = guardrails.default
    return Decision(action, None, f"default {_VERB[action]} {subject}", subject, index, kinds, tables, functions)


@lru_cache(maxsize=1024)
def glob(pattern: str) -> re.Pattern[str]:
    """A compiled, case-insensitive fnmatch glob (``*``, ``?``, ``[...]``)."""
    return re.compile(fnmatch.translate(pattern), re.IGNORECASE | re.DOTALL)


def name_matches(pattern: str, name: str) -> bool:
    """Match a possibly qualified name (``public.orders``) against a glob, failing closed.

    An unqualified pattern (``orders``) matches the last part of any name, so ``orders``
    matches ``orders``, ``public.orders`` and ``db.public.orders``. A qualified pattern
    (``public.orders``) matches a name qualified the same way, and also an *unqualified*
    name whose last part matches: the search path decides where ``orders`` resolves, and the
    client can change it, so the guard assumes the worst.
    """
    p_parts = pattern.split(".")
    n_parts = name.split(".")
    if len(p_parts) == 1 or len(n_parts) == 1:
        return glob(p_parts[-1]).match(n_parts[-1]) is not None
    k = min(len(p_parts), len(n_parts))
    return all(glob(p).match(n) is not None for p, n in zip(p_parts[-k:], n_parts[-k:], strict=True))
