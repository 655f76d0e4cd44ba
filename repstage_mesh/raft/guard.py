"""pysyncobj's TCP transport with a frame-size limit before authentication, and a journal sync
before every message it sends.

pysyncobj 0.3.17 reads a 4-byte length (up to 2 GiB) and then buffers the whole frame before it
tries to decrypt (authenticate) it; its read loop even drains the socket before it parses. A
peer that does not know the password can make a node hold gigabytes. How we limit it:

- `GuardedTCPTransport` is the `transportClass` given to `SyncObj`. Every connection it owns,
  incoming (`_onNewIncomingConnection`) and outgoing (`addNode`), is switched to
  `GuardedConnection` (a subclass of pysyncobj's `TcpConnection`, set with `__class__`, since
  pysyncobj constructs the objects itself).
- `GuardedConnection` overrides the private `TcpConnection.__processRead` (one `recv`, at most
  `recvBufferSize` = 8 KiB): after each read, while the peer has not authenticated, it drops the
  connection as soon as the frame's declared length, or the bytes buffered, exceed the limit.
  So a node never holds more than limit + 8 KiB for a peer that has not proven the password.
- "Authenticated" is pysyncobj's own marker: `sendRandKey` is set once the peer's first frame
  decrypted (Fernet, keyed by the password) and carried its random key. Frames after that
  (entries, snapshots) are not limited here.

The transport also syncs the durable journal before each message (see durable.py): a follower's
AppendEntries success, a vote, a forwarded command's answer leave only after the journal is on
disk. Pinned in tests/test_pinned_internals.py.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.transport import TCPTransport

from repstage_mesh.raft.durable import sync_journal_of

log = logging.getLogger(__name__)

DEFAULT_UNAUTHENTICATED_FRAME_LIMIT = 64 * 1024
_LENGTH = struct.Struct("i")  # pysyncobj's frame header: native signed int

OnFrameRefused = Callable[[int], None]


class GuardedConnection(TcpConnection):
    """A TcpConnection that refuses an oversized frame from a peer not yet authenticated.
    Its two attributes are set by the transport right after the class switch."""

    frame_limit: int = DEFAULT_UNAUTHENTICATED_FRAME_LIMIT
    on_refused: OnFrameRefused | None = None

    def _TcpConnection__processRead(self) -> bool:
        more: bool = super()._TcpConnection__processRead()
        if self.sendRandKey is not None:
            return more
        buffered: bytes = self._TcpConnection__readBuffer
        declared = _LENGTH.unpack_from(buffered)[0] if len(buffered) >= _LENGTH.size else 0
        if declared > self.frame_limit or declared < 0 or len(buffered) > self.frame_limit + _LENGTH.size:
            size = max(declared, len(buffered))
            log.warning(
                "raft: dropped a connection from a peer that has not authenticated: frame of "
                "%d bytes over the limit of %d (raft.unauthenticated_frame_limit)", size, self.frame_limit,
            )
            self.disconnect()
            if self.on_refused is not None:
                self.on_refused(size)
            return False
        return more


class GuardedTCPTransport(TCPTransport):
    """TCPTransport whose connections are GuardedConnections; syncs the journal before sends.
    `frame_limit` and `on_refused` are class attributes: `ReplicatedStore` makes one subclass
    per store with `guarded_transport(...)`."""

    frame_limit: int = DEFAULT_UNAUTHENTICATED_FRAME_LIMIT
    on_refused: OnFrameRefused | None = None

    def _guard(self, conn: Any) -> None:
        if isinstance(conn, TcpConnection) and not isinstance(conn, GuardedConnection):
            conn.__class__ = GuardedConnection
        conn.frame_limit = self.frame_limit
        conn.on_refused = type(self).on_refused

    def _onNewIncomingConnection(self, conn: Any) -> None:
        self._guard(conn)
        super()._onNewIncomingConnection(conn)

    def addNode(self, node: Any) -> None:
        super().addNode(node)
        conn = self._connections.get(node)
        if conn is not None:
            self._guard(conn)

    def send(self, node: Any, message: Any) -> bool:
        sync_journal_of(self._syncObj, message)  # a follower's AppendEntries answer above all
        return bool(super().send(node, message))


def guarded_transport(frame_limit: int, on_refused: OnFrameRefused | None) -> type[GuardedTCPTransport]:
    """A GuardedTCPTransport class with this limit and callback (pysyncobj wants a class)."""
    if frame_limit < 1024:
        raise ValueError("unauthenticated_frame_limit: must be at least 1024 bytes")
    return type(
        "GuardedTCPTransport",
        (GuardedTCPTransport,),
        {"frame_limit": frame_limit, "on_refused": staticmethod(on_refused) if on_refused else None},
    )
