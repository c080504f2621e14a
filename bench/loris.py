#!/usr/bin/env python3
"""Half-sent upgrade requests, one opened every EVERY seconds, each held.

    python3 bench/loris.py PORT SECONDS EVERY

Each connection sends the first two lines of a request and nothing more,
so the server parks it until its `handshake_timeout` answers `408`. At
one every 50 ms (`EVERY` 0.05) and the default 10 s timeout, about 200
are parked at a time, each falling due at a tick of its own. Run it
beside `loadgen idle --server-pid PID`, which measures the server's CPU:
the difference is what such clients cost a server holding many idle
connections. Loopback only; prints how many it opened.
"""
import socket
import sys
import time

port, seconds, every = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
held = []
end = time.time() + seconds
while time.time() < end:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    held.append(s)
    time.sleep(every)
print("opened", len(held))
