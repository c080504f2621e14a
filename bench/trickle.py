#!/usr/bin/env python3
"""Server CPU spent on upgrade requests trickled a byte at a time.

    python3 bench/trickle.py PORT SERVER_PID CLIENTS PAD_BYTES [blank]

Each client sends a request head with a PAD_BYTES header, one byte per
send (TCP_NODELAY, 0.2 ms apart), then the rest of the upgrade request,
and reads the answer. With `blank`, the bytes trickled are PAD_BYTES
empty lines (`\n`) before the whole request instead. Prints the server's CPU time over the run (from
/proc/SERVER_PID/stat) and the answers' status lines. Loopback only.
"""
import socket
import sys
import threading
import time

addr = ("127.0.0.1", int(sys.argv[1]))
pid, n, pad = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
blank = sys.argv[5:] == ["blank"]
REQUEST = (
    b"GET / HTTP/1.1\r\nHost: x\r\n"
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def cpu_ms():
    fields = open(f"/proc/{pid}/stat").read().split(")")[1].split()
    return (int(fields[11]) + int(fields[12])) * 10


def one(answers, i):
    s = socket.create_connection(addr)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if blank:
        head, rest = b"\n" * pad, REQUEST
    else:
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * pad + b"\r\n"
        rest = REQUEST[len(b"GET / HTTP/1.1\r\nHost: x\r\n") :]
    for k in range(len(head)):
        s.send(head[k : k + 1])
        time.sleep(0.0002)
    s.send(rest)
    answers[i] = s.recv(100)[:12]
    s.close()


c0, t0 = cpu_ms(), time.time()
answers = [None] * n
threads = [threading.Thread(target=one, args=(answers, i)) for i in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(
    f"{n} clients x {pad} B {'of empty lines ' if blank else ''}trickled: server CPU {cpu_ms() - c0} ms "
    f"in {time.time() - t0:.1f} s; answers {sorted(set(map(str, answers)))}"
)
