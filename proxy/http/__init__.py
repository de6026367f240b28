"""The HTTP proxy: aiohttp reverse proxy with the credential swap, guard, masking and recording."""

from proxy.http.server import HttpProxy

__all__ = ["HttpProxy"]
