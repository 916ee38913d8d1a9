"""The wire between the lane's supervisor and its worker processes.

Each worker process has one socket (a ``socketpair``) to the supervisor.
Both directions carry whole messages in multiprocessing's ``send_bytes``
framing: a 4-byte big-endian signed length (or -1 and an 8-byte length, for a
message of 2 GiB or more), then the bytes. The worker reads with a blocking
:class:`~multiprocessing.connection.Connection` and writes through its reply
stage (``ReplyOutbox``, see :mod:`.child`); the supervisor, which never blocks
on a worker, frames its batches in the worker's outbox and writes what the
socket takes (``BatchOutbox``), and cuts the replies off what it reads
(``ReplyReader``). The framing is Rust's: ``src/engine/wire.rs``.

* **Supervisor to worker**: one message per batch of tokens sent ahead, the
  pickled list of ``(seq, function key, function payload or None, pickled
  (args, kwargs))``, ``seq`` being the token's number on the wire, new at each
  sending (``_Item.wire``); the function's payload comes with the first token of
  that function the worker receives (see :mod:`.payload`).
* **Worker to supervisor**: one message per token (several sent in one write,
  see :mod:`~tokengate._process.child`): :data:`_REPLY` (the
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
