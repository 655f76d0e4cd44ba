"""The h2 transport's hot path outside python-hyper's `h2`: DATA frames of open calls.

h2 took ~15 µs of CPU to take in an ADS ACK (a frame object, events, the stream's state machine,
its window manager) and ~9 µs to send a response; these paths take ~2 and ~1 (bench/RESULTS.md,
issue 17, ninth pass). `RawFraming` splits what a connection reads into frames: a DATA frame of
a call that is plainly open (no padding, no END_STREAM, not inside a header block) is handed to
the call here; every other frame goes to h2, in the order they came, so h2 still judges
everything it must (settings, headers, pings, resets, GOAWAY, a frame too large, an unknown
stream). It writes DATA frames of open calls the same way.

h2 never sees those bytes, so its windows stay its own: what this path takes in, it gives back
itself (WINDOW_UPDATE) and holds the peer to the window (a peer that sends past it is a
flow-control error); what it sends, it takes off h2's outbound windows
(`H2Connection.outbound_flow_control_window`, `H2Stream.outbound_flow_control_window`,
`H2Connection.streams`: h2 internals, why pyproject pins h2 below 5). Pure: no sockets, no
event loop (`tests/test_xds_h2_raw.py` drives it against h2's own client).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Protocol, TypeVar

import h2.connection
import h2.errors
import h2.exceptions

_DATA_HEADER = struct.Struct(">IBI")  # (length << 8 | type DATA), flags, stream id
_WINDOW_UPDATE = struct.Struct(">IBII")  # (4 << 8 | type WINDOW_UPDATE), flags, stream id, increment
_PREFACE = 24  # bytes of the client's connection preface (h2 reads it)
STREAM_WINDOW = 1 << 20  # the window each call opens with (the transport's INITIAL_WINDOW_SIZE)
CONNECTION_WINDOW = 1 << 24  # the connection's window once the transport raised it
# Given back once this much is done with: h2 gives its own share back at half a window, so the
# two together never hold a whole window and the peer never waits on us for room.
_STREAM_RETURN_AT = STREAM_WINDOW // 4
_CONNECTION_RETURN_AT = CONNECTION_WINDOW // 4
_HEADER_BLOCK = frozenset((0x1, 0x5, 0x9))  # HEADERS, PUSH_PROMISE, CONTINUATION
_END_HEADERS = 0x4
_SETTINGS, _ACK = 0x4, 0x1  # a SETTINGS frame and its ACK flag
_PADDED_OR_END = 0x9
_CLOSED = h2.connection.ConnectionState.CLOSED


class RawCall(Protocol):
    """What this path reads and keeps on a call (the transport's `h2_call.Call`)."""

    sid: int
    raw_held: int  # bytes read here not yet given back to the call's window
    raw_unacked: int  # of which the call has not read yet


Call = TypeVar("Call", bound=RawCall)


class RawFraming:
    """One connection's frames read and written outside h2 (see the module doc)."""

    def __init__(self, conn: h2.connection.H2Connection) -> None:
        self.h2 = conn
        self.out: list[bytes] = []  # frames written here (and h2's output framed before them)
        self._inbuf = bytearray()  # the start of a frame not yet whole
        self._preface_left = _PREFACE
        self._header_block = False  # inside HEADERS ... CONTINUATION: every frame goes to h2
        self._held = 0  # bytes read here not yet given back to the connection's window
        self._returned = 0  # of which no call holds any more (sent back at _CONNECTION_RETURN_AT)

    # ---------------------------------------------------------------- reading
    def receive(
        self,
        data: bytes,
        open_call: Callable[[int], Call | None],
        to_h2: Callable[[bytes], None],
        deliver: Callable[[Call, bytes], None],
    ) -> None:
        """Split `data` (with what is left of earlier reads) into frames: runs of frames for h2
        go to `to_h2`, a DATA frame of `open_call(stream id)` to `deliver` once its flow control
        is counted. Raises h2's FlowControlError (with a GOAWAY framed) for a peer past its window."""
        buf = self._inbuf
        buf += data
        if self._preface_left:
            take = min(self._preface_left, len(buf))
            self._preface_left -= take
            to_h2(bytes(buf[:take]))
            del buf[:take]
        pos, size, slow = 0, len(buf), -1
        max_frame = self.h2.max_inbound_frame_size
        while size - pos >= 9:
            length = int.from_bytes(buf[pos:pos + 3])
            end = pos + 9 + length
            if end > size and length <= max_frame:
                break  # the rest has not arrived (a frame over the limit goes to h2, which refuses it)
            kind, flags = buf[pos + 3], buf[pos + 4]
            if kind == 0 and not flags & _PADDED_OR_END and not self._header_block and length <= max_frame:
                if slow >= 0:  # what came before may open or end calls: h2 first
                    to_h2(bytes(buf[slow:pos]))
                    slow = -1
                call = open_call(int.from_bytes(buf[pos + 5:pos + 9]) & 0x7FFF_FFFF)
                if call is not None:
                    self._take(call, length)
                    deliver(call, bytes(buf[pos + 9:end]))
                    pos = end
                    continue
            elif kind in _HEADER_BLOCK:
                self._header_block = not flags & _END_HEADERS
            elif kind == _SETTINGS and not flags & _ACK and not self._header_block:
                # h2 alone, up to it: the transport counts SETTINGS (one can make h2 walk every
                # stream) and may close the connection before h2 reads the next one.
                to_h2(bytes(buf[pos if slow < 0 else slow:min(end, size)]))
                slow, pos = -1, min(end, size)
                continue
            if slow < 0:
                slow = pos
            pos = min(end, size)
        if slow >= 0:
            to_h2(bytes(buf[slow:pos]))
        del buf[:pos]

    def _take(self, call: RawCall, size: int) -> None:
        call.raw_held += size
        call.raw_unacked += size
        self._held += size
        if call.raw_held > STREAM_WINDOW or self._held > CONNECTION_WINDOW:
            self.h2.close_connection(error_code=h2.errors.ErrorCodes.FLOW_CONTROL_ERROR)
            raise h2.exceptions.FlowControlError("the peer sent past its flow control window")

    def read(self, call: RawCall) -> None:
        """The call read everything it was given: its bytes go back to the peer's windows (the
        call's past _STREAM_RETURN_AT, the connection's past _CONNECTION_RETURN_AT)."""
        size, call.raw_unacked = call.raw_unacked, 0
        if call.raw_held >= _STREAM_RETURN_AT:
            self.emit(_WINDOW_UPDATE.pack(4 << 8 | 0x8, 0, call.sid, call.raw_held))
            call.raw_held = 0
        self.release(size)

    def release(self, size: int) -> None:
        """`size` bytes no call holds any more (read, or left by a call that ended)."""
        if size <= 0:
            return
        self._returned += size
        if self._returned >= _CONNECTION_RETURN_AT:
            self.emit(_WINDOW_UPDATE.pack(4 << 8 | 0x8, 0, 0, self._returned))
            self._held -= self._returned
            self._returned = 0

    # ---------------------------------------------------------------- writing
    def send(self, sid: int, data: bytes) -> None:
        """DATA frames of `data`, which fits the window: written here when the connection and the
        stream are plainly open, else by h2 (which then says what is wrong)."""
        conn = self.h2
        limit = conn.max_outbound_frame_size
        stream = conn.streams.get(sid)
        if stream is None or not stream.open or conn.state_machine.state is _CLOSED:
            for start in range(0, len(data), limit):
                conn.send_data(sid, data[start:start + limit])
            return
        size = len(data)
        if size > min(conn.outbound_flow_control_window, stream.outbound_flow_control_window):
            raise h2.exceptions.FlowControlError(f"cannot send {size} bytes past the peer's window")
        for start in range(0, size, limit):
            chunk = data[start:start + limit]
            self.emit(_DATA_HEADER.pack(len(chunk) << 8, 0, sid) + chunk)
        conn.outbound_flow_control_window -= size
        stream.outbound_flow_control_window -= size

    def emit(self, frame: bytes) -> None:
        """A frame written here, after whatever h2 has framed before it."""
        pending = self.h2.data_to_send()
        if pending:
            self.out.append(pending)
        self.out.append(frame)

    def take_output(self) -> bytes:
        """Everything to write, in order: the frames written here, then h2's."""
        data = self.h2.data_to_send()
        out = self.out
        if not out:
            return data
        if data:
            out.append(data)
        joined = b"".join(out)
        out.clear()
        return joined
