"""A TCP proxy in front of a real database server that loses one COMMIT's acknowledgement.

Once armed, it forwards the next client message that commits (a ``COMMIT``, or the
ledger's one autocommitted consume statement on PostgreSQL) to the server, waits
for the server's reply (so the commit has happened), throws the reply away and cuts every
connection; for ``outage`` seconds after that it refuses new connections (it accepts and
hangs up at once). To the driver this is a server that went away while acknowledging a
commit, and stayed away long enough for the caller's re-check to fail too.

It can be armed from another process (an Airflow task, say) through its control port: send
``arm`` and read ``ok``, so the arming is in place before the sender goes on.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from typing import Any

import sqlalchemy as sa

#: What commits a finish: a transaction's COMMIT, or PostgreSQL's one-statement consume
#: (``WITH done AS (UPDATE …) SELECT …``), which is sent in autocommit mode and commits by itself.
COMMIT = re.compile(rb"(?i)\bcommit\b|WITH done AS")


class LostAckProxy:
    def __init__(self, server_url: str, outage: float = 1.0) -> None:
        url = sa.make_url(server_url)
        self.target = (url.host or "127.0.0.1", int(url.port or {"postgresql": 5432}.get(url.get_backend_name(), 3306)))
        self.outage = outage
        self.dropped = threading.Event()  # a commit's reply was thrown away
        self.refused = 0  # connections hung up on during the outage
        self._armed = threading.Event()
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = _listen()
        self._control = _listen()
        self.port = self._listener.getsockname()[1]
        self.control_port = self._control.getsockname()[1]
        self._closed = False
        for loop in (self._accept, self._serve_control):
            threading.Thread(target=loop, daemon=True).start()

    def url(self, database_url: str) -> str:
        """``database_url`` (on the proxied server) reached through this proxy."""
        return sa.make_url(database_url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def arm(self) -> None:
        self._armed.set()

    def close(self) -> None:
        self._closed = True
        for s in (self._listener, self._control):
            s.close()
        self._cut()

    def __enter__(self) -> LostAckProxy:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if time.monotonic() < self._down_until:
                self.refused += 1
                client.close()
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, server))
            swallow = threading.Event()  # set: the server's next reply acknowledges the commit
            threading.Thread(target=self._upstream, args=(client, server, swallow), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, swallow), daemon=True).start()

    def _upstream(self, client: socket.socket, server: socket.socket, swallow: threading.Event) -> None:
        while data := _recv(client):
            if self._armed.is_set() and COMMIT.search(data):
                self._armed.clear()
                swallow.set()
            if not _send(server, data):
                break
        _close(client, server)

    def _downstream(self, server: socket.socket, client: socket.socket, swallow: threading.Event) -> None:
        while data := _recv(server):
            if swallow.is_set():  # the commit is done; its acknowledgement never arrives
                self._down_until = time.monotonic() + self.outage
                self.dropped.set()
                self._cut()
                return
            if not _send(client, data):
                break
        _close(client, server)

    def _cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            _close(s)

    def _serve_control(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._control.accept()
            except OSError:
                return
            with conn:
                if _recv(conn).strip() == b"arm":
                    self.arm()
                    _send(conn, b"ok\n")


def arm_remote(port: int) -> None:
    """Arm the proxy whose control port is ``port`` (from any process); returns once armed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"arm\n")
        if conn.recv(16).strip() != b"ok":
            raise RuntimeError("the proxy did not confirm it is armed")


def _listen() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


def _recv(s: socket.socket) -> bytes:
    try:
        return s.recv(65536)
    except OSError:
        return b""


def _send(s: socket.socket, data: bytes) -> bool:
    try:
        s.sendall(data)
        return True
    except OSError:
        return False


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()
