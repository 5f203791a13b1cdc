#!/usr/bin/env python3
"""udp_echo: UDP sockets that must come back bound, connected and with their options.

usage: python3 -u udp_echo.py PORT

A server socket bound to 0.0.0.0:PORT with SO_REUSEADDR and a 256 KiB receive
buffer answers each datagram: "opts" with its options ("reuseaddr=1 rcvbuf=N"),
anything else with the datagram reversed. A second socket, connected to the
server, sends it "self <n>" every 20 ms; the server counts them and prints
"self <n>" for each, in order (a gap is fine: UDP may lose; a repeat or a count
going back prints FAIL).
"""

import socket
import sys

port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)
s.bind(("0.0.0.0", port))
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.connect(("127.0.0.1", port))
s.settimeout(0.02)
print("udp_echo ready on port", port, flush=True)
sent = 0
last = -1
while True:
    sent += 1
    c.send(b"self %d" % sent)
    try:
        while True:
            data, peer = s.recvfrom(2048)
            if data.startswith(b"self "):
                n = int(data.split()[1])
                if n <= last:
                    print("FAIL self %d after %d" % (n, last), flush=True)
                last = n
                print("self", n, flush=True)
            elif data == b"opts":
                r = s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
                b = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                s.sendto(b"reuseaddr=%d rcvbuf=%d" % (r, b), peer)
            else:
                s.sendto(data[::-1], peer)
    except socket.timeout:
        pass
