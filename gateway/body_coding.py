"""Request bodies sent in a ``Content-Encoding``: decoded whole, and refused unless whole.

aiohttp inflates a compressed body as it arrives, and takes a gzip stream that stops short
(a client that never closed its compressor, or cut the stream at a buffer's end) for the
text before the cut: the model answered a prefix of the client's input, with a 200. The
gateway reads such a body as it came (``auto_decompress=False``,
:func:`gateway.app.runner_settings`) and decodes it here: a stream that does not end where
the body ends is a 400, and one that inflates past ``--max-body-bytes`` is a 413, found
without inflating more than one byte past the limit (2 kB of gzip can be gigabytes).
"""

from __future__ import annotations

import zlib
from typing import Callable

from protocol.errors import BodyTooLarge, UndecodableBody, UnsupportedMediaType

try:  # brotli 1.2 is the first whose process() stops at an output size
    import brotli
    if "output_buffer_limit" not in (brotli.Decompressor.process.__doc__ or ""):
        brotli = None
except ImportError:
    brotli = None

try:
    from compression import zstd  # Python 3.14
except ImportError:
    try:
        from backports import zstd
    except ImportError:
        zstd = None

#: A body with one of these is read as it came.
PLAIN = frozenset({"", "identity"})
#: gzip's members (RFC 1952: a gzip body may be several, concatenated) may be followed by
#: zero bytes, as gzip(1) and Python's gzip module allow.
GZIP_PADDING = b"\0"


class _Cut(Exception):
    """The stream ended before its end."""


def codings() -> frozenset[str]:
    """The Content-Encodings this gateway decodes, here: br and zstd where their libraries
    are installed."""
    found = {"gzip", "x-gzip", "deflate"}
    if brotli is not None:
        found.add("br")
    if zstd is not None:
        found.add("zstd")
    return frozenset(found)


def check_coding(coding: str) -> None:
    """Refuse, before its body is read, a body in a coding the gateway cannot decode (aiohttp
    passes such a body through as it came: the model would read compressed bytes as text)."""
    if coding not in PLAIN and coding not in codings():
        raise UnsupportedMediaType(f"this server does not decode the body's Content-Encoding "
                                   f"{coding!r}; send it uncompressed, or as gzip or deflate")


def decode(body: bytes, coding: str, limit: int) -> bytes:
    """``body`` decoded from ``coding`` (lower case, a coding :func:`check_coding` passed),
    at most ``limit`` bytes of it. An empty body is empty whatever its coding, so that it
    gets its route's own answer for an empty body."""
    if coding in PLAIN or not body:
        return body
    try:
        if coding == "br":
            decoded = _brotli(body, limit)
        elif coding == "zstd":
            decoded = _frames(body, limit, zstd.ZstdDecompressor, zstd.ZstdError)
        elif coding == "deflate":
            # RFC 9110's deflate is zlib's format; some clients send the raw stream, which
            # aiohttp reads too: a zlib stream's first byte names method 8.
            wbits = zlib.MAX_WBITS if _zlib_header(body) else -zlib.MAX_WBITS
            decoded = _frames(body, limit, lambda: zlib.decompressobj(wbits), zlib.error,
                              members=False)
        else:
            decoded = _frames(body, limit, lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
                              zlib.error, padding=GZIP_PADDING)
    except _Cut:
        raise UndecodableBody(
            f"the body's {coding} stream stops before its end ({len(body)} bytes came): "
            "close the compressor before sending what it wrote, or send the body "
            "uncompressed") from None
    if len(decoded) > limit:
        raise BodyTooLarge(f"the body inflates to more than {limit} bytes from its {coding} "
                           f"encoding; this server accepts at most {limit} (--max-body-bytes)")
    return decoded


def _zlib_header(body: bytes) -> bool:
    return len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0


def _frames(body: bytes, limit: int, stream: Callable, error: type[Exception], *,
            members: bool = True, padding: bytes = b"") -> bytes:
    """The streams (gzip members, zstd frames) that make ``body``, decoded one after the
    other, with ``limit + 1`` bytes at most: past that, the caller refuses it."""
    out: list[bytes] = []
    size = 0
    rest = body
    while True:
        decoder = stream()
        try:
            piece = decoder.decompress(rest, limit + 1 - size)
        except error as exc:
            raise _undecodable(exc) from None
        out.append(piece)
        size += len(piece)
        if size > limit:
            break  # what is left is not read: it would only be refused
        if not decoder.eof:
            raise _Cut
        rest = decoder.unused_data
        if padding and not rest.strip(padding):
            break
        if not rest:
            break
        if not members:
            raise UndecodableBody(f"the body goes on for {len(rest)} bytes after the end of "
                                   "its compressed stream; send the stream alone")
    return b"".join(out)


def _brotli(body: bytes, limit: int) -> bytes:
    decoder = brotli.Decompressor()
    try:
        decoded = decoder.process(body, output_buffer_limit=limit + 1)
    except brotli.error as exc:
        raise _undecodable(exc) from None
    if len(decoded) <= limit and not decoder.is_finished():
        raise _Cut
    return decoded


def _undecodable(exc: Exception) -> UndecodableBody:
    why = str(exc).split("\n", 1)[0] or type(exc).__name__
    return UndecodableBody(f"the body does not decompress as its Content-Encoding says "
                            f"({why}); compress it whole, or send it uncompressed")
