"""The ``hoop`` command's parts, put together by :mod:`broker.cli`: the plumbing every command shares
(:mod:`~broker.commands.base`), the read-only listings (:mod:`~broker.commands.lists`) and the audit log
commands (:mod:`~broker.commands.audit`). With ``broker.cli`` and ``broker.runtime`` they are the
composition root, the part of ``broker`` that may import ``bot`` and ``proxy``."""
