"""The access logger formats a line only when its logger would emit it."""

from __future__ import annotations

import logging

from gateway.app import AccessLogger


def test_access_log_is_off_above_info_and_on_at_info():
    logger = logging.getLogger("batchwire.access.test")
    access = AccessLogger(logger, "")
    logger.setLevel(logging.WARNING)
    assert access.enabled is False  # aiohttp then never calls log(): no line is built
    logger.setLevel(logging.INFO)
    assert access.enabled is True


def test_a_w3c_traceparent_puts_its_trace_id_in_the_access_line(caplog):
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from gateway.app import trace_id

    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    logger = logging.getLogger("batchwire.access.test-trace")
    access = AccessLogger(logger, "")
    with caplog.at_level(logging.INFO, logger=logger.name):
        for header in (f"00-{trace}-00f067aa0ba902b7-01", None):
            request = make_mocked_request("POST", "/predict",
                                          headers={"traceparent": header} if header else {})
            access.log(request, web.Response(status=200), 0.012)
    traced, plain = caplog.records
    assert traced.fields["trace_id"] == trace and traced.getMessage().endswith(f" trace={trace}")
    assert "trace_id" not in plain.fields and "trace=" not in plain.getMessage()
    # Not a traceparent: no trace id, whatever it holds.
    for bad in ("", "garbage", f"00-{trace}-00f067aa0ba902b7", f"ff-{trace}-00f067aa0ba902b7-01",
                f"00-{'0' * 32}-00f067aa0ba902b7-01", f"00-{trace}-{'0' * 16}-01",
                f"00-{trace.upper()}-00f067aa0ba902b7-01"):
        assert trace_id(bad) is None, bad
    # A later version may add fields after the flags.
    assert trace_id(f"01-{trace}-00f067aa0ba902b7-01-more") == trace


def test_a_path_with_control_characters_cannot_forge_a_text_log_line(caplog):
    """aiohttp percent-decodes the path: /x%0a... held a line break, and the text access
    log printed a second line the client wrote."""
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    logger = logging.getLogger("batchwire.access.test-path")
    access = AccessLogger(logger, "")
    forged = "/x\n127.0.0.1 POST /predict 200 1.0ms\x00"
    with caplog.at_level(logging.INFO, logger=logger.name):
        request = make_mocked_request("GET", "/x%0A127.0.0.1%20POST%20/predict%20200%201.0ms%00")
        assert request.path == forged
        access.log(request, web.Response(status=404), 0.001)
    (record,) = caplog.records
    line = record.getMessage()
    assert "\n" not in line and "\x00" not in line
    assert " /x\\n127.0.0.1 POST /predict 200 1.0ms\\x00 404 " in line
    assert record.fields["path"] == forged  # the JSON format escapes it by itself


def test_polled_routes_log_their_successes_at_debug_and_their_failures_at_info(caplog):
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    logger = logging.getLogger("batchwire.access.test-probes")
    access = AccessLogger(logger, "")
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        for path, status in (("/health", 200), ("/ready", 200), ("/metrics", 200),
                             ("/v2/health/ready", 200), ("/ready", 503), ("/", 200),
                             ("/info", 200)):
            access.log(make_mocked_request("GET", path), web.Response(status=status), 0.001)
    levels = [(r.fields["path"], r.fields["status"], r.levelname) for r in caplog.records]
    assert levels == [("/health", 200, "DEBUG"), ("/ready", 200, "DEBUG"),
                      ("/metrics", 200, "DEBUG"), ("/v2/health/ready", 200, "DEBUG"),
                      ("/ready", 503, "INFO"), ("/", 200, "INFO"), ("/info", 200, "INFO")]
