"""The wire between the lane's supervisor and its worker processes.

Each worker process has one socket (a ``socketpair``) to the supervisor.
Both directions carry whole messages in multiprocessing's ``send_bytes``
framing: a 4-byte big-endian signed length (or -1 and an 8-byte length, for a
message of 2 GiB or more), then the bytes. The worker reads and writes with a
blocking :class:`~multiprocessing.connection.Connection`; the supervisor,
which never blocks on a worker, writes frames from the worker's outbox
(:func:`_header`) and cuts the replies off its read buffer (:func:`_frames`).

* **Supervisor to worker**: one message per batch of tokens sent ahead, the
  pickled list of ``(seq, function key, function payload or None, pickled
  (args, kwargs))``, ``seq`` being the token's number on the wire, new at each
  sending (``_Item.wire``); the function's payload comes with the first token of
  that function the worker receives (see :mod:`.payload`).
* **Worker to supervisor**: one message per token (several sent in one write,
  see :class:`~tokengate._process.child._Outbox`): :data:`_REPLY` (the
  token's seq and a kind), then what the kind carries:
  ``_READY`` (seq -1, sent once when the worker has started: its pickled
  pid), ``_OK`` (the pickled value), ``_ERROR`` (the pickled (exception,
  traceback)) or ``_SKIPPED`` (nothing: the token was listed on the board to
  be skipped, and never ran).
"""

from __future__ import annotations

import struct

#: A worker's reply: the token's seq and what follows (a pickled value, or (exception, traceback)).
_REPLY = struct.Struct("!qB")
_READY, _OK, _ERROR, _SKIPPED = range(4)
_LEN = struct.Struct("!i")
_LEN64 = struct.Struct("!Q")


def _header(n: int) -> bytes:
    """The length prefix of an ``n``-byte message (``send_bytes`` framing)."""
    return _LEN.pack(n) if n < 0x7FFFFFFF else _LEN.pack(-1) + _LEN64.pack(n)


def _cut(data: bytes | bytearray) -> tuple[list[memoryview], int]:
    """The whole messages at the front of ``data`` (multiprocessing's ``send_bytes``
    framing), as views into it, and how many bytes they take with their headers.
    ``data`` must not change while the views live (pass bytes)."""
    out = []
    pos = 0
    end = len(data)
    view = memoryview(data)
    while end - pos >= 4:
        (n,) = _LEN.unpack_from(data, pos)
        head = 4
        if n == -1:
            if end - pos < 12:
                break
            (n,) = _LEN64.unpack_from(data, pos + 4)
            head = 12
        if end - pos - head < n:
            break
        out.append(view[pos + head : pos + head + n])
        pos += head + n
    return out, pos


def _frames(buf: bytearray) -> list[bytes]:
    """Cuts the whole messages (multiprocessing's ``send_bytes`` framing) off the front of ``buf``."""
    views, used = _cut(bytes(buf))
    del buf[:used]
    return [v.tobytes() for v in views]


def _take_frames(rbuf: bytearray, data: bytes) -> list[memoryview]:
    """The whole messages of ``rbuf`` (what is left of earlier reads) followed by ``data``
    (just read), as views; what is left of a message cut off stays in ``rbuf``. With
    ``rbuf`` empty, the common case, ``data`` is not copied."""
    if rbuf:
        rbuf += data
        data = bytes(rbuf)
        rbuf.clear()
    views, used = _cut(data)
    if used < len(data):
        rbuf += memoryview(data)[used:]
    return views


def _frame_need(buf: bytearray) -> int:
    """Bytes still missing of the message begun in ``buf`` (0 when none is begun)."""
    if len(buf) < 4:
        return 0
    n: int = _LEN.unpack_from(buf, 0)[0]
    if n == -1:
        n = int(_LEN64.unpack_from(buf, 4)[0]) + 8 if len(buf) >= 12 else 8
    return max(0, n + 4 - len(buf))
