"""ServerProcess without Triton: a stand-in child that answers /v2/health/ready at once but prints its banner later,
and writes a long log while the parent polls it (no log_path: the anonymous temporary log)."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

from edgead.serve import BANNER, ServerProcess

FAKE = r'''
import sys, threading, time
from http.server import BaseHTTPRequestHandler, HTTPServer
port = int(sys.argv[sys.argv.index("--http-port") + 1])
class Ready(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass
srv = HTTPServer(("127.0.0.1", port), Ready)
threading.Thread(target=srv.serve_forever, daemon=True).start()
print("edgead serve: error: a line that looks like the banner but names no port", flush=True)
for i in range(3000):
    print(f"log line {i:05d}", flush=True)
time.sleep(1.0)
print(f"BANNER b on http://127.0.0.1:{port} grpc :{port + 1} metrics :{port + 2}", flush=True)
time.sleep(60)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("named_log", [False, True])
def test_start_waits_for_the_banner_and_the_log_stays_in_order(tmp_path: Path, named_log: bool) -> None:
    script = tmp_path / "fake_serve.py"
    script.write_text(FAKE.replace("BANNER", BANNER))
    srv = ServerProcess([sys.executable, str(script)], ["b"], http_port=_free_port(), log_path=tmp_path / "serve.log" if named_log else None)
    t0 = time.monotonic()
    try:
        srv.start(timeout_s=30)
        assert time.monotonic() - t0 >= 1.0  # ready at once, but started only once the banner is there
        lines = srv.log_tail(10**6).splitlines()
        numbered = [ln for ln in lines if ln.startswith("log line")]
        assert numbered == [f"log line {i:05d}" for i in range(3000)]  # nothing overwritten by the polling
        assert lines[-1].startswith(BANNER)
    finally:
        srv.kill()
