# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Bandwidth budgets: `bandwidth_limit` (one host's push, all its connections) and
`total_bandwidth_limit` (everything the controller sends for one task, all hosts and forks).

parse_rate turns what the user wrote into bytes per second; `for_push` makes a push's Budget, which
the engine's workers take from before each request goes on the wire (see Budget for the design and
how its limits are shared across processes); the state files of the total limit live in
`runtime_dir()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import multiprocessing
import os
import re
import struct
import threading
import time
from typing import Callable

from ansible_collections.multipush.sftp.plugins.plugin_utils._controller_dir import prune_runs, run_file, runtime_dir
from ansible_collections.multipush.sftp.plugins.plugin_utils._plan import PlanError

# Byte units follow the push's sizes (K, M, G, T alone are binary, KB/MB/GB decimal); bit units are
# decimal as network links are sold (800Mbit = 100,000,000 bytes per second).
_BYTE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
               "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}
_BIT_UNITS = {"bit": 1 / 8, "kbit": 1000 / 8, "mbit": 1000**2 / 8, "gbit": 1000**3 / 8,
              "bps": 1 / 8, "kbps": 1000 / 8, "mbps": 1000**2 / 8, "gbps": 1000**3 / 8}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*(?:/\s*s)?\s*$")


def parse_rate(value, option: str) -> float | None:
    """'100M' (bytes per second), '800Mbit', '1.5G/s', '250000' -> bytes per second; None or ''
    -> None (no limit). Raises PlanError naming the option for anything else, zero included."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    problem = (f"{option}={value!r} is not a rate: use bytes per second with an optional unit, such as "
               "100M (MiB/s), 50MB (10^6 bytes/s) or 800Mbit (bits/s), or leave it unset for no limit")
    if isinstance(value, bool):
        raise PlanError(problem)
    if isinstance(value, (int, float)):
        rate = float(value)
    else:
        match = _RATE_RE.match(str(value))
        if not match:
            raise PlanError(problem)
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit in _BYTE_UNITS:
            rate = number * _BYTE_UNITS[unit]
        elif unit in _BIT_UNITS:
            rate = number * _BIT_UNITS[unit]
        else:
            raise PlanError(problem)
    if not math.isfinite(rate):  # a number given as .inf or .nan in YAML
        raise PlanError(problem)
    if rate <= 0:
        raise PlanError(f"{option}={value!r} must be more than zero bytes per second; leave it unset for no limit")
    return rate


# -- budgets -------------------------------------------------------------------------------------

# How far ahead of the rate a budget lets bytes go (GCRA's burst tolerance): 0.1 s of the rate, so
# over any 5 s at most 2% more than the limit goes out (see Budget). Never less than one request.
BURST_SECONDS = 0.1
# The largest write request under a limit: this long at the tightest rate (1% of a 5 s budget), so
# one request never decides whether a 5 s window keeps to the limit. Floor: a useful request still.
REQUEST_SECONDS = 0.05
MIN_REQUEST = 1024
# What a request costs on the wire besides the bytes it carries: per SSH packet (up to 32 KiB of
# channel data) a length, padding length, channel-data head, up to 19 bytes of padding and a 16-byte
# MAC or tag; per request not framed by the write path, its SFTP head.
SSH_PACKET_DATA = 32768
SSH_PACKET_OVERHEAD = 50
SFTP_REQUEST_OVERHEAD = 32

_STATE = struct.Struct("=d")  # the budget's next free time (monotonic seconds)
BUDGET_KIND = "total"  # the total budget's state file: total-<run's pid>-... (see _controller_dir.run_file)


def wire_bytes(nbytes: int) -> int:
    """What `nbytes` of SFTP request (head and data) cost on the SSH connection."""
    return nbytes + SSH_PACKET_OVERHEAD * max(1, -(-nbytes // SSH_PACKET_DATA))


def request_bytes(args) -> int:
    """Roughly what an SFTP request with these arguments puts on the wire (paths, handles, data)."""
    carried = sum(len(arg) for arg in args if isinstance(arg, (bytes, bytearray, str, memoryview)))
    return wire_bytes(SFTP_REQUEST_OVERHEAD + carried)


class _Bucket:
    """One limit: a rate and the shared "next free" time of its virtual clock, read and written
    under a lock that holds across processes (`locked()` yields get/set of that time)."""

    def __init__(self, rate: float, name: str):
        self.rate = float(rate)
        self.name = name

    def slack(self, nbytes: int) -> float:
        """How far ahead of the clock a request may be granted: the burst, or its own time if longer."""
        return max(BURST_SECONDS, nbytes / self.rate)

    def ready_at(self, nbytes: int) -> float:
        """When `nbytes` would be allowed (nothing reserved)."""
        with self.locked() as cell:
            return cell[0] + nbytes / self.rate - self.slack(nbytes)

    def reserve(self, nbytes: int, now: float) -> float:
        """Reserve `nbytes` first come, first served: the time from which they may be sent."""
        with self.locked() as cell:
            start = max(now, cell[0] + nbytes / self.rate - self.slack(nbytes))
            cell[0] = max(cell[0], start) + nbytes / self.rate
        return start

    def commit(self, nbytes: int, now: float) -> None:
        """Count `nbytes` sent now (the caller made sure they were allowed)."""
        with self.locked() as cell:
            cell[0] = max(cell[0], now) + nbytes / self.rate


class LocalBucket(_Bucket):
    """Shared by the threads of one process (the unit tests, a push without workers)."""

    def __init__(self, rate: float, name: str = "limit"):
        super().__init__(rate, name)
        self._lock = threading.Lock()
        self._next_free = 0.0

    @contextlib.contextmanager
    def locked(self):
        with self._lock:
            cell = [self._next_free]
            yield cell
            self._next_free = cell[0]


class SharedBucket(_Bucket):
    """Shared by processes forked after it was made: a double and a lock in shared memory."""

    def __init__(self, rate: float, context, name: str = "host"):
        super().__init__(rate, name)
        self._value = context.RawValue("d", 0.0)
        self._lock = context.Lock()

    @contextlib.contextmanager
    def locked(self):
        with self._lock:
            cell = [self._value.value]
            yield cell
            self._value.value = cell[0]


class FileBucket(_Bucket):
    """Shared by every process of the controller that opens the same state file: 8 bytes (the next
    free time) under fcntl.flock. Each process opens the file itself (an flock belongs to an open
    file description, which a fork would share, and then exclude nothing). Its name says which run
    it serves, for pruning (_controller_dir.prune_runs)."""

    def __init__(self, rate: float, path: str, name: str = "total"):
        super().__init__(rate, name)
        self.path = path
        self._fd: int | None = None
        self._pid = -1

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            self._pid = os.getpid()
        return self._fd

    @contextlib.contextmanager
    def locked(self):
        fd = self._descriptor()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            data = os.pread(fd, _STATE.size, 0)
            cell = [_STATE.unpack(data)[0] if len(data) == _STATE.size else 0.0]
            yield cell
            os.pwrite(fd, _STATE.pack(cell[0]), 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


class Budget:
    """Bytes per second for the connections of a push: its host's limit, the task's total, or both.

    The design is GCRA's virtual clock. Each limit keeps one shared time, "next free": when the link
    it models has sent everything granted so far. A request reserves n / rate seconds there, first
    come, first served, and the caller sleeps until its slot, then sends. A limit's slots never
    overlap and a slot may start at most its slack (BURST_SECONDS, or the request's own time if
    longer) before the clock, so over any W seconds a limit grants at most rate * W + max(rate *
    BURST_SECONDS, one request): within 5% over any 5 s (requests are at most REQUEST_SECONDS of the
    tightest rate). Callers that ask while others wait get the slots right behind theirs, so greedy
    senders reach the rate; a caller that comes late loses only time nobody was waiting for.

    Both limits at once: a request must be allowed by both when it goes out. Reserving both at once
    would leave holes in the total whenever a host's own limit put its slot later (the other hosts
    could not use them), and waiting for one and then the other would let bytes the first spread
    out pile up behind the second. So one request per host at a time (`turn`, shared by the host's
    workers) waits until its host's limit allows it, then reserves on the total from that moment,
    sleeps until that slot and is counted on the host's limit when it goes: both limits see it sent
    when they allowed it, and the total's queue holds at most one request per host, which also
    shares the total fairly among hosts.

    How the limits are shared:
    - `bandwidth_limit` (one host, all its connections): the engine's worker processes are forked
      from the host's coordinator, so a double and locks in shared memory made before the fork
      (SharedBucket) reach them all: a grant costs a lock, no system call, and leaves no file.
    - `total_bandwidth_limit` (all hosts): Ansible forks the hosts' coordinators before any code of
      ours runs, so they share nothing but the file system: one state file per task and run (the
      run_key) under fcntl.flock (FileBucket), in a private runtime directory, pruned once the
      ansible-playbook that owned it is gone. A push driven without a run_key keeps its total to itself.
    """

    # A worker killed while holding its host's turn (only when the engine aborts) must not stop the
    # others for good: after this long they go on without it.
    TURN_SECONDS = 600.0

    def __init__(self, host=None, total=None, turn=None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.host = host
        self.total = total
        self.turn = turn  # one request of the host at a time, with both limits (see above)
        self.clock = clock
        self.sleep = sleep

    @property
    def buckets(self) -> list:
        return [bucket for bucket in (self.host, self.total) if bucket is not None]

    @property
    def largest_request(self) -> int:
        """The largest write request worth sending under the tightest limit (see REQUEST_SECONDS)."""
        return max(MIN_REQUEST, int(min(bucket.rate for bucket in self.buckets) * REQUEST_SECONDS))

    def steps(self, nbytes: int):
        """The times to wait for before `nbytes` may go (a generator: a simulation can interleave
        callers on a fake clock). With both limits, run it within the host's turn."""
        if self.host is None or self.total is None:
            yield (self.host or self.total).reserve(nbytes, self.clock())
            return
        yield self.host.ready_at(nbytes)
        yield self.total.reserve(nbytes, self.clock())
        self.host.commit(nbytes, self.clock())

    def take(self, nbytes: int) -> None:
        """Wait until `nbytes` may go on the wire; they count as sent when this returns."""
        with self._turn():
            for until in self.steps(nbytes):
                wait = until - self.clock()
                if wait > 0:
                    self.sleep(wait)

    @contextlib.contextmanager
    def _turn(self):
        if self.turn is None or self.host is None or self.total is None:
            yield
            return
        held = self.turn.acquire(timeout=self.TURN_SECONDS)
        try:
            yield
        finally:
            if held:
                self.turn.release()


def total_state_file(run_key: str, directory: str | None = None) -> str:
    """The state file of `run_key`'s total budget (those of runs that are over pruned on the way)."""
    directory = directory or runtime_dir()
    prune_runs(directory, (BUDGET_KIND,))
    return run_file(directory, BUDGET_KIND, run_key, ".budget")


def for_push(options, context=None) -> Budget | None:
    """The budget of one push from its options (None: no limit, and no cost on the data path). Make it
    in the coordinator before the engine forks its workers: the host's limit lives in memory they
    inherit. Its total limit is shared through the run_key's state file by every host of the task."""
    host_rate, total_rate = options.bandwidth_limit, options.total_bandwidth_limit
    if host_rate is None and total_rate is None:
        return None
    context = context or multiprocessing.get_context("fork")
    host = SharedBucket(host_rate, context, "host") if host_rate is not None else None
    total = None
    if total_rate is not None and options.run_key:
        total = FileBucket(total_rate, total_state_file(options.run_key), "total")
    elif total_rate is not None:
        total = SharedBucket(total_rate, context, "total")
    return Budget(host, total, context.Lock() if host is not None and total is not None else None)
