"""A loopback TCP relay that emulates a long link, with fault injection, for benchmarks and fault tests.

    with Relay(target=("127.0.0.1", sshd.port), rtt_ms=50) as relay:
        ...connect to 127.0.0.1:relay.port instead of the sshd...
        relay.stats()          # accepted, refused, cut, stalled, active, bytes_up, bytes_down

Link model (per direction, per relay, like one network path shared by all connections):
  - latency: a chunk read from one side at time t is released to the other side at t + rtt/2. Chunks are
    timestamped and queued, so many chunks are in flight at once: the delay does not cap throughput
    (sleeping per read would cap it at bufsize / delay). One reader and one writer thread per direction
    per connection; with no delay and no rate cap the reader forwards directly (one thread per direction).
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

Everything is bounded: stop() (or leaving the `with` block) shuts every socket down, which wakes every
thread, and joins them with a timeout. Also runnable by hand:
    python tests/support/relay.py --target 127.0.0.1:2222 --rtt-ms 50 [--rate 50M] [--port 0]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

CHUNK = 256 * 1024
DEFAULT_MAX_INFLIGHT = 32 * 1024 * 1024
_EOF = None  # queue marker: the reading side ended its stream


class Link:
    """When a chunk leaves one direction of the emulated link: the timestamp model, free of I/O.

    release(now, size) -> the monotonic time at which a chunk of `size` bytes that was read at `now`
    may be written out. Thread-safe: every connection of a relay shares the link of its direction.
    """

    def __init__(self, one_way_delay: float, rate_bytes_per_s: float | None = None):
        if one_way_delay < 0:
            raise ValueError("delay must not be negative")
        if rate_bytes_per_s is not None and rate_bytes_per_s <= 0:
            raise ValueError("rate must be positive (or None for no cap)")
        self.delay = one_way_delay
        self.rate = rate_bytes_per_s
        self._free_at = 0.0
        self._lock = threading.Lock()

    @property
    def immediate(self) -> bool:
        return self.delay == 0 and self.rate is None

    def release(self, now: float, size: int) -> float:
        if self.rate is None:
            return now + self.delay
        with self._lock:
            start = max(now, self._free_at)
            self._free_at = start + size / self.rate
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


class _Connection:
    """One relayed connection: client socket, upstream socket, 2 or 4 threads."""

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
        self.threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        for name, src, dst, link, upward in (
            ("up", self.client, self.upstream, self.relay.link_up, True),
            ("down", self.upstream, self.client, self.relay.link_down, False),
        ):
            if link.immediate:
                self._spawn(f"{name}-fwd", self._forward_direct, src, dst, upward)
            else:
                queue = _Pipe(self.relay.max_inflight, self)
                self._spawn(f"{name}-read", self._read_into, src, queue, link, upward)
                self._spawn(f"{name}-write", self._write_from, queue, dst)

    def _spawn(self, name: str, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=f"relay-{self.number}-{name}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def abort(self, reset: bool = True) -> None:
        """Close both sides now; wakes every thread of this connection."""
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                if reset:  # close() then sends RST rather than FIN for whatever is left
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv/send on it
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.close()
        self.relay._forget(self)

    def stall(self) -> None:
        with self._lock:
            if self.stalled.is_set():
                return
            self.stalled.set()
        self.relay._count("stalled")

    def _direction_ended(self) -> None:
        with self._lock:
            self._ended += 1
            both = self._ended == 2
        if both:
            self.abort(reset=False)

    # -- data path ------------------------------------------------------------------------------------

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

    def _hold(self) -> None:
        """A stalled connection's threads wait here (reading nothing, sending nothing) until it closes."""
        while not self.closed.wait(0.5):
            if self.relay._stopping.is_set():
                return

    def _check_fault_first(self, upward: bool) -> str | None:
        """A threshold of 0 strikes before the first byte."""
        if upward:
            if self.cut_at == 0 and self.up_bytes == 0:
                return "cut"
            if self.stall_at == 0 and self.up_bytes == 0:
                return "stall"
        return None

    def _strike(self, fault: str) -> None:
        if fault == "cut":
            self.relay._count("cut")
            self.abort(reset=True)
        else:
            self.stall()
            self._hold()

    def _forward_direct(self, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        try:
            fault = self._check_fault_first(upward)
            if fault:
                self._strike(fault)
                return
            while not self.closed.is_set():
                if self.stalled.is_set():
                    self._hold()
                    return
                size = src.recv_into(buffer)
                if self.stalled.is_set():
                    self._hold()
                    return
                if not size:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    self._direction_ended()
                    return
                allowed, fault = self._admit(size, upward)
                if fault == "stall":
                    self.stall()  # before the last bytes go out, so no answer to them gets through
                if allowed:
                    dst.sendall(view[:allowed])
                    self._account(allowed, upward)
                if fault:
                    self._strike(fault)
                    return
        except OSError:
            self.abort(reset=True)

    def _read_into(self, src: socket.socket, queue: "_Pipe", link: Link, upward: bool) -> None:
        try:
            fault = self._check_fault_first(upward)
            if fault:
                queue.put(0.0, fault)
                return
            while not self.closed.is_set():
                if self.stalled.is_set():
                    queue.put(0.0, "stall")
                    return
                data = src.recv(CHUNK)
                now = time.monotonic()
                if self.stalled.is_set():
                    queue.put(0.0, "stall")
                    return
                if not data:
                    queue.put(link.release(now, 0), _EOF)
                    return
                allowed, fault = self._admit(len(data), upward)
                if allowed:
                    self._account(allowed, upward)  # counted as read; delivered after the delay
                    if not queue.put(link.release(now, allowed), data if allowed == len(data) else data[:allowed]):
                        return
                if fault:
                    # the fault strikes when the last admitted byte arrives at the far side
                    queue.put(link.release(now, 0), fault)
                    return
        except OSError:
            queue.put(0.0, "abort")

    def _write_from(self, queue: "_Pipe", dst: socket.socket) -> None:
        try:
            while True:
                item = queue.get()
                if item is None:  # connection closed while waiting
                    return
                due, data = item
                delay = due - time.monotonic()
                if delay > 0 and self.closed.wait(delay):
                    return
                if data is _EOF:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    self._direction_ended()
                    return
                if isinstance(data, str):
                    if data == "abort":
                        self.abort(reset=True)
                    else:
                        self._strike(data)
                    return
                if self.stalled.is_set():
                    self._hold()
                    return
                dst.sendall(data)
        except OSError:
            self.abort(reset=True)


class _Pipe:
    """A bounded queue of (release time, chunk) for one direction of one connection."""

    def __init__(self, max_bytes: int, connection: _Connection):
        self.max_bytes = max_bytes
        self.connection = connection
        self.items: collections.deque = collections.deque()
        self.size = 0
        self.cond = threading.Condition()

    def put(self, due: float, data) -> bool:
        size = len(data) if isinstance(data, bytes) else 0
        with self.cond:
            while size and self.size and self.size + size > self.max_bytes and self._alive():
                self.cond.wait(0.5)
            if not self._alive():
                return False
            self.items.append((due, data))
            self.size += size
            self.cond.notify_all()
            return True

    def _alive(self) -> bool:
        return not (self.connection.closed.is_set() or self.connection.relay._stopping.is_set())

    def get(self):
        with self.cond:
            while not self.items:
                if not self._alive():
                    return None
                self.cond.wait(0.5)
            due, data = self.items.popleft()
            if isinstance(data, bytes):
                self.size -= len(data)
            self.cond.notify_all()
            return due, data


class Relay:
    """Listen on host:port (port 0: a free one) and relay every connection to `target`."""

    def __init__(self, target: tuple[str, int], rtt_ms: float = 50.0, rate_bytes_per_s: float | None = None,
                 host: str = "127.0.0.1", port: int = 0, max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 faults: Faults | None = None, connect_timeout: float = 10.0):
        self.target = target
        self.rtt_ms = rtt_ms
        self.rate_bytes_per_s = rate_bytes_per_s
        self.host = host
        self.max_inflight = max_inflight
        self.connect_timeout = connect_timeout
        self.faults = faults or Faults()
        self.link_up = Link(rtt_ms / 2000.0, rate_bytes_per_s)
        self.link_down = Link(rtt_ms / 2000.0, rate_bytes_per_s)
        self._lock = threading.Lock()
        self._connections: dict[int, _Connection] = {}
        self._all_threads: list[threading.Thread] = []
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
        self._acceptor: threading.Thread | None = None

    # -- public API -----------------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self) -> "Relay":
        if self._acceptor is None:
            self._acceptor = threading.Thread(target=self._accept_loop, name=f"relay-accept-{self.port}", daemon=True)
            self._acceptor.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, close every connection, join every thread (bounded by `timeout`)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        for connection in self.connections():
            connection.abort(reset=True)
        deadline = time.monotonic() + timeout
        if self._acceptor is not None:
            self._acceptor.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            threads = list(self._all_threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

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
                self._all_threads[:] = [thread for thread in self._all_threads if thread.is_alive()]
            connection.start()
            with self._lock:
                self._all_threads.extend(connection.threads)


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
