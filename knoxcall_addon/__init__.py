"""KnoxCall for mitmproxy: client IP authorization per route and environment."""

__version__ = "0.1.0"
