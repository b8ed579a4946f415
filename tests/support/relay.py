"""A loopback TCP relay that emulates a long link, with fault injection, for benchmarks and fault tests.

    with Relay(target=("127.0.0.1", sshd.port), rtt_ms=50) as relay:
        ...connect to 127.0.0.1:relay.port instead of the sshd...
        relay.stats()          # accepted, refused, cut, stalled, active, bytes_up, bytes_down

Link model (per direction, per relay, like one network path shared by all connections):
  - latency: a chunk read from one side at time t is released to the other side at t + rtt/2. Chunks are
    timestamped and queued, so many chunks are in flight at once: the delay does not cap throughput
    (sleeping per read would cap it at bufsize / delay). One thread serves every connection of a relay:
    a selector for the sockets, a heap of release times; with no delay and no rate cap a chunk is written
    out as soon as it was read.
  - rate cap (optional, bytes per second per direction, shared by all connections of the relay): a chunk
    occupies the link for size / rate seconds after the previous one has left it.
  - in-flight bound: at most `max_inflight` bytes queued per direction per connection (what TCP buffers
    would hold on a tuned long link); a full queue stops reading, so backpressure reaches the sender.

Faults (for reliability tests; change them at any time, they apply to connections accepted afterwards):
  - cut_after_bytes=N: reset a connection once N bytes went client -> server (exactly N are delivered);
    cut_connections=K limits it to the next K connections accepted (None: every one).
  - stall_after_bytes=N: after N bytes client -> server, forward nothing more in either direction and
    keep both sockets open (a black hole); stall_connections=K as above.
  - refuse_every=k: accept, then immediately close, every k-th new connection (as sshd's MaxStartups
    does); counted from the moment it was set.
  - at chosen moments: relay.cut_next(n_bytes), relay.stall_next(n_bytes), relay.cut_all(), relay.stall_all(),
    relay.faults.update(refuse_every=3, ...), relay.faults.clear().

A fleet behind one uplink (tests/support/fleet.py): several relays may share one upward Link, the controller's
upload, e.g. `uplink = Link(0.010, 50e6, max_backlog=0.1)` and `Relay(target, rtt_ms=20, uplink=uplink)` for each
host. The shared link serialises every relay's chunks at its rate; `max_backlog` (seconds of data queued on the
link, like a router's buffer) stops reading from every relay's clients while the link is that far behind, so
backpressure reaches the senders instead of gigabytes piling up in the relays. Every Link and every relay
direction has a Meter: bytes counted when read, in 0.1 s buckets, for totals, averages and "the most in any 5 s".

Everything is bounded: stop() (or leaving the `with` block) closes every socket and joins the relay's two
threads (the acceptor and the I/O loop) with a timeout. Also runnable by hand:
    python tests/support/relay.py --target 127.0.0.1:2222 --rtt-ms 50 [--rate 50M] [--port 0]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import heapq
import itertools
import selectors
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

CHUNK = 256 * 1024
DEFAULT_MAX_INFLIGHT = 32 * 1024 * 1024


class Meter:
    """Bytes counted over time: a total and per-`resolution` buckets of monotonic time (thread-safe).

    add(size) as bytes pass; then total, rate() (average bytes/s from the first to the last byte),
    max_window(5.0) (the most bytes in any 5 s, to the bucket) and series() for plots or checks.
    """

    def __init__(self, resolution: float = 0.1):
        if resolution <= 0:
            raise ValueError("resolution must be positive")
        self.resolution = resolution
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.total = 0
            self._buckets: dict[int, int] = {}
            self.first: float | None = None  # monotonic time of the first and the last counted byte
            self.last: float | None = None

    def add(self, size: int, now: float | None = None) -> None:
        if size <= 0:
            return
        now = time.monotonic() if now is None else now
        index = int(now / self.resolution)
        with self._lock:
            self.total += size
            self._buckets[index] = self._buckets.get(index, 0) + size
            if self.first is None:
                self.first = now
            self.last = now

    def snapshot(self) -> tuple[int, dict[int, int], float | None, float | None]:
        with self._lock:
            return self.total, dict(self._buckets), self.first, self.last

    def series(self) -> list[tuple[float, int]]:
        """(bucket start time, bytes in it) for every bucket from the first to the last, empty ones too."""
        _total, buckets, _first, _last = self.snapshot()
        if not buckets:
            return []
        low, high = min(buckets), max(buckets)
        return [(index * self.resolution, buckets.get(index, 0)) for index in range(low, high + 1)]

    def max_window(self, seconds: float = 5.0) -> int:
        """The most bytes counted in any `seconds` (a whole number of buckets) of the recording."""
        width = max(1, round(seconds / self.resolution))
        values = [size for _start, size in self.series()]
        if not values:
            return 0
        best = current = sum(values[:width])
        for index in range(width, len(values)):
            current += values[index] - values[index - width]
            best = max(best, current)
        return best

    def rate(self) -> float | None:
        """Average bytes per second from the first counted byte to the last (None: under one bucket)."""
        total, _buckets, first, last = self.snapshot()
        if first is None or last is None or last - first < self.resolution:
            return None
        return total / (last - first)


class Link:
    """When a chunk leaves one direction of the emulated link: the timestamp model, free of I/O.

    release(now, size) -> the monotonic time at which a chunk of `size` bytes that was read at `now`
    may be written out. Thread-safe: every connection of a relay shares the link of its direction, and
    several relays may share one link (a fleet's uplink). max_backlog (seconds, only with a rate): how far
    behind the link may fall before the relays stop reading from their clients (the link's buffer).
    `meter` counts the bytes read into the link by every connection of every relay using it.
    """

    def __init__(self, one_way_delay: float, rate_bytes_per_s: float | None = None,
                 max_backlog: float | None = None):
        if one_way_delay < 0:
            raise ValueError("delay must not be negative")
        if max_backlog is not None and max_backlog <= 0:
            raise ValueError("max_backlog must be positive (or None for no bound)")
        self.delay = one_way_delay
        self.rate = None
        self.max_backlog = max_backlog
        self.meter = Meter()
        self._free_at = 0.0
        self._lock = threading.Lock()
        self.set_rate(rate_bytes_per_s)

    def backlog_clears_at(self, now: float) -> float | None:
        """None while the link takes more; else when its backlog falls back under max_backlog."""
        if self.max_backlog is None or self.rate is None:
            return None
        at = self._free_at - self.max_backlog
        return at if at > now else None

    def set_rate(self, rate_bytes_per_s: float | None) -> None:
        """Change the cap while connections run; chunks already scheduled keep their times."""
        if rate_bytes_per_s is not None and rate_bytes_per_s <= 0:
            raise ValueError("rate must be positive (or None for no cap)")
        self.rate = rate_bytes_per_s  # one assignment: release() reads it once per chunk

    def release(self, now: float, size: int) -> float:
        rate = self.rate  # read once: set_rate may change it meanwhile; no cap needs no lock
        if rate is None:
            return now + self.delay
        with self._lock:
            start = max(now, self._free_at)
            self._free_at = start + size / rate
            return self._free_at + self.delay


@dataclass
class Faults:
    """Fault settings of a relay; change them with update() (thread-safe) while connections run."""

    cut_after_bytes: int | None = None
    cut_connections: int | None = None  # how many of the next connections get the cut; None: every one
    stall_after_bytes: int | None = None
    stall_connections: int | None = None
    refuse_every: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _cut_left: int | None = field(default=None, repr=False, compare=False)
    _stall_left: int | None = field(default=None, repr=False, compare=False)
    _seen: int = field(default=0, repr=False, compare=False)

    _FIELDS = ("cut_after_bytes", "cut_connections", "stall_after_bytes", "stall_connections", "refuse_every")

    def __post_init__(self):
        self._check_and_arm(set(self._FIELDS))

    def update(self, **changes) -> None:
        """Set some fault settings, e.g. update(cut_after_bytes=10_000_000, cut_connections=1)."""
        unknown = set(changes) - set(self._FIELDS)
        if unknown:
            raise TypeError(f"unknown fault setting(s): {', '.join(sorted(unknown))}")
        with self._lock:
            for name, value in changes.items():
                setattr(self, name, value)
            self._check_and_arm(set(changes))

    def clear(self) -> None:
        self.update(**dict.fromkeys(self._FIELDS))

    def _check_and_arm(self, changed: set) -> None:
        for name in self._FIELDS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer or None, not {value!r}")
        if self.refuse_every is not None and self.refuse_every < 1:
            raise ValueError("refuse_every must be at least 1")
        if changed & {"cut_after_bytes", "cut_connections"}:
            self._cut_left = self.cut_connections
        if changed & {"stall_after_bytes", "stall_connections"}:
            self._stall_left = self.stall_connections
        if "refuse_every" in changed:
            self._seen = 0

    def assign(self) -> tuple[bool, int | None, int | None]:
        """For a newly accepted connection: (refuse it, cut after bytes, stall after bytes)."""
        with self._lock:
            if self.refuse_every is not None:
                self._seen += 1
                if self._seen % self.refuse_every == 0:
                    return True, None, None
            cut = stall = None
            if self.cut_after_bytes is not None and (self._cut_left is None or self._cut_left > 0):
                cut = self.cut_after_bytes
                if self._cut_left is not None:
                    self._cut_left -= 1
            if self.stall_after_bytes is not None and (self._stall_left is None or self._stall_left > 0):
                stall = self.stall_after_bytes
                if self._stall_left is not None:
                    self._stall_left -= 1
            return False, cut, stall


class _Direction:
    """One direction of one connection: chunks read from `src`, each waiting for its time to go to `dst`."""

    __slots__ = ("connection", "src", "dst", "link", "upward", "max_inflight", "queue", "queued_bytes", "offset",
                 "finished", "blocked", "timer_due")

    def __init__(self, connection: "_Connection", src: socket.socket, dst: socket.socket, link: Link, upward: bool,
                 max_inflight: int):
        self.connection = connection
        self.src = src
        self.dst = dst
        self.link = link
        self.upward = upward
        self.max_inflight = max_inflight
        self.queue: collections.deque = collections.deque()  # [release time, chunk or marker]
        self.queued_bytes = 0
        self.offset = 0  # how much of the first chunk a partial send already wrote
        self.finished = False  # src ended or a fault struck: nothing more is read from it
        self.blocked = False  # dst's send buffer is full: wait until it is writable
        self.timer_due: float | None = None  # the release time the loop will wake up for

    @property
    def reading(self) -> bool:
        """Whether src is read: not once finished, nor while the in-flight bound is reached (backpressure:
        the sender's TCP buffers fill up)."""
        return not self.finished and self.queued_bytes < self.max_inflight and (
            self.link.max_backlog is None or self.link.backlog_clears_at(time.monotonic()) is None)


class _Connection:
    """One relayed connection: client socket, upstream socket, the two directions between them.

    Its I/O runs on the relay's loop thread; abort() and stall() may be called from any thread.
    """

    def __init__(self, relay: "Relay", number: int, client: socket.socket, upstream: socket.socket,
                 cut_at: int | None, stall_at: int | None):
        self.relay = relay
        self.number = number
        self.client = client
        self.upstream = upstream
        self.cut_at = cut_at
        self.stall_at = stall_at
        self.up_bytes = 0  # client -> server, as forwarded (counted when read, after faults)
        self.down_bytes = 0
        self.stalled = threading.Event()
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self._ended = 0  # directions whose stream has ended cleanly
        self.up = _Direction(self, client, upstream, relay.link_up, True, relay.max_inflight)
        self.down = _Direction(self, upstream, client, relay.link_down, False, relay.max_inflight)

    def abort(self, reset: bool = True) -> None:
        """Close both sides now (any thread); the loop forgets the sockets."""
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                if reset:  # close() then sends RST rather than FIN for whatever is left
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
        self.relay._forget(self)
        self.relay._loop.call(self.relay._loop.release, self)

    def stall(self) -> None:
        """Forward nothing more either way and keep both sockets open (any thread)."""
        with self._lock:
            if self.stalled.is_set():
                return
            self.stalled.set()
        self.relay._count("stalled")
        self.relay._loop.call(self.relay._loop.watch, self)

    def _direction_ended(self) -> None:
        with self._lock:
            self._ended += 1
            both = self._ended == 2
        if both:
            self.abort(reset=False)

    def _admit(self, size: int, upward: bool) -> tuple[int, str | None]:
        """How many of `size` freshly read bytes may pass, and the fault that strikes after them."""
        if not upward:
            return size, None
        first = None
        for limit, fault in ((self.cut_at, "cut"), (self.stall_at, "stall")):
            if limit is not None and self.up_bytes + size >= limit and (first is None or limit < first[0]):
                first = (limit, fault)
        if first is None:
            return size, None
        return max(0, first[0] - self.up_bytes), first[1]

    def _account(self, size: int, upward: bool) -> None:
        if upward:
            self.up_bytes += size
        else:
            self.down_bytes += size
        self.relay._add_bytes(size, upward)
        now = time.monotonic()
        (self.up if upward else self.down).link.meter.add(size, now)
        (self.relay.meter_up if upward else self.relay.meter_down).add(size, now)

    def _strike(self, fault: str) -> None:
        if fault == "cut":
            self.relay._count("cut")
            self.abort(reset=True)
        else:
            self.stall()


_SENDMSG_MAX_BUFFERS = 64


class _Loop:
    """The relay's one I/O thread: every connection's sockets in one selector, every release time in one heap.

    One thread instead of reader and writer threads per direction: a chunk costs a recv, a heap entry and a
    share of one sendmsg, never a hand-over between threads (under a 50 ms link at 100 MB/s of 32 KiB SSH
    packets, the threaded relay spent ~7 CPU-s per GiB waking threads; see tests/bench/results/NOTES.md).
    """

    def __init__(self, relay: "Relay"):
        self.relay = relay
        self.selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        for sock in (self._wake_reader, self._wake_writer):
            sock.setblocking(False)
        self.selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._calls: collections.deque = collections.deque()
        self._timers: list = []  # (release time, sequence, direction)
        self._sequence = itertools.count()
        self._masks: dict[socket.socket, int] = {}
        self._open: set[_Connection] = set()
        self.thread = threading.Thread(target=self._run, name=f"relay-loop-{relay.port}", daemon=True)

    # -- from any thread ----------------------------------------------------------------------------------

    def call(self, function, *args) -> None:
        """Run function(*args) on the loop thread (now, when already on it)."""
        if threading.current_thread() is self.thread:
            function(*args)
            return
        self._calls.append((function, args))
        with contextlib.suppress(OSError):  # a full wake-up buffer already means "wake up"
            self._wake_writer.send(b"\0")

    # -- on the loop thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self.relay._stopping.is_set():
                timeout = 1.0
                if self._timers:
                    timeout = min(timeout, max(0.0, self._timers[0][0] - time.monotonic()))
                for key, mask in self.selector.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            self._wake_reader.recv(4096)
                        continue
                    self._serve(key, mask)
                self._run_calls()
                self._run_timers()
        finally:
            self._run_calls()
            for connection in list(self._open):
                connection.abort(reset=True)
            self._run_calls()
            self.selector.close()
            self._wake_reader.close()
            self._wake_writer.close()

    def _run_calls(self) -> None:
        while self._calls:
            function, args = self._calls.popleft()
            function(*args)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            due, _sequence, direction = heapq.heappop(self._timers)
            connection = direction.connection
            if direction.timer_due != due or connection.closed.is_set():
                continue
            direction.timer_due = None
            try:
                self._flush(direction, now)
            except OSError:
                connection.abort(reset=True)
            self.watch(connection)  # it may wait for room in dst now, or read again

    def add(self, connection: _Connection) -> None:
        """Start relaying a connection just accepted."""
        self._open.add(connection)
        for sock in (connection.client, connection.upstream):
            sock.setblocking(False)
        # a threshold of 0 strikes before the first byte
        if connection.cut_at == 0:
            connection._strike("cut")
        elif connection.stall_at == 0:
            connection._strike("stall")
        self.watch(connection)

    def watch(self, connection: _Connection) -> None:
        """Register each socket for what its connection waits for now (nothing once stalled or closed)."""
        if connection.closed.is_set():
            return
        for sock, outgoing, incoming in ((connection.client, connection.up, connection.down),
                                         (connection.upstream, connection.down, connection.up)):
            wanted = 0
            if not connection.stalled.is_set():
                if outgoing.reading:
                    wanted |= selectors.EVENT_READ
                elif not outgoing.finished:
                    self._wake_when_link_clears(outgoing)
                if incoming.blocked:
                    wanted |= selectors.EVENT_WRITE
            current = self._masks.get(sock, 0)
            if wanted == current:
                continue
            if current == 0:
                self.selector.register(sock, wanted, (connection, outgoing, incoming))
            elif wanted == 0:
                self.selector.unregister(sock)
            else:
                self.selector.modify(sock, wanted, (connection, outgoing, incoming))
            self._masks[sock] = wanted

    def _wake_when_link_clears(self, direction: _Direction) -> None:
        """A direction that stopped reading because its (shared) link is too far behind has nothing of its
        own to wake it up: a timer at the moment the link's backlog falls back under its bound does. When
        the backlog cleared between `reading` and here (another relay's thread, or time passing), the timer
        is due now: without it the socket would stay unregistered for good."""
        if direction.finished or direction.link.max_backlog is None or \
                direction.queued_bytes >= direction.max_inflight:
            return  # not the link's doing: its queue's own timers and writes wake it
        now = time.monotonic()
        wake = direction.link.backlog_clears_at(now) or now
        if direction.timer_due is None or wake < direction.timer_due:
            direction.timer_due = wake  # an earlier flush timer is re-armed by _flush when this one fires
            heapq.heappush(self._timers, (wake, next(self._sequence), direction))

    def release(self, connection: _Connection) -> None:
        """Forget and close the sockets of an aborted connection."""
        self._open.discard(connection)
        for sock in (connection.client, connection.upstream):
            if self._masks.pop(sock, 0):
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(sock)
            with contextlib.suppress(OSError):
                sock.close()

    def _serve(self, key, mask: int) -> None:
        connection, outgoing, incoming = key.data
        try:
            if mask & selectors.EVENT_WRITE and not connection.closed.is_set():
                incoming.blocked = False
                self._flush(incoming, time.monotonic())
            if mask & selectors.EVENT_READ and not connection.closed.is_set():
                self._read(outgoing)
        except OSError:
            connection.abort(reset=True)
        if not connection.closed.is_set():
            self.watch(connection)

    def _read(self, direction: _Direction) -> None:
        connection = direction.connection
        if connection.stalled.is_set() or not direction.reading:
            return
        try:
            data = direction.src.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = None
        now = time.monotonic()
        if data is None:  # the sender's side failed: whatever came before still arrives, then the reset
            self._append(direction, 0.0, "abort")
        elif not data:
            self._append(direction, direction.link.release(now, 0), "eof")
        else:
            allowed, fault = connection._admit(len(data), direction.upward)
            if allowed:
                connection._account(allowed, direction.upward)  # counted as read; delivered after the delay
                self._append(direction, direction.link.release(now, allowed),
                             data if allowed == len(data) else data[:allowed])
            if fault:  # strikes when the last admitted byte arrives at the far side
                self._append(direction, direction.link.release(now, 0), fault)
        self._flush(direction, now)

    def _append(self, direction: _Direction, due: float, item) -> None:
        if isinstance(item, str):
            direction.finished = True  # nothing is read after the stream's end or a fault
        else:
            direction.queued_bytes += len(item)
        direction.queue.append((due, item))

    def _flush(self, direction: _Direction, now: float) -> None:
        """Send what is due, in order; then wait for the next release time or for room in dst."""
        connection = direction.connection
        queue = direction.queue
        while queue and not direction.blocked and not connection.closed.is_set():
            due, item = queue[0]
            if due > now:
                if direction.timer_due != due:
                    direction.timer_due = due
                    heapq.heappush(self._timers, (due, next(self._sequence), direction))
                return
            if connection.stalled.is_set():
                return  # a black hole: what is queued stays there
            if isinstance(item, str):
                queue.popleft()
                self._mark(direction, item)
                continue
            self._send_due(direction, now)

    def _send_due(self, direction: _Direction, now: float) -> None:
        buffers = []
        for due, item in direction.queue:
            if due > now or isinstance(item, str) or len(buffers) == _SENDMSG_MAX_BUFFERS:
                break
            buffers.append(memoryview(item)[direction.offset:] if not buffers and direction.offset else item)
        try:
            sent = direction.dst.sendmsg(buffers)
        except BlockingIOError:
            sent = 0
        direction.blocked = sent < sum(len(buffer) for buffer in buffers)  # dst's buffer is full: wait for room
        sent += direction.offset
        queue = direction.queue
        while queue and not isinstance(queue[0][1], str) and sent >= len(queue[0][1]):
            size = len(queue.popleft()[1])
            sent -= size
            direction.queued_bytes -= size
        direction.offset = sent

    def _mark(self, direction: _Direction, marker: str) -> None:
        connection = direction.connection
        if marker == "eof":
            with contextlib.suppress(OSError):
                direction.dst.shutdown(socket.SHUT_WR)
            connection._direction_ended()
        elif marker == "abort":
            connection.abort(reset=True)
        else:
            connection._strike(marker)


class Relay:
    """Listen on host:port (port 0: a free one) and relay every connection to `target`.

    uplink: a Link shared with other relays for the client -> server direction (the controller's upload);
    its delay and rate replace rtt_ms / 2 and rate_bytes_per_s upward. meter_up / meter_down: this
    relay's bytes over time."""

    def __init__(self, target: tuple[str, int], rtt_ms: float = 50.0, rate_bytes_per_s: float | None = None,
                 host: str = "127.0.0.1", port: int = 0, max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 faults: Faults | None = None, connect_timeout: float = 10.0, uplink: Link | None = None):
        self.target = target
        self.rtt_ms = rtt_ms
        self.rate_bytes_per_s = rate_bytes_per_s
        self.host = host
        self.max_inflight = max_inflight
        self.connect_timeout = connect_timeout
        self.faults = faults or Faults()
        # uplink: a Link shared with other relays (client -> server; its own delay and rate, not rtt_ms and
        # rate_bytes_per_s, which then apply to the downward direction only)
        self.link_up = uplink if uplink is not None else Link(rtt_ms / 2000.0, rate_bytes_per_s)
        self.link_down = Link(rtt_ms / 2000.0, rate_bytes_per_s)
        self.meter_up = Meter()  # this relay's bytes over time (the link's meters count all its relays)
        self.meter_down = Meter()
        self._lock = threading.Lock()
        self._connections: dict[int, _Connection] = {}
        self._counters = dict.fromkeys(("accepted", "refused", "cut", "stalled", "upstream_failed"), 0)
        self._bytes = [0, 0]  # up (client -> server), down
        self._numbers = itertools.count(1)
        self._stopping = threading.Event()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self._loop = _Loop(self)
        self._acceptor: threading.Thread | None = None
        self._all_threads: list[threading.Thread] = []

    # -- public API -----------------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self) -> "Relay":
        if self._acceptor is None:
            self._acceptor = threading.Thread(target=self._accept_loop, name=f"relay-accept-{self.port}", daemon=True)
            self._all_threads = [self._loop.thread, self._acceptor]
            self._loop.thread.start()
            self._acceptor.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, close every connection, join both threads (bounded by `timeout`)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        deadline = time.monotonic() + timeout
        self._loop.call(lambda: None)  # wake the loop: it sees _stopping, closes every connection and ends
        for thread in self._all_threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if not self._loop.thread.is_alive():
            for connection in self.connections():  # accepted while the loop was ending, or never started
                connection.abort(reset=True)
                self._loop.release(connection)

    def __enter__(self) -> "Relay":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def connections(self) -> list[_Connection]:
        with self._lock:
            return list(self._connections.values())

    def stats(self) -> dict:
        with self._lock:
            values = dict(self._counters)
            values.update(active=len(self._connections), bytes_up=self._bytes[0], bytes_down=self._bytes[1])
        return values

    @property
    def accepted(self) -> int:
        return self.stats()["accepted"]

    @property
    def bytes_up(self) -> int:
        return self.stats()["bytes_up"]

    @property
    def bytes_down(self) -> int:
        return self.stats()["bytes_down"]

    def cut_next(self, n_bytes: int, connections: int | None = 1) -> None:
        """Cut the next `connections` connections (None: all new ones) after n_bytes client -> server."""
        self.faults.update(cut_after_bytes=n_bytes, cut_connections=connections)

    def stall_next(self, n_bytes: int, connections: int | None = 1) -> None:
        self.faults.update(stall_after_bytes=n_bytes, stall_connections=connections)

    def cut_all(self) -> int:
        """Reset every open connection now; returns how many."""
        victims = self.connections()
        for connection in victims:
            self._count("cut")
            connection.abort(reset=True)
        return len(victims)

    def stall_all(self) -> int:
        """Stop forwarding on every open connection now (sockets stay open); returns how many."""
        victims = [connection for connection in self.connections() if not connection.stalled.is_set()]
        for connection in victims:
            connection.stall()
        return len(victims)

    def known_hosts_line(self, server_line: str) -> str:
        """The known_hosts line of the relayed server (as written for its own port) for the relay's port."""
        _names, key_type, key = server_line.split()[:3]
        return f"[{self.host}]:{self.port} {key_type} {key}\n"

    # -- internals ------------------------------------------------------------------------------------

    def _count(self, name: str) -> None:
        with self._lock:
            self._counters[name] += 1

    def _add_bytes(self, size: int, upward: bool) -> None:
        with self._lock:
            self._bytes[0 if upward else 1] += size

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.pop(connection.number, None)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _peer = self._listener.accept()
            except OSError:
                return
            if self._stopping.is_set():
                client.close()
                return
            refuse, cut_at, stall_at = self.faults.assign()
            if refuse:
                self._count("refused")
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=self.connect_timeout)
            except OSError:
                self._count("upstream_failed")
                client.close()
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(self, next(self._numbers), client, upstream, cut_at, stall_at)
            with self._lock:
                self._counters["accepted"] += 1
                self._connections[connection.number] = connection
            self._loop.call(self._loop.add, connection)


def parse_rate(text: str) -> float:
    units = {"K": 1e3, "M": 1e6, "G": 1e9}
    text = text.strip().upper().rstrip("B/S")
    return float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Loopback TCP relay adding round-trip time (and a rate cap).")
    parser.add_argument("--target", required=True, help="host:port to relay to")
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--rate", type=parse_rate, help="per-direction cap in bytes/s, e.g. 50M")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=3600.0, help="stop after this long (default 1 h)")
    args = parser.parse_args(argv)
    host, _sep, port = args.target.rpartition(":")
    with Relay((host.strip("[]"), int(port)), rtt_ms=args.rtt_ms, rate_bytes_per_s=args.rate, port=args.port) as relay:
        print(f"relay 127.0.0.1:{relay.port} -> {args.target}, rtt {args.rtt_ms} ms", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            relay._stopping.wait(args.seconds)
        print(relay.stats())
    return 0


if __name__ == "__main__":
    sys.exit(main())
