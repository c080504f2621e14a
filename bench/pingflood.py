#!/usr/bin/env python3
"""Server CPU spent on a client interleaving pings with messages.

    python3 bench/pingflood.py PORT SERVER_PID PAIRS

One client upgrades, then sends PAIRS (a multiple of 2,000) of [empty
ping, 1-byte text message] in writes of 2,000 pairs, and reads until the
pongs and echoes of all of them are in (2 + 3 bytes each, against
`examples/echo`). Prints the bytes read and the server's CPU time over
the run (from /proc/SERVER_PID/stat). Loopback only.
"""
import socket
import sys
import threading
import time

port, pid, pairs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])


def cpu_ms():
    fields = open(f"/proc/{pid}/stat").read().split(")")[1].split()
    return (int(fields[11]) + int(fields[12])) * 10


s = socket.create_connection(("127.0.0.1", port))
s.sendall(
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(4096)
want = pairs * 5
got = [len(head.split(b"\r\n\r\n", 1)[1])]


def reader():
    while got[0] < want:
        data = s.recv(1 << 16)
        if not data:
            break
        got[0] += len(data)


t = threading.Thread(target=reader)
t.start()
cpu0, wall0 = cpu_ms(), time.time()
# Masked with a zero key: ping (no payload), then text "x".
pair = bytes([0x89, 0x80, 0, 0, 0, 0, 0x81, 0x81, 0, 0, 0, 0]) + b"x"
batch = pair * 2000
for _ in range(pairs // 2000):
    s.sendall(batch)
t.join()
print(
    f"pairs {pairs}: read {got[0]} of {want} bytes, "
    f"server CPU {cpu_ms() - cpu0} ms, {time.time() - wall0:.2f} s"
)
