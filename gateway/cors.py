"""Cross-origin requests from browsers (``--cors-origins``).

A web page served from another origin (a demo on localhost:3000, an app calling the
OpenAI-compatible routes with the OpenAI JS client) may only read the gateway's answers if
they say its origin may, and may only send a JSON body or an ``Authorization`` header after a
preflight ``OPTIONS`` is answered yes. Off by default: with no origin listed, answers carry no
CORS header and browsers keep other origins out, as before.

With origins listed, a request from one of them gets ``Access-Control-Allow-Origin`` on
every answer, errors included (so the page can read why), with the batching headers exposed
to it; a preflight from one is answered 204 before the API key is checked (browsers send
preflights without credentials), and one from any other origin 403 ``origin_not_allowed``,
which names the flag, instead of an answer a browser reports only as a CORS failure.
"""

from __future__ import annotations

import argparse
import re
from urllib.parse import urlsplit

from aiohttp import web

from protocol.errors import OriginNotAllowed

#: Answer headers a cross-origin page may read, besides the CORS-safelisted ones.
EXPOSED_HEADERS = ", ".join(("X-Request-Id", "X-Batch-Size", "X-Batch-Tokens",
                             "X-Queue-Time-Ms", "X-Inference-Time-Ms", "Server-Timing",
                             "Retry-After"))
ALLOWED_METHODS = "GET, HEAD, POST"
#: How long a browser may cache a preflight's answer.
MAX_AGE_S = 600
DEFAULT_PORTS = {"http": 80, "https": 443}
_HEADER_LIST = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")


def origins(text: str) -> tuple[str, ...]:
    """``--cors-origins``: ``*``, or a comma-separated list of origins such as
    ``https://app.example.com,http://localhost:3000``."""
    listed = tuple(part.strip() for part in text.split(",") if part.strip())
    if listed == ("*",):
        return listed
    normalized = []
    for origin in listed:
        parts = urlsplit(origin)
        if (parts.scheme not in ("http", "https") or not parts.hostname
                or parts.path not in ("", "/") or parts.query or parts.fragment
                or parts.username or parts.password):
            raise argparse.ArgumentTypeError(
                f"{origin!r} is not an origin: give scheme://host[:port] (no path), or * alone")
        netloc = parts.netloc.lower()
        if parts.port == DEFAULT_PORTS[parts.scheme]:
            # Browsers leave a default port out of Origin: kept in, it matched no page.
            netloc = netloc.rsplit(":", 1)[0]
        normalized.append(f"{parts.scheme}://{netloc}")
    return tuple(normalized)


class Cors:
    """The app's CORS policy for the origins of ``--cors-origins``."""

    def __init__(self, allowed: tuple[str, ...]):
        self.any = allowed == ("*",)
        self.allowed = frozenset(allowed)

    def allows(self, origin: str) -> bool:
        return self.any or origin.lower() in self.allowed

    @staticmethod
    def is_preflight(request: web.Request) -> bool:
        return (request.method == "OPTIONS" and "Origin" in request.headers
                and "Access-Control-Request-Method" in request.headers)

    def answer_preflight(self, request: web.Request) -> web.Response:
        """The answer to a preflight, which the error middleware gives ahead of the routes
        and the API key."""
        origin = request.headers["Origin"]
        if not self.allows(origin):
            raise OriginNotAllowed(f"origin {origin!r} may not call this server from a browser; "
                                   "add it to --cors-origins")
        headers = {"Access-Control-Allow-Methods": ALLOWED_METHODS,
                   "Access-Control-Max-Age": str(MAX_AGE_S)}
        # The headers a page asks to send are allowed as asked (the OpenAI JS client adds its
        # own x-stainless-*): the gateway reads only those it knows, and ignores the rest.
        # Empty items ("content-type,,authorization") are skipped, not a reason to allow none.
        asked = ", ".join(name.strip() for name in
                          request.headers.get("Access-Control-Request-Headers", "").split(",")
                          if name.strip())
        if asked and _HEADER_LIST.match(asked):
            headers["Access-Control-Allow-Headers"] = asked
        return web.Response(status=204, headers=headers)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every answer to an allowed origin says so (errors too, so the page reads why)."""
        if not self.any:
            # Answers differ by origin, the one without an Origin too: a shared cache that
            # stored that one would hand it to pages of allowed origins, which then fail.
            response.headers.add("Vary", "Origin")
        origin = request.headers.get("Origin")
        if origin is None:
            return
        if self.allows(origin):
            response.headers["Access-Control-Allow-Origin"] = "*" if self.any else origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
