"""hoop's domain core: config, policy, lifecycle, service, store, audit, scheduler.

It knows no Slack and no sockets; ``broker.cli``, ``broker.commands`` and ``broker.runtime`` (the
composition root) are the only modules that import ``bot`` and ``proxy``.
"""

__version__ = "0.1.0"
