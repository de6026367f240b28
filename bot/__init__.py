"""The Slack bot: Slack payloads -> service calls, and broker events -> Slack.

Public surface: :class:`bot.app.SlackBot` (also a broker ``Notifier``), the pure Block Kit
builders in :mod:`bot.views`, and the ``Reviews`` protocol in :mod:`bot.reactions`.
"""
