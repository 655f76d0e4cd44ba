"""xds/h2_raw.py, the h2 transport's DATA frames read and written outside h2, driven in memory
against python-hyper's h2 client: windows given back, the order of frames kept with what h2
frames, a peer past its window refused, and writes that keep h2's outbound windows true."""

from __future__ import annotations

from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest
from hyperframe.frame import Frame, WindowUpdateFrame

from repstage_mesh.xds.h2_raw import CONNECTION_WINDOW, STREAM_WINDOW, RawFraming

_REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/x"), (b":authority", b"a")]


@dataclass
class Call:
    sid: int
    raw_held: int = 0
    raw_unacked: int = 0
    got: bytearray | None = None


class Pair:
    """An h2 client and a server connection whose DATA frames of open calls go through RawFraming."""

    def __init__(self) -> None:
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.client.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.server.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})
        self.raw = RawFraming(self.server)
        self.calls: dict[int, Call] = {}
        self.order: list[str] = []  # what the server saw, in order: "h2:<event>" or "raw:<sid>"
        self.read_at_once = True
        self.client.initiate_connection()
        self.client.increment_flow_control_window(CONNECTION_WINDOW - 65_535)
        self.server.initiate_connection()
        self.server.increment_flow_control_window(CONNECTION_WINDOW - 65_535)
        self.to_server()
        self.to_client()
        self.to_server()

    def open(self, sid: int) -> Call:
        self.client.send_headers(sid, _REQUEST)
        self.to_server()
        call = self.calls[sid] = Call(sid, got=bytearray())
        return call

    def to_server(self) -> None:
        data = self.client.data_to_send()
        if data:
            self.raw.receive(data, self.calls.get, self._h2, self._deliver)

    def to_client(self) -> list[h2.events.Event]:
        return self.client.receive_data(self.raw.take_output())

    def _h2(self, data: bytes) -> None:
        for event in self.server.receive_data(data):
            self.order.append(f"h2:{type(event).__name__}")
            if isinstance(event, h2.events.DataReceived):
                self.server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    def _deliver(self, call: Call, payload: bytes) -> None:
        self.order.append(f"raw:{call.sid}")
        assert call.got is not None
        call.got += payload
        if self.read_at_once:
            self.raw.read(call)


def test_many_windows_of_requests_flow_through_with_the_windows_given_back() -> None:
    pair = Pair()
    call = pair.open(1)
    chunk = b"r" * 16_000
    sent = 0
    while sent < CONNECTION_WINDOW + 3 * STREAM_WINDOW:  # past both windows: only given-back room allows it
        room = pair.client.local_flow_control_window(1)
        assert room >= len(chunk), f"the client waits for room after {sent} bytes: nothing was given back"
        pair.client.send_data(1, chunk)
        sent += len(chunk)
        pair.to_server()
        pair.to_client()
    assert call.got is not None and len(call.got) == sent
    assert call.raw_held < STREAM_WINDOW and call.raw_unacked == 0


def test_a_padded_frame_goes_to_h2_in_its_place_and_both_windows_stay_true() -> None:
    pair = Pair()
    pair.open(1)
    pair.client.send_data(1, b"a" * 100)
    pair.client.send_data(1, b"b" * 100, pad_length=10)  # h2 must strip the padding: h2's to read
    pair.client.send_data(1, b"c" * 100)
    pair.to_server()
    assert pair.order[-3:] == ["raw:1", "h2:DataReceived", "raw:1"]
    for _ in range(200):  # both paths give back what they took: the client never runs dry
        pair.client.send_data(1, b"d" * 10_000, pad_length=5)
        pair.client.send_data(1, b"e" * 10_000)
        pair.to_server()
        pair.to_client()
    assert pair.client.local_flow_control_window(1) > 2 * 10_000


def test_data_of_a_stream_h2_does_not_know_open_or_inside_a_header_block_goes_to_h2() -> None:
    pair = Pair()
    pair.open(1)
    pair.client.send_headers(3, _REQUEST)  # the server's loop has no call 3: h2 judges its DATA
    pair.client.send_data(3, b"x" * 10)
    pair.to_server()
    assert pair.order[-1] == "h2:DataReceived"
    # DATA between HEADERS and its CONTINUATION breaks the protocol: h2 must see it, and refuses it
    headers = Frame.parse_frame_header(memoryview(b"\x00\x00\x00\x01\x00\x00\x00\x00\x05"))[0]
    headers.data = b""  # an empty header block fragment, END_HEADERS not set
    data = b"\x00\x00\x01\x00\x00\x00\x00\x00\x01" + b"z"
    with pytest.raises(h2.exceptions.ProtocolError):
        pair.raw.receive(headers.serialize() + data, pair.calls.get, pair._h2, pair._deliver)
    assert pair.order[-1] != "raw:1"


def test_a_peer_that_sends_past_its_window_is_refused_with_a_goaway() -> None:
    pair = Pair()
    pair.open(1)
    pair.read_at_once = False  # the call reads nothing (held): nothing is given back
    frame = b"\x00\x40\x00\x00\x00\x00\x00\x00\x01" + b"p" * 0x4000
    with pytest.raises(h2.exceptions.FlowControlError):
        for _ in range(STREAM_WINDOW // 0x4000 + 1):
            pair.raw.receive(frame, pair.calls.get, pair._h2, pair._deliver)
    goaway = [e for e in pair.to_client() if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway and goaway[0].error_code == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR


def test_writes_come_after_what_h2_framed_and_keep_its_windows_true() -> None:
    pair = Pair()
    pair.open(1)
    before = pair.server.local_flow_control_window(1)
    pair.server.send_headers(1, [(b":status", b"200")])  # framed by h2, not yet taken out
    pair.raw.send(1, b"m" * 40_000)  # three frames of at most 16 KiB
    assert pair.server.local_flow_control_window(1) == before - 40_000
    events = pair.to_client()  # the client's h2 checks the order and its own window
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "ResponseReceived" and kinds.count("DataReceived") == 3
    assert sum(len(e.data) for e in events if isinstance(e, h2.events.DataReceived)) == 40_000
    with pytest.raises(h2.exceptions.FlowControlError):
        pair.raw.send(1, b"m" * (pair.server.local_flow_control_window(1) + 1))


def test_window_updates_written_here_are_real_frames() -> None:
    pair = Pair()
    call = pair.open(1)
    for _ in range(STREAM_WINDOW // 4 // 10_000 + 1):
        pair.client.send_data(1, b"w" * 10_000)
    pair.to_server()
    out = pair.raw.take_output()
    frame, length = Frame.parse_frame_header(memoryview(out[:9]))
    frame.parse_body(memoryview(out[9:9 + length]))
    assert isinstance(frame, WindowUpdateFrame) and frame.stream_id == 1
    assert frame.window_increment >= STREAM_WINDOW // 4 and call.raw_held == 0
