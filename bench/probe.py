"""The client's side of "time to the first forwarded request": HTTP GETs until one is answered.

Runs inside the lab's client namespace (bench_control starts it there)::

    python bench/probe.py HOST PORT SECONDS

It prints ``ready`` once it has started, then tries a fresh TCP connection
and ``GET /`` every millisecond (a connect that hears nothing gives up
after 5 ms, so a dropped SYN costs no retransmission timer), and prints
one JSON object: ``{"answered_at": CLOCK_MONOTONIC seconds, "tries": N}``,
or ``{"error": ...}`` when nothing answered within SECONDS. CLOCK_MONOTONIC
is the same in every network namespace, so the caller can compare it with
its own clock.
"""

from __future__ import annotations

import json
import socket
import sys
import time

CONNECT_TIMEOUT = 0.005
READ_TIMEOUT = 1.0
PAUSE = 0.001


def get_once(host: str, port: int) -> bool:
    """One GET on a new connection; True when a 200 came back."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT) as s:
            s.settimeout(READ_TIMEOUT)
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            status = s.recv(64)
            return status.startswith(b"HTTP/1.") and status[9:12] == b"200"
    except OSError:
        return False


def main(argv: list[str]) -> int:
    host, port, seconds = argv[0], int(argv[1]), float(argv[2])
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    tries = 0
    while time.monotonic() < deadline:
        tries += 1
        if get_once(host, port):
            print(json.dumps({"answered_at": time.monotonic(), "tries": tries}), flush=True)
            return 0
        time.sleep(PAUSE)
    print(json.dumps({"error": f"no answer from {host}:{port} within {seconds:g} s", "tries": tries}), flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
