"""The board: memory the supervisor shares with each worker process.

A shared word per process says which token it runs now, so the lane always
knows. That is what makes the lane crash-safe and killable: after a process
died, the word names the one token that fails; a token killed or past its
deadline while it runs has its process SIGKILLed, and one still queued in a
process is listed on the board, skipped there and never run. The worker also
publishes its resident set size there for recycling (``process_max_rss``),
and stages the replies of short tokens there before it sends them in one
write (see :mod:`.child`): replies staged when the process died are read
from the board, so a kill or a crash loses none of them.

The words and how both sides decide live in Rust (``src/engine/board.rs``
gives the layout and the protocol: atomics, no lock and no system call on the
worker's path); :class:`_Board` holds the file both sides map.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from .._tokengate import ProcessBoard

#: What :meth:`_Board.stop` did.
LISTED, KILLED, KILLED_FOR_ROOM = 0, 1, 2


class _Board:
    """The board of one worker process: the shared file (``fd``) and its mapping
    (``shared``, a :class:`ProcessBoard`: see ``src/engine/board.rs`` for the words
    and the protocol). A token is named by its number on the wire (``seq``, new at
    each sending: see ``_Item.wire``). In short:

    * the worker, before it starts a token, publishes it as running, then skips it
      if the supervisor listed it (``shared.begin``, in the worker);
    * the supervisor, to stop a token it sent: if the worker runs it, SIGKILLs the
      process before the worker can start another, else lists it (:meth:`stop`);
    * the supervisor, to take back tokens waiting behind a long call: only while the
      worker runs one, lists those sent after it (:meth:`take_back`).

    A token is therefore either running and killed with its process, or skipped and
    never run, or already run (its reply on its way: staged or in the socket; the
    supervisor then drops that reply); no other token is harmed. After a process was
    killed, :meth:`running` names the token stopped, or one the worker published and
    never started (the supervisor knows which it stopped); after a crash, the token
    that was running.
    """

    __slots__ = ("fd", "n", "shared")

    def __init__(self, fd: int, n: int) -> None:
        self.fd = fd
        self.n = n
        self.shared = ProcessBoard(fd, n)

    @classmethod
    def create(cls, n: int) -> _Board:
        try:
            fd = os.memfd_create("tokengate-process-lane", os.MFD_CLOEXEC)
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
        try:
            os.ftruncate(fd, ProcessBoard.size(n))
            return cls(fd, n)
        except BaseException:
            os.close(fd)
            raise

    def running(self) -> int | None:
        """Seq of the token the worker was running (read after it died), or None."""
        return self.shared.running()

    def rss(self) -> int:
        """The worker's resident set size (bytes) after its latest token (0: not measured)."""
        return self.shared.rss()

    def staged(self) -> tuple[int, bytes]:
        """How many frames the worker had sent before its staged ones, and the reply
        frames it staged and had not sent (read once it is dead)."""
        return self.shared.staged()

    # supervisor side
    def stop(self, seq: int, kill: Any) -> int:
        """Stops token ``seq``: :data:`KILLED` if it was running (``kill()`` was called, and
        the worker cannot start another), :data:`LISTED` if it is listed to be skipped,
        :data:`KILLED_FOR_ROOM` if no list word was free and ``kill()`` was called (the
        token running there died with the process; the lane never sends a worker more
        tokens than it has words)."""
        return self.shared.stop(seq, kill)

    def take_back(self, seqs: list[int], limit: int, share_from: int | None = None) -> list[int] | None:
        """Lists to be skipped up to ``limit`` of ``seqs`` (tokens sent to the worker, in
        the order it runs them) that come after the one it runs now, and returns them:
        none of them has started, and the worker will skip them. None while it runs
        none of ``seqs`` (between two tokens it may be about to start any of them).
        With ``share_from``: at most half of those waiting behind the running one (rounded
        up), and none unless that comes to ``share_from`` or more."""
        return self.shared.take_back(seqs, limit, share_from)

    def unlist(self, seq: int) -> None:
        """Frees the word of a listed token (its reply arrived)."""
        self.shared.unlist(seq)

    def close(self) -> None:
        """Closes the board's file (idempotent: a retired worker's board is closed when it
        retires, never twice, so its fd number is never closed after reuse); the mapping
        goes with the last reference to it."""
        if self.fd < 0:
            return
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = -1
