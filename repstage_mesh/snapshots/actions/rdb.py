"""The little of the RDB format and of the replication handshake the Redis action needs.

Sans-IO: `aux_fields(head)` reads the auxiliary fields at the start of an RDB (`repl-id` and
`repl-offset` are the exact point of the fork that wrote it); `TransferHeader.parse` reads the
server's answer to `PSYNC ? -1` (`+FULLRESYNC <replid> <offset>`, then either `$<length>` or,
for a diskless transfer, `$EOF:<40-byte mark>`, with keep-alive newlines before it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from repstage_mesh.snapshots.actions.base import SnapshotTarget
from repstage_mesh.snapshots.actions.errors import SnapshotActionFailed

EOF_MARK_LEN = 40
_AUX = 0xFA


def redis_username(target: SnapshotTarget) -> str | None:
    """The ACL user of the member's credentials (`user`, as the probe settings say, or
    `username`); None for the default user."""
    return target.credentials.get("user") or target.credentials.get("username") or None


class RdbFormatError(SnapshotActionFailed):
    """The bytes are not an RDB (or not one this parser can read)."""


def _length(data: bytes, pos: int) -> tuple[int, bool, int]:
    """(length or integer, is_encoded_integer, next position)."""
    first = data[pos]
    kind = first >> 6
    if kind == 0:
        return first & 0x3F, False, pos + 1
    if kind == 1:
        return ((first & 0x3F) << 8) | data[pos + 1], False, pos + 2
    if first == 0x80:
        return struct.unpack(">I", data[pos + 1 : pos + 5])[0], False, pos + 5
    if first == 0x81:
        return struct.unpack(">Q", data[pos + 1 : pos + 9])[0], False, pos + 9
    if kind == 3:
        return first & 0x3F, True, pos + 1
    raise RdbFormatError(f"RDB: unknown length encoding 0x{first:02x}")


def _string(data: bytes, pos: int) -> tuple[str, int]:
    length, encoded, pos = _length(data, pos)
    if not encoded:
        end = pos + length
        if end > len(data):
            raise RdbFormatError("RDB: header cut short")
        return data[pos:end].decode(errors="replace"), end
    sizes = {0: ("<b", 1), 1: ("<h", 2), 2: ("<i", 4)}
    if length not in sizes:
        raise RdbFormatError("RDB: compressed auxiliary field (not expected in a header)")
    fmt, size = sizes[length]
    return str(struct.unpack(fmt, data[pos : pos + size])[0]), pos + size


def aux_fields(head: bytes) -> dict[str, str]:
    """The auxiliary fields at the start of an RDB (`redis-ver`, `repl-id`, `repl-offset`...)."""
    if len(head) < 9 or head[:5] != b"REDIS" or not head[5:9].isdigit():
        raise RdbFormatError("not an RDB file (no REDIS<version> magic)")
    fields = {"rdb-version": str(int(head[5:9]))}
    pos = 9
    try:
        while pos < len(head) and head[pos] == _AUX:
            key, pos = _string(head, pos + 1)
            value, pos = _string(head, pos)
            fields[key] = value
    except (IndexError, struct.error) as exc:
        raise RdbFormatError("RDB: header cut short") from exc
    return fields


@dataclass(frozen=True)
class TransferHeader:
    replid: str
    offset: int
    length: int | None  # bytes of RDB that follow, or None for an EOF-marked transfer
    eof_mark: bytes | None
    consumed: int  # bytes of the buffer the header took

    @classmethod
    def parse(cls, buffer: bytes) -> TransferHeader | None:
        """The header if `buffer` holds all of it, None if more bytes are needed."""
        pos = 0
        while pos < len(buffer) and buffer[pos : pos + 1] == b"\n":
            pos += 1  # keep-alives while the server prepares the RDB
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            return None
        line = buffer[pos:end].decode(errors="replace")
        if line.startswith("-"):
            raise SnapshotActionFailed(f"the member refused the RDB transfer: {line[1:]}")
        parts = line.split()
        if len(parts) != 3 or parts[0] != "+FULLRESYNC":
            raise SnapshotActionFailed(f"unexpected answer to PSYNC: {line[:100]!r}")
        replid, offset = parts[1], int(parts[2])
        pos = end + 2
        while pos < len(buffer) and buffer[pos : pos + 1] == b"\n":
            pos += 1
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            return None
        bulk = buffer[pos:end]
        if not bulk.startswith(b"$"):
            raise SnapshotActionFailed(f"unexpected RDB transfer header: {bulk[:60]!r}")
        if bulk.startswith(b"$EOF:"):
            mark = bulk[5:]
            if len(mark) != EOF_MARK_LEN:
                raise SnapshotActionFailed("RDB transfer: bad EOF mark")
            return cls(replid, offset, None, mark, end + 2)
        return cls(replid, offset, int(bulk[1:]), None, end + 2)
