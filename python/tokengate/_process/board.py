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
:class:`_Board` gives the layout and how both sides decide under a lock.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import tempfile
from typing import Any

#: Bytes of the area where a worker stages replies before it sends them (see :mod:`.child`).
STAGE = 1 << 18


def _words(n: int) -> int:
    """Words of a board with ``n`` list words (the stage follows them)."""
    return n + 5


def _size(n: int) -> int:
    """Bytes of a board with ``n`` list words."""
    return 8 * _words(n) + STAGE


class _Board:
    """Memory the supervisor shares with one worker process, so that a kill is exact.

    A token is named by its number on the wire (``seq``, new at each sending: see
    ``_Item.wire``). Word 0 holds ``seq + 1`` of the token the worker runs now (0: none); only
    the worker writes it. Word 1 counts the listed tokens, words 2..n+1 hold
    ``seq + 1`` of tokens already sent to the worker that must not start (0:
    free); only the supervisor writes those. Word n+2 holds the worker's
    resident set size in bytes, written by the worker after each token and
    before its reply (only with ``process_max_rss``; 0: not measured), read by
    the supervisor as it handles the reply (no lock: one aligned word, and the
    reply orders the write before the read; with replies sent together, it may
    read the size after a later token). Word n+3 counts the bytes staged
    in the area that follows the words (:data:`STAGE` bytes): whole reply frames;
    word n+4 counts the frames the worker had sent before the first staged one.
    The worker alone writes both and the stage, the supervisor reads them only
    once the process is dead. Both sides decide under a POSIX record lock on the
    shared file:

    * the worker, before it starts a token: skip it if it is listed, else
      publish it in word 0;
    * the supervisor, to stop a token it sent: if word 0 names it, SIGKILL the
      process *while holding the lock* (so the worker cannot move on to its
      next token), else list it (so it never starts);
    * the supervisor, to take back tokens waiting behind a long call: only while
      word 0 names a token, list the ones sent after it (they have not started,
      and now never will there).

    A token is therefore either running and killed with its process, or
    skipped and never run, or already run (its reply on its way: staged or in
    the socket; the supervisor then drops that reply); no other token is
    harmed. After a process died, word 0 tells which token it was running.
    """

    __slots__ = ("fd", "map", "n", "stage", "words")

    def __init__(self, fd: int, n: int) -> None:
        self.fd = fd
        self.n = n
        self.map = mmap.mmap(fd, _size(n))
        view = memoryview(self.map)
        self.words = view[: 8 * _words(n)].cast("q")
        self.stage = view[8 * _words(n) :]
        view.release()

    @classmethod
    def create(cls, n: int) -> _Board:
        try:
            fd = os.memfd_create("tokengate-process-lane", os.MFD_CLOEXEC)
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
        try:
            os.ftruncate(fd, _size(n))
            return cls(fd, n)
        except BaseException:
            os.close(fd)
            raise

    def running(self) -> int | None:
        """Seq of the token the worker was running (read after it died), or None."""
        v = self.words[0]
        return v - 1 if v else None

    def rss(self) -> int:
        """The worker's resident set size (bytes) after its latest token (0: not measured)."""
        return int(self.words[self.n + 2])

    def staged(self) -> tuple[int, bytes]:
        """How many frames the worker had sent before its staged ones, and the reply
        frames it staged and had not sent (read once it is dead)."""
        n = int(self.words[self.n + 3])
        return int(self.words[self.n + 4]), bytes(self.stage[:n]) if 0 < n <= STAGE else b""

    # worker side
    def set_staged(self, used: int) -> None:
        """The stage now holds ``used`` bytes of whole frames."""
        self.words[self.n + 3] = used

    def set_sent(self, sent: int) -> None:
        """The stage was sent and is empty; ``sent`` frames went out in all. In this order:
        a death between the two leaves an empty stage, never staged frames counted as sent
        before themselves."""
        self.words[self.n + 3] = 0
        self.words[self.n + 4] = sent

    def begin(self, seq: int) -> bool:
        """Publishes ``seq`` as running, unless the supervisor listed it: then False."""
        words = self.words
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            if words[1] and seq + 1 in words[2 : self.n + 2].tolist():
                return False
            words[0] = seq + 1
            return True
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def end(self) -> None:
        """The token finished and its reply was staged or sent (a kill that reads the
        stale word meanwhile replaces the process; the reply, read from the socket or
        the stage, is the token's end, and what the process held goes back to the queue)."""
        self.words[0] = 0

    def set_rss(self, value: int) -> None:
        """Publishes the worker's resident set size (bytes), before the reply of the token
        that just ended."""
        self.words[self.n + 2] = value

    # supervisor side
    def stop(self, seq: int, kill: Any) -> bool:
        """Stops token ``seq``: True if it was running (``kill()`` was called under
        the lock), False if it is listed to be skipped."""
        words = self.words
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            if words[0] == seq + 1:
                kill()
                return True
            for i in range(2, self.n + 2):
                if words[i] == 0:
                    words[i] = seq + 1
                    words[1] += 1
                    return False
            kill()  # pragma: no cover - the lane never has more tokens out than words
            return True
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def take_back(self, seqs: list[int], limit: int) -> list[int] | None:
        """Lists to be skipped up to ``limit`` of ``seqs`` (tokens sent to the worker, in
        the order it runs them) that come after the one it runs now, and returns them:
        none of them has started, and the worker will skip them. None while it runs
        none of ``seqs`` (between two tokens it may be about to start any of them)."""
        words = self.words
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            running = int(words[0]) - 1
            if running not in seqs:
                return None
            free = (i for i in range(2, self.n + 2) if words[i] == 0)
            out = []
            for seq in seqs[seqs.index(running) + 1 :][:limit]:
                i = next(free, None)
                if i is None:  # pragma: no cover - a worker never holds more tokens than words
                    break
                words[i] = seq + 1
                words[1] += 1
                out.append(seq)
            return out
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def unlist(self, seq: int) -> None:
        """Frees the word of a listed token (its reply arrived)."""
        words = self.words
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            for i in range(2, self.n + 2):
                if words[i] == seq + 1:
                    words[i] = 0
                    words[1] -= 1
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Unmaps and closes the board (idempotent: a retired worker's board is closed
        when it retires, never twice, so its fd number is never closed after reuse)."""
        if self.fd < 0:
            return
        try:
            self.words.release()
            self.stage.release()
            self.map.close()
        except (BufferError, ValueError):
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = -1
