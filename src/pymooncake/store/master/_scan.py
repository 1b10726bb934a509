"""Regular expressions over the master's keys, evaluated where they cannot hurt.

Theory of operation
-------------------
Python's ``re`` backtracks: ``^(a+)+$`` against thirty ``a``\\ s and a ``b``
runs for seconds, ``.*a.*b.*c`` against a 4 KiB key for longer, and ``re``
holds the GIL throughout, so no thread of the master could serve meanwhile.
:class:`RegexScanner` therefore evaluates patterns in a worker *process*
(``_regex_worker.py``), a slice of keys at a time, with a deadline per slice:
a pattern that exceeds it kills the worker (a new one starts on the next
query) and the request fails with INVALID_PARAMS naming the pattern.  Any
syntax ``re`` accepts works; costs are bounded by time, not by a subset.

The event loop only copies one slice of keys at a time (see ``_index.py``) and
awaits the worker's answer on a non-blocking pipe.

Plain patterns stay in the process where they can.  Copying every key twice
through the worker's pipes was most of a removal by a prefix (over 10,000 keys
8.8 ms against the reference's 6.5; over a million 458 against 472, and 259-277
matched in the loop).  A pattern that cannot backtrack -- literals, character
classes, ``.``, anchors and groups of those, without repetition, alternation or
backreferences (the common ``^prefix`` of a cache's keys) -- costs ``re.search``
at most its own length per start position, so it is matched in the loop, a
piece at a time: each piece is sized from the time the last one took, so that a
turn of the loop stays near :data:`IN_LOOP_PIECE_S` whatever the keys' lengths.

How large a scan may run in the loop depends on the process around it
(``in_loop_max_keys``).  A scan in the loop never blocks, so the process's other
Python threads get the GIL only at the 5 ms switch interval: over 200k keys a
client thread beside a master embedded in its process waited 150 ms for some
calls (tried and reverted in the seventeenth session), never with the worker,
whose pipe waits give the GIL away.  An embedded master therefore matches only
scans of up to :data:`IN_LOOP_MAX_KEYS` keys in the loop (~2 ms for 16k keys).
The ``mooncake_master`` process has no such thread (its loop serves every
client; the HA elector's etcd calls and short file jobs tolerate a few ms), so
it matches plain patterns in the loop at any size.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import struct
import subprocess
import sys
import time
from array import array
from itertools import compress
from typing import Any, Final

from ...errors import InvalidParams

__all__ = [
    "DEFAULT_REGEX_DEADLINE_S",
    "IN_LOOP_MAX_KEYS",
    "IN_LOOP_PIECE_S",
    "RegexScanner",
    "linear_pattern",
]

#: a slice of keys (a few thousand) must be matched within this many seconds;
#: a plain pattern needs microseconds per key
DEFAULT_REGEX_DEADLINE_S: Final = 2.0
#: scans of at most this many keys match a pattern that cannot backtrack in the
#: loop instead of the worker
IN_LOOP_MAX_KEYS: Final = 16_384
#: the time a piece of an in-loop scan aims at (one turn of the loop)
IN_LOOP_PIECE_S: Final = 0.25e-3
#: keys in the first piece of in-loop matching, and the bounds of the later ones
_FIRST_PIECE: Final = 8
_PIECE_BOUNDS: Final = (1, 16384)
_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<BI")


def _load_parser() -> tuple[Any, frozenset[Any], Any]:
    """``re``'s own parser (a private module: without it every pattern goes to
    the worker), the opcodes that cannot backtrack, and SUBPATTERN."""
    try:
        parser = importlib.import_module("re._parser")
        ops = importlib.import_module("re._constants")
        flat = frozenset({ops.LITERAL, ops.NOT_LITERAL, ops.IN, ops.ANY, ops.AT, ops.CATEGORY})
        return parser, flat, ops.SUBPATTERN
    except (ImportError, AttributeError):  # pragma: no cover - another Python
        return None, frozenset(), None


_PARSER, _FLAT_OPS, _SUBPATTERN = _load_parser()


def linear_pattern(pattern: str) -> re.Pattern[str] | None:
    """``pattern`` compiled when matching it cannot backtrack (literals, classes,
    ``.``, anchors, groups of those); None for anything else."""
    if _PARSER is None:
        return None
    try:
        if not _flat(_PARSER.parse(pattern)):
            return None
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return None


def _flat(items: Any) -> bool:
    for op, av in items:
        if op is _SUBPATTERN:
            if not _flat(av[-1]):
                return False
        elif op not in _FLAT_OPS:
            return False
    return True


class RegexScanner:
    """A worker process that matches patterns against lists of keys, driven from
    the event loop (non-blocking pipes, no thread).

    :meth:`start` spawns the worker (the service does so at start-up); a worker
    killed for exceeding the deadline is replaced on the next query.
    """

    def __init__(
        self,
        deadline_s: float = DEFAULT_REGEX_DEADLINE_S,
        *,
        in_loop_max_keys: int | None = IN_LOOP_MAX_KEYS,
    ) -> None:
        self.deadline_s = deadline_s
        #: scans of more keys go to the worker even with a plain pattern (None:
        #: no bound; see the module docstring)
        self.in_loop_max_keys = in_loop_max_keys
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        #: workers killed for running past the deadline (catastrophic backtracking)
        self.killed = 0
        #: slices of keys matched in the loop (patterns that cannot backtrack)
        self.in_loop = 0
        #: slices of keys matched by the worker
        self.in_worker = 0
        self._linear: tuple[str, re.Pattern[str] | None] | None = None
        #: keys per piece of in-loop matching, as the last piece's pace gave it,
        #: and the pattern it was matching
        self._piece = _FIRST_PIECE
        self._piece_of: re.Pattern[str] | None = None

    def start(self) -> None:
        """Spawn the worker now (it then costs nothing until the first query)."""
        self._worker()

    def _worker(self) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            if proc is not None:
                self._reap(proc)
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
            proc = self._proc = subprocess.Popen(
                [sys.executable, "-m", "pymooncake.store.master._regex_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                close_fds=True,
            )
            assert proc.stdin is not None and proc.stdout is not None
            os.set_blocking(proc.stdin.fileno(), False)
            os.set_blocking(proc.stdout.fileno(), False)
        return proc

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes]) -> None:
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def in_loop_pattern(self, pattern: str, total: int) -> re.Pattern[str] | None:
        """``pattern`` compiled when a scan of ``total`` keys should match it in
        the loop (:meth:`match_here`), else None (the worker: :meth:`match`)."""
        if self.in_loop_max_keys is not None and total > self.in_loop_max_keys:
            return None
        if self._linear is None or self._linear[0] != pattern:
            self._linear = (pattern, linear_pattern(pattern))
        return self._linear[1]

    async def match_here(self, compiled: re.Pattern[str], keys: list[str]) -> list[str]:
        """The ``keys`` that ``compiled`` finds, matched in this loop a piece at a
        time (only for what :meth:`in_loop_pattern` allowed).

        Raises:
            InvalidParams: matching them took longer than the deadline (a pattern
                that cannot backtrack still costs its length per character: a
                1,000-character pattern searched through 4,096-character keys
                takes milliseconds per key).
        """
        if self._closed:
            raise InvalidParams("the master is shutting down")
        self.in_loop += 1
        search = compiled.search
        found: list[str] = []
        low, high = _PIECE_BOUNDS
        # the pace of the last call when it matched this pattern (a scan makes
        # many calls); a new pattern starts small: its cost per key is unknown
        size = self._piece if self._piece_of is compiled else _FIRST_PIECE
        self._piece_of = compiled
        start = 0
        spent = 0.0  # matching this slice, against the deadline (as the worker's)
        clock = time.perf_counter
        while start < len(keys):
            if start:
                await asyncio.sleep(0)
            began = clock()
            piece = keys[start : start + size]
            found += compress(piece, map(search, piece))  # (the loop over keys runs in C)
            n = len(piece)
            start += n
            # the next piece aims at IN_LOOP_PIECE_S at this piece's pace, and at
            # most doubles (one short piece says little)
            took = clock() - began
            spent += took
            if spent > self.deadline_s:
                raise self._too_slow(compiled.pattern, len(keys))
            size = max(low, min(high, 2 * size, int(n * IN_LOOP_PIECE_S / max(took, 1e-7))))
        self._piece = size
        return found

    async def match(self, pattern: str, keys: list[str]) -> list[int]:
        """Indices of ``keys`` that ``re.search(pattern, key)`` matches.

        Raises:
            InvalidParams: the pattern does not compile, or matching took longer
                than the deadline (the worker is killed).
        """
        if not keys:
            return []
        self.in_worker += 1
        request = b"".join(
            (
                _U32.pack(len(p := pattern.encode())),
                p,
                _U32.pack(len(b := "\0".join(keys).encode())),
                b,
            )
        )
        async with self._lock:
            if self._closed:
                raise InvalidParams("the master is shutting down")
            proc = self._worker()
            try:
                status, payload = await asyncio.wait_for(
                    self._exchange(proc, request), self.deadline_s
                )
            except asyncio.TimeoutError:
                self._kill()
                raise self._too_slow(pattern, len(keys)) from None
            except OSError as exc:
                self._kill()
                raise InvalidParams(f"regex worker failed on {pattern!r}: {exc}") from exc
        if status:
            raise InvalidParams(payload.decode(errors="replace"))
        hits = array("I")
        hits.frombytes(payload)
        if sys.byteorder != "little":
            hits.byteswap()
        return hits.tolist()

    def _too_slow(self, pattern: str, n: int) -> InvalidParams:
        return InvalidParams(
            f"regular expression {pattern!r} took more than {self.deadline_s:g} s on {n} keys "
            "(catastrophic backtracking: nested or adjacent quantifiers such as (a+)+ or "
            ".*a.*b.*c, or a long pattern searched through long keys); simplify it, e.g. "
            "anchor it with ^ and use a literal prefix"
        )

    async def _exchange(self, proc: subprocess.Popen[bytes], request: bytes) -> tuple[int, bytes]:
        assert proc.stdin is not None and proc.stdout is not None
        loop = asyncio.get_running_loop()
        wfd, rfd = proc.stdin.fileno(), proc.stdout.fileno()
        view = memoryview(request)
        while view:
            try:
                view = view[os.write(wfd, view) :]
            except BlockingIOError:
                await _ready(loop, wfd, write=True)
        head = await _read(loop, rfd, _HEAD.size)
        status, n = _HEAD.unpack(head)
        return status, await _read(loop, rfd, n if status else 4 * n)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            self.killed += 1
            self._reap(proc)

    def close(self) -> None:
        self._closed = True
        proc, self._proc = self._proc, None
        if proc is not None:
            self._reap(proc)


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()
    add, remove = (
        (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    )

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    add(fd, wake)
    try:
        await fut
    finally:
        remove(fd)


async def _read(loop: asyncio.AbstractEventLoop, fd: int, n: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < n:
        try:
            chunk = os.read(fd, n - got)
        except BlockingIOError:
            await _ready(loop, fd, write=False)
            continue
        if not chunk:
            raise OSError("the regex worker exited")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
