"""A real stdlib HTTP server on 127.0.0.1 for the benchmark clients' tests: it answers
``POST /`` with ``answer(body)`` and logs (its name, the body) in arrival order."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RecordingServer:
    def __init__(self, name: str, log: list, answer=lambda body: (200, [1.0, 2.0])):
        self.name = name

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the benchmark clients expect

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                log.append((name, body.decode()))
                status, payload = answer(body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        # shutdown() waits for serve_forever to look again: by default every 0.5 s, which
        # made every test's teardown wait about that long for each server.
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def recording_servers():
    """Fixture body: yields (make(name, **kwargs) -> RecordingServer, the shared log)."""
    log: list = []
    made: list[RecordingServer] = []

    def make(name, **kwargs) -> RecordingServer:
        made.append(RecordingServer(name, log, **kwargs))
        return made[-1]

    yield make, log
    for server in made:
        server.close()
