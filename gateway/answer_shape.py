"""What every answer of the gateway carries, whoever writes it: the app's routes
(gateway/app.py), aiohttp's handler for requests that do not parse
(gateway/malformed_http.py), and the guard's refusal past --max-connections
(gateway/connections.py), which writes its answer as raw bytes. One place, so that a header
added for one reaches all three."""

from __future__ import annotations

from typing import Any

import orjson

from protocol.errors import BatchwireError

#: On every answer. aiohttp's default Server names the Python and aiohttp versions, which
#: scanners flag as a leak; and answers echo what clients sent (a sequence, a token string),
#: which a browser must not sniff into HTML or script.
ANSWER_HEADERS = {"Server": "batchwire", "X-Content-Type-Options": "nosniff"}


def error_payload(error: BatchwireError, traceback: str | None = None) -> dict[str, Any]:
    """The error shape of every route: ``{"error": {"code", "message"}}`` (with the
    traceback only where --debug asks for it)."""
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if traceback:
        body["traceback"] = traceback
    return {"error": body}


def error_body(error: BatchwireError) -> bytes:
    return orjson.dumps(error_payload(error))
