"""Compressed request bodies (gateway/body_coding.py): decoded whole, refused unless whole,
and never inflated far past --max-body-bytes."""

from __future__ import annotations

import gzip
import zlib

import pytest

from gateway import body_coding
from gateway.body_coding import check_coding, decode
from protocol.errors import BodyTooLarge, MalformedRequest, UnsupportedMediaType

TEXT = "the whole of a sentence the model must see, not its first half. ".encode() * 20
LIMIT = 1 << 20


def gz(data: bytes) -> bytes:
    """gzip without a time in its header: every test process collects the same test ids."""
    return gzip.compress(data, mtime=0)


def unfinished_gzip(data: bytes) -> bytes:
    """What a client that flushed its gzip compressor but never closed it sent: every byte
    of the text, and no end of stream (no final block, no CRC, no length)."""
    compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


@pytest.mark.parametrize("coding, body", [
    ("gzip", gz(TEXT)),
    ("x-gzip", gz(TEXT)),
    ("gzip", gz(TEXT[:500]) + gz(TEXT[500:])),  # two members
    ("gzip", gz(TEXT) + b"\0" * 7),  # padded, as gzip(1) allows
    ("deflate", zlib.compress(TEXT)),  # RFC 9110's deflate: the zlib format
    ("deflate", zlib.compress(TEXT)[2:-4]),  # the raw stream some clients send
    ("identity", TEXT),
    ("", TEXT),
], ids=["gzip", "x-gzip", "members", "padded", "zlib", "raw-deflate", "identity", "none"])
def test_a_whole_body_decodes_to_what_was_compressed(coding, body):
    check_coding(coding)
    assert decode(body, coding, LIMIT) == TEXT


@pytest.mark.parametrize("coding, body", [
    ("gzip", gz(TEXT)[:-8]),  # no trailer
    ("gzip", gz(TEXT)[:40]),  # cut mid-stream
    ("gzip", unfinished_gzip(TEXT)),
    ("gzip", gz(TEXT) + gz(TEXT)[:30]),  # a second member, cut
    ("deflate", zlib.compress(TEXT)[:-4]),  # the zlib format without its checksum
    ("deflate", zlib.compress(TEXT)[2:30]),
], ids=["no-trailer", "cut", "unclosed", "second-member-cut", "zlib-no-checksum",
        "raw-deflate-cut"])
def test_a_stream_that_stops_short_is_refused_not_taken_for_its_start(coding, body):
    with pytest.raises(MalformedRequest, match="stops before its end"):
        decode(body, coding, LIMIT)


@pytest.mark.parametrize("coding, body, says", [
    ("gzip", gz(TEXT)[:10] + b"not deflate data", "does not decompress"),
    ("gzip", gz(TEXT) + b"garbage", "does not decompress"),
    ("deflate", zlib.compress(TEXT) + b"garbage", "goes on for 7 bytes after the end"),
    ("deflate", TEXT, "does not decompress"),
], ids=["gzip-corrupt", "gzip-garbage-after", "deflate-garbage-after", "deflate-plain"])
def test_a_body_that_is_not_its_coding_is_refused_saying_so(coding, body, says):
    with pytest.raises(MalformedRequest, match=says):
        decode(body, coding, LIMIT)


def test_a_body_that_inflates_past_the_limit_is_413_and_inflated_no_further():
    bomb = gz(bytes(64 << 20))  # 64 MiB of zeros in 64 kB
    calls = []

    class Counting:
        def __init__(self):
            self.inner = zlib.decompressobj(16 + zlib.MAX_WBITS)

        def decompress(self, data, max_length):
            calls.append(max_length)
            return self.inner.decompress(data, max_length)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    # One call, for one byte past the limit: the other 63 MiB are never made.
    assert len(body_coding._frames(bomb, LIMIT, Counting, zlib.error)) == LIMIT + 1
    assert calls == [LIMIT + 1]
    with pytest.raises(BodyTooLarge, match="inflates to more than 1048576 bytes"):
        decode(bomb, "gzip", LIMIT)
    # A body at the limit exactly passes; the second member's first byte past it does not.
    exact = gz(bytes(LIMIT))
    assert len(decode(exact, "gzip", LIMIT)) == LIMIT
    with pytest.raises(BodyTooLarge):
        decode(exact + gz(b"x"), "gzip", LIMIT)


def test_an_empty_body_is_empty_whatever_its_coding():
    """So that it gets its route's own answer for an empty body."""
    assert decode(b"", "gzip", LIMIT) == b""


def test_a_coding_the_gateway_does_not_decode_is_refused_before_its_body_is_read(monkeypatch):
    for coding in ("compress", "gzip, gzip", "zstd" if body_coding.zstd is None else "lzma"):
        with pytest.raises(UnsupportedMediaType, match="does not decode the body's"):
            check_coding(coding)
    monkeypatch.setattr(body_coding, "brotli", None)
    with pytest.raises(UnsupportedMediaType, match="'br'"):
        check_coding("br")


def test_brotli_whole_cut_and_past_the_limit():
    brotli = pytest.importorskip("brotli", minversion="1.2")
    packed = brotli.compress(TEXT)
    check_coding("br")
    assert decode(packed, "br", LIMIT) == TEXT
    with pytest.raises(MalformedRequest, match="stops before its end"):
        decode(packed[:len(packed) // 2], "br", LIMIT)
    with pytest.raises(MalformedRequest, match="does not decompress"):
        decode(b"\xff" * 40, "br", LIMIT)
    with pytest.raises(BodyTooLarge):
        decode(brotli.compress(bytes(LIMIT + 1)), "br", LIMIT)
