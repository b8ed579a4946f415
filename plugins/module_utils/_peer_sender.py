# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The sender of a fleet fan-out: runs on a host that already holds a verified copy and writes it
to another host's temp files, with the push's engine semantics.

Standard library only, and no import from the collection: the controller (plugin_utils/_peer_feed)
sends this file's text over an exec channel to the source host's Python, as it does for the
hashing service, followed by one JSON line saying what to write where. Everything it says comes
back as one JSON line per event on stdout: {"written": temp} for each temp whose every write was
acknowledged and whose handles are closed, {"bytes": n} as the receiver acknowledges data,
{"alive": true} while nothing moves, and last {"done": true} or {"error": ..., "kind": ...}.

Its connections are the source host's own OpenSSH client running the receiver's SFTP subsystem
(`ssh -s ... sftp`): the source's network, routes and ssh policy are what reaches the receiver, and
no SSH implementation has to be shipped. The client logs in with the agent the controller forwarded
on this session only (no key is ever written here), trusts only the host key the controller passed
(StrictHostKeyChecking=yes on a known_hosts file of its own, never accept-new), and cannot prompt.
That file lives in a private directory removed when the sender ends, whichever way it ends short
of SIGKILL; after a SIGKILL, the next sender on that host removes it.

Every wait is bounded: the client's ConnectTimeout and keepalives, a watchdog that ends a
connection whose replies stall, and the controller's end of the channel: when stdin closes, the
clients are killed and the sender exits.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time

# SFTP version 3 (draft-ietf-secsh-filexfer-02), the requests a sender needs
FXP_INIT, FXP_VERSION, FXP_OPEN, FXP_CLOSE, FXP_WRITE, FXP_SETSTAT = 1, 2, 3, 4, 6, 9
FXP_STATUS, FXP_HANDLE = 101, 102
FXF_WRITE, FXF_CREAT, FXF_TRUNC = 0x02, 0x08, 0x10
ATTR_SIZE, ATTR_PERMISSIONS = 0x01, 0x04
FX_OK = 0
STATUS_NAMES = {1: "end of file", 2: "no such file", 3: "permission denied", 4: "failure",
                5: "bad message", 6: "no connection", 7: "connection lost", 8: "operation unsupported"}

# Bytes per write: at most what the receiver's server takes (request["write_size"], which the controller's
# own connection learned from limits@openssh.com; 32 KiB, SFTP's minimum, when it did not say). Larger
# writes than this cost the source's pipes and the ssh client more CPU, not less.
WRITE_SIZE = 65536
SAFE_WRITE_SIZE = 32768
MAX_IN_FLIGHT = 48  # write requests per connection waiting for their replies
# OpenSSH's default ciphers with AES-GCM ahead of ChaCha20: every byte of a feed is encrypted by the
# source and decrypted by the receiver, and with the AES instructions of server CPUs GCM costs a
# fraction of ChaCha20's CPU. The same set as the default, so any server that takes the default agrees.
CIPHERS = ("aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
           "aes128-ctr,aes192-ctr,aes256-ctr")
MAX_PACKET = 256 * 1024 + 1024  # no reply of ours is larger; anything else is a broken stream
BATCH_BYTES = 1024 * 1024  # small files are taken several at a time: their opens share a round trip
BATCH_FILES = 32
OWNER_ONLY = 0o600
REPORT_SECONDS = 0.25
ALIVE_SECONDS = 5.0
EXIT_WAIT_SECONDS = 2.0
CLOSE_SECONDS = 5.0
PRIVATE_PREFIX = "multipush-peer-"  # + the sender's pid: its directory for the receiver's known_hosts line
# A feed starts on one connection and adds one at a time (request["connections"] is the most): see Growth.
GROW_SECONDS = 0.5  # the window over which the rate is measured before the next connection
GROW_IDLE_CORES = 1.0  # a stream at full speed keeps about one core of the source busy
GROW_GAIN = 1.15  # the connection added last must have raised the rate this much for another to follow
GROW_WINDOWS_LEFT = 2  # what is left must take this many windows at the current rate, or a login does not pay


class Failure(Exception):
    """Why the feed stopped. kind: source, receiver or interrupted (see _peer_feed.FeedFailure)."""

    def __init__(self, kind, message):
        super(Failure, self).__init__(message)
        self.kind = kind


# ---------------------------------------------------------------------------------------------
# SFTP packets
# ---------------------------------------------------------------------------------------------


def sftp_string(data):
    if not isinstance(data, bytes):
        data = data.encode("utf-8", "surrogateescape")
    return struct.pack(">I", len(data)) + data


def packet(kind, request_id, payload):
    """One SFTP packet: length, type, request id (INIT carries the version in its place)."""
    return struct.pack(">IBI", len(payload) + 5, kind, request_id) + payload


def open_payload(path, truncate):
    flags = FXF_WRITE | FXF_CREAT | (FXF_TRUNC if truncate else 0)
    return sftp_string(path) + struct.pack(">III", flags, ATTR_PERMISSIONS, OWNER_ONLY)


def size_payload(path, size):
    """SETSTAT of a created temp: its full size, and owner-only (a leftover temp kept its mode). By path,
    not handle: some servers have no FSETSTAT, every one has SETSTAT."""
    return sftp_string(path) + struct.pack(">IQI", ATTR_SIZE | ATTR_PERMISSIONS, size, OWNER_ONLY)


def write_header(request_id, handle, offset, length):
    """Everything of a WRITE packet before its data."""
    body = 4 + 4 + len(handle) + 8 + 4 + length
    return (struct.pack(">IBI", body + 1, FXP_WRITE, request_id) + sftp_string(handle)
            + struct.pack(">QI", offset, length))


def split_packets(buffer):
    """Complete packets at the start of `buffer` (a bytearray, consumed): [(type, id, body)]."""
    packets = []
    while len(buffer) >= 4:
        (length,) = struct.unpack_from(">I", buffer)
        if length < 5 or length > MAX_PACKET:
            raise Failure("interrupted", "the receiver's SFTP stream is broken (a packet of %d bytes)" % length)
        if len(buffer) < 4 + length:
            break
        kind, request_id = struct.unpack_from(">BI", buffer, 4)
        packets.append((kind, request_id, bytes(buffer[9:4 + length])))
        del buffer[:4 + length]
    return packets


def read_string(body, offset=0):
    (length,) = struct.unpack_from(">I", body, offset)
    end = offset + 4 + length
    if end > len(body):
        raise ValueError("string past the end of the packet")
    return body[offset + 4:end], end


def status_of(body):
    """(code, message) of a STATUS body (after the request id)."""
    (code,) = struct.unpack_from(">I", body)
    try:
        message = read_string(body, 4)[0].decode("utf-8", "replace")
    except (ValueError, struct.error):
        message = ""
    return code, message or STATUS_NAMES.get(code, "status %d" % code)


# ---------------------------------------------------------------------------------------------
# Bandwidth
# ---------------------------------------------------------------------------------------------


class TokenBucket:
    """A rate shared by all connections, on a virtual clock: each request reserves its bytes'
    time after the previous reservation, and waits until then. Idle time gives back at most
    `burst` bytes, so any window of T seconds carries at most rate * T + burst + one request."""

    def __init__(self, rate, burst, clock=time.monotonic):
        if rate <= 0:
            raise ValueError("the rate must be more than zero")
        self.rate = float(rate)
        self.burst = float(burst)
        self.clock = clock
        self.lock = threading.Lock()
        self.next_free = None

    def reserve(self, amount):
        """Seconds to wait before sending `amount` bytes (0: now)."""
        with self.lock:
            now = self.clock()
            earliest = now - self.burst / self.rate
            if self.next_free is None or self.next_free < earliest:
                self.next_free = earliest
            self.next_free += amount / self.rate
            return max(0.0, self.next_free - now)


def chunk_size_for(rate, server_limit=SAFE_WRITE_SIZE):
    """Bytes per write: never above the receiver's limit; with a rate limit, small enough that one write
    is a fiftieth of a second."""
    largest = max(4096, min(WRITE_SIZE, server_limit))
    if rate is None:
        return largest
    return int(max(4096, min(largest, rate / 50)))


# ---------------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------------


class Part:
    """What one batch entry writes: a file's ranges (all of a single-range file, with its creation;
    or one range of a file created beforehand)."""

    def __init__(self, item, ranges, create):
        self.item = item
        self.ranges = ranges
        self.create = create
        self.unacked = 0
        self.closed = False

    @property
    def size(self):
        return sum(length for _offset, length in self.ranges)


def parse_request(line):
    """The controller's JSON line -> dict, checked: raises Failure('interrupted') on bad input."""
    try:
        request = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
        receiver = request["receiver"]
        host, port, user = str(receiver["host"]), int(receiver["port"]), str(receiver["user"])
        lines = [str(text).strip() for text in receiver["known_hosts_lines"]]
        files = []
        for entry in request["files"]:
            size = int(entry["size"])
            ranges = [(int(offset), int(length)) for offset, length in entry["ranges"] if int(length) != 0]
            _check_ranges(entry["temp"], size, ranges)
            final = entry.get("final_path")
            files.append({"source_path": str(entry["source_path"]), "temp": str(entry["temp"]), "size": size,
                          "ranges": ranges, "final_path": str(final) if final else None})
        connections = max(1, int(request.get("connections") or 1))
        rate = request.get("bandwidth_limit")
        rate = float(rate) if rate is not None else None
        timeout = float(request.get("timeout") or 30)
        write_size = int(request.get("write_size") or SAFE_WRITE_SIZE)
        streaming = bool(request.get("streaming"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = "unreadable request from the controller (%s: %s)" % (type(exc).__name__, exc)
        raise Failure("interrupted", reason) from None
    if rate is not None and rate <= 0:
        raise Failure("interrupted", "bandwidth_limit must be more than zero bytes per second")
    if not lines or not all(lines):
        raise Failure("interrupted", "no known_hosts line for the receiver: its host key cannot be checked")
    if "\n" in "".join(lines) or host.startswith("-") or user.startswith("-"):
        raise Failure("interrupted", "the receiver's address, user or host key line is malformed")
    return {"host": host, "port": port, "user": user, "known_hosts_lines": lines, "files": files,
            "connections": connections, "bandwidth_limit": rate, "timeout": max(1.0, timeout),
            "write_size": write_size, "streaming": streaming}


def _check_ranges(temp, size, ranges):
    position = 0
    for offset, length in sorted(ranges):
        if offset != position or length <= 0:
            raise ValueError("the ranges of %s do not cover it once" % temp)
        position += length
    if position != size:
        raise ValueError("the ranges of %s cover %d of its %d bytes" % (temp, position, size))


def merge_span(spans, start, end):
    """Sorted, disjoint [start, end) spans with [start, end) added (touching spans join)."""
    if end <= start:
        return spans
    merged = []
    for low, high in spans:
        if high < start or low > end:
            merged.append([low, high])
        else:
            start, end = min(start, low), max(end, high)
    merged.append([start, end])
    merged.sort()
    return merged


class Availability:
    """What of each source copy may be read yet. A plain feed reads complete copies. A streaming feed
    (request["streaming"]) reads the copy of a host that is itself still receiving it: the controller
    says on stdin which byte spans of it are there, as that host's writes are acknowledged, one JSON
    line at a time: {"available": [[source_path, start, end], ...], "complete": false}; complete:
    all of every copy is there."""

    def __init__(self, complete=True):
        self.changed = threading.Condition()
        self.spans = {}  # source path -> sorted, merged [[start, end], ...]
        self.complete = complete
        self.offers = 0  # offers taken so far: wait() without a path returns once it grows

    def offer(self, entries, complete=False):
        with self.changed:
            for path, start, end in entries:
                self.spans[str(path)] = merge_span(self.spans.get(str(path), []), int(start), int(end))
            self.complete = self.complete or bool(complete)
            self.offers += 1
            self.changed.notify_all()

    def has(self, path, start, end):
        if self.complete or end <= start:
            return True
        return any(low <= start and end <= high for low, high in self.spans.get(path, ()))

    def wait(self, stop, seconds, path=None, start=0, end=0):
        """Until [start, end) of `path` is there (True), or, without a path, until anything new is
        offered; False after `seconds` or once `stop` is set."""
        deadline = time.monotonic() + seconds
        with self.changed:
            offers = self.offers
            while not (self.offers > offers if path is None else self.has(path, start, end)):
                left = deadline - time.monotonic()
                if left <= 0 or stop.is_set():
                    return False
                self.changed.wait(min(left, REPORT_SECONDS))
        return True

    def read_offers(self, data):
        """Complete lines of `data` (bytes) taken as offers; returns the unfinished rest."""
        while b"\n" in data:
            line, _newline, data = data.partition(b"\n")
            try:
                offer = json.loads(line.decode("utf-8"))
                self.offer(offer.get("available") or (), offer.get("complete"))
            except (ValueError, TypeError, AttributeError):
                continue  # not an offer: nothing becomes readable by it
        return data


def plan_parts(files):
    """(parts to create first: files of several ranges, parts to write). A file of one range (or
    none) is created and written by one part; the ranges of larger files each by a part of their
    own, on any connection, once the file exists at its full size. The ranges go first: the long
    jobs spread over the connections while the small files fill in behind them."""
    first, ranges, whole = [], [], []
    for item in files:
        if len(item["ranges"]) <= 1:
            whole.append(Part(item, list(item["ranges"]), create=True))
        else:
            first.append(Part(item, [], create=True))
            ranges.extend(Part(item, [piece], create=False) for piece in item["ranges"])
    return first, ranges + whole


def ssh_command(request, known_hosts, ssh="ssh"):
    """The OpenSSH client's command line for one connection to the receiver's SFTP subsystem."""
    timeout = int(max(1, round(request["timeout"])))
    # ssh's own keepalive is the backstop for a dead link: it gives up only well after the
    # watchdog's `timeout`, so a receiver that stops answering is reported as such, not as a
    # connection ssh dropped (LogLevel ERROR hides ssh's reason). It ends a session after
    # CountMax + 1 silent intervals.
    alive_interval = max(1, timeout // 3)
    alive_count = max(3, -(-2 * timeout // alive_interval) - 1)
    options = {
        "BatchMode": "yes",  # never a prompt: no password, no passphrase, no host key question
        "StrictHostKeyChecking": "yes",  # only the key the controller verified
        "UserKnownHostsFile": known_hosts,
        "GlobalKnownHostsFile": "/dev/null",
        "CheckHostIP": "no",
        "UpdateHostKeys": "no",
        "ControlMaster": "no",
        "ControlPath": "none",
        "ConnectTimeout": str(timeout),
        "ServerAliveInterval": str(alive_interval),
        "ServerAliveCountMax": str(alive_count),
        "ForwardAgent": "no",  # the receiver gets no agent
        "ClearAllForwardings": "yes",
        "IdentityAgent": "SSH_AUTH_SOCK",  # the forwarded agent only
        "IdentityFile": "none",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "PreferredAuthentications": "publickey",
        "LogLevel": "ERROR",
        "Ciphers": CIPHERS,
    }
    command = [ssh, "-T", "-x", "-a"]
    for key, value in options.items():
        command += ["-o", "%s=%s" % (key, value)]
    return command + ["-p", str(request["port"]), "-l", request["user"], "-s", "--", request["host"], "sftp"]


# ---------------------------------------------------------------------------------------------
# One connection: an ssh child speaking SFTP on its pipes
# ---------------------------------------------------------------------------------------------


class Connection:
    """One `ssh -s sftp` child. Requests are written to its stdin; replies read from its stdout,
    in one thread (the connection's worker). The watchdog reads `waiting_since` to find stalls."""

    def __init__(self, index, command, errors_file):
        self.index = index
        self.command = command
        self.errors_file = errors_file
        self.process = None
        self.next_id = 1
        self.pending = {}  # request id -> (what, part, bytes)
        self.buffer = bytearray()
        self.waiting_since = None  # monotonic time since when a reply is awaited; None: idle
        self.killed_because = None
        self.ready = False
        # WRITE data goes from the source copy to ssh's stdin with splice(2): the pages move from the
        # file to the pipe without three copies through Python. Off where the platform or the file
        # system has no splice (it falls back to read and write at the first refusal).
        self.splicing = hasattr(os, "splice")

    def start(self):
        try:
            self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=self.errors_file, bufsize=0, close_fds=True)
        except OSError as exc:
            reason = "cannot run the OpenSSH client %s: %s" % (self.command[0], exc.strerror or exc)
            raise Failure("source", reason) from None

    def login(self):
        """SFTP INIT and the server's VERSION: a logged-in, working connection."""
        self.waiting_since = time.monotonic()
        try:
            self._send(packet(FXP_INIT, 3, b""))
            while True:
                packets = self._read()
                if packets:
                    kind = packets[0][0]
                    if kind != FXP_VERSION:
                        raise Failure("receiver", "the receiver's SFTP server answered INIT with type %d" % kind)
                    self.buffer = bytearray()
                    break
        except Failure as exc:
            if exc.kind == "interrupted":  # nothing came back: the client could not log in
                raise Failure("receiver", self.client_said() or str(exc)) from None
            raise
        self.waiting_since = None
        self.ready = True

    def client_said(self):
        """What the ssh client wrote on stderr (its last lines), or why it was stopped."""
        text = ""
        try:
            self.errors_file.flush()
            self.errors_file.seek(0)
            text = self.errors_file.read()[-1500:].decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            pass
        text = "; ".join(line.strip() for line in text.splitlines() if line.strip())
        if self.killed_because:
            return self.killed_because + (" (ssh: %s)" % text if text else "")
        if self.process is not None and self.process.poll() is not None:
            if text:
                return "ssh exited with status %d: %s" % (self.process.returncode, text)
            if self.process.returncode == 255:  # ssh's own failure; LogLevel ERROR kept its reason
                return "ssh exited with status 255: the SSH connection was lost or timed out"
            return "ssh exited with status %d" % self.process.returncode
        return text

    def _send(self, data):
        view = memoryview(data)
        try:
            while view:
                written = self.process.stdin.write(view)
                view = view[written or 0:]
        except (OSError, ValueError) as exc:
            raise Failure("interrupted", "connection %d to the receiver broke (%s)"
                          % (self.index, self.client_said() or exc)) from None

    def _splice(self, fd, offset, count, path):
        moved = 0
        while moved < count:
            try:
                done = os.splice(fd, self.process.stdin.fileno(), count - moved, offset_src=offset + moved)
            except (OSError, ValueError) as exc:
                if getattr(exc, "errno", None) in SPLICE_REFUSED and moved == 0:
                    self.splicing = False  # this file system or kernel: read and write from now on
                    self._send(_read_exactly(fd, offset, count, path))
                    return
                if isinstance(exc, (BrokenPipeError, ValueError)):
                    raise Failure("interrupted", "connection %d to the receiver broke (%s)"
                                  % (self.index, self.client_said() or exc)) from None
                raise Failure("source", "cannot read the source copy %s: %s" % (path, exc.strerror or exc)) from None
            if done == 0:
                raise Failure("source", SHORTER % path)
            moved += done

    def _read(self):
        try:
            chunk = os.read(self.process.stdout.fileno(), 1 << 16)
        except (OSError, ValueError) as exc:
            chunk, reason = b"", str(exc)
        else:
            reason = "end of stream"
        if not chunk:
            self._await_exit()
            raise Failure("interrupted", "connection %d to the receiver broke (%s)"
                          % (self.index, self.client_said() or reason))
        self.buffer += chunk
        return split_packets(self.buffer)

    def _await_exit(self):
        """ssh closes its stdout just before it exits: a moment's wait lets its status and stderr
        say why, instead of a bare end of stream."""
        try:
            self.process.wait(timeout=EXIT_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            pass

    def request(self, kind, payload, what, part, data=b"", nbytes=0, source=None):
        """Send one request. A WRITE's data is `data`, or with source=(fd, offset, path) nbytes
        spliced from that file."""
        request_id = self.next_id
        self.next_id = (self.next_id + 1) & 0xFFFFFFFF or 1
        if kind == FXP_WRITE and source is not None:
            self._send(payload)
            self._splice(source[0], source[1], nbytes, source[2])
        elif kind == FXP_WRITE:
            self._send(payload + data)
        else:
            self._send(packet(kind, request_id, payload))
        if not self.pending:
            self.waiting_since = time.monotonic()
        self.pending[request_id] = (what, part, nbytes)
        if part is not None:
            part.unacked += 1
        return request_id

    def next_write_id(self):
        return self.next_id

    def replies(self):
        """Read until at least one reply is in: [(request id, (what, part, bytes), type, body)]."""
        out = []
        while not out:
            for kind, request_id, body in self._read():
                if request_id not in self.pending:
                    raise Failure("interrupted", "the receiver answered a request never sent (%d)" % request_id)
                out.append((request_id, self.pending.pop(request_id), kind, body))
        self.waiting_since = time.monotonic() if self.pending else None
        return out

    def kill(self, reason):
        if self.killed_because is None:
            self.killed_because = reason
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.kill()
            except OSError:
                pass

    def close(self):
        """Close the client's pipes: EOF on its stdin ends the SFTP session, then the client."""
        if self.process is None:
            return
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass

    def reap(self, deadline):
        """Wait for the client to end until `deadline` (monotonic); kill it after."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill("closing")
            self.process.wait()


# ---------------------------------------------------------------------------------------------
# The feed
# ---------------------------------------------------------------------------------------------


class Feed:
    """Everything shared by the connections' workers and the watchdog of one run."""

    def __init__(self, request, emit, bucket=None, availability=None):
        self.request = request
        self.emit = emit
        self.bucket = bucket
        self.availability = availability or Availability(complete=not request.get("streaming"))
        self.chunk = chunk_size_for(request["bandwidth_limit"], request["write_size"])
        self.lock = threading.Lock()
        self.stop = threading.Event()  # the controller went away, or a worker failed
        self.acked = 0  # bytes acknowledged, not yet reported
        self.acked_total = 0
        self.parts_left = {}  # temp -> parts not yet complete
        self.queue = []
        self.sources = {}  # source path -> fd

    # -- what workers share ------------------------------------------------------------------

    def take_batch(self):
        """The next parts to write ([]: none left). Streaming, only parts whose bytes are all there:
        None while the queue holds only parts still on their way to the source."""
        with self.lock:
            batch, size, left = [], 0, []
            for index, part in enumerate(self.queue):
                if not self.part_available(part):
                    left.append(part)
                    continue
                if batch and (len(batch) >= BATCH_FILES or size + part.size > BATCH_BYTES):
                    left.extend(self.queue[index:])
                    break
                batch.append(part)
                size += part.size
            self.queue = left
            return None if left and not batch else batch

    def part_available(self, part):
        if self.availability.complete:
            return True
        path = part.item["source_path"]
        return all(self.availability.has(path, offset, offset + length) for offset, length in part.ranges)

    def acknowledged(self, nbytes):
        with self.lock:
            self.acked += nbytes
            self.acked_total += nbytes

    def queued_bytes(self):
        with self.lock:
            return sum(part.size for part in self.queue)

    def part_done(self, part):
        with self.lock:
            self.parts_left[part.item["temp"]] -= 1
            complete = self.parts_left[part.item["temp"]] == 0
        if part.ranges:  # the receiver holds these bytes now: a streaming feed from it may read them
            temp = part.item["temp"]
            self.emit({"spans": [[temp, offset, offset + length] for offset, length in part.ranges]})
        if complete:
            self.emit({"written": part.item["temp"]})

    def wait_for_budget(self, nbytes):
        if self.bucket is not None:
            delay = self.bucket.reserve(nbytes)
            if delay > 0 and self.stop.wait(delay):
                raise Failure("interrupted", "stopped")

    # -- the source files --------------------------------------------------------------------

    def open_sources(self):
        """Every source copy, opened at the start. A streaming feed opens each when its first bytes
        are there (a copy still on its way may not exist yet)."""
        if self.availability.complete:
            for item in self.request["files"]:
                self.source_fd(item)

    def source_fd(self, item):
        path = item["source_path"]
        with self.lock:
            if path in self.sources:
                return self.sources[path]
            try:
                fd = _open_copy(path, item["final_path"])
                size = os.fstat(fd).st_size
            except OSError as exc:
                raise Failure("source", "cannot read the source copy %s: %s" % (path, exc.strerror or exc)) from None
            self.sources[path] = fd
        if size != item["size"]:
            raise Failure("source", "the source copy %s has %d bytes, not the %d expected: it changed since it "
                                    "was verified" % (path, size, item["size"]))
        return fd

    def wait_until_there(self, connection, item, offset, length):
        """Streaming: wait until the source holds these bytes, replies read first (the watchdog
        counts a connection with requests in flight as waiting on the receiver)."""
        path = item["source_path"]
        if self.availability.has(path, offset, offset + length):
            return
        while connection.pending:
            for reply in connection.replies():
                settle(self, reply)
        while not self.availability.wait(self.stop, REPORT_SECONDS, path, offset, offset + length):
            if self.stop.is_set():
                raise Failure("interrupted", "stopped")

    def read_source(self, item, offset, length):
        return _read_exactly(self.source_fd(item), offset, length, item["source_path"])

    def close_sources(self):
        for fd in self.sources.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.sources = {}


SHORTER = "the source copy %s is shorter than expected: it changed since it was verified"
SPLICE_REFUSED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def _read_exactly(fd, offset, length, path):
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        raise Failure("source", "cannot read the source copy %s: %s" % (path, exc.strerror or exc)) from None
    if len(data) != length:
        raise Failure("source", SHORTER % path)
    return data


def _open_copy(path, final_path):
    """The source copy at `path`, or at `final_path` when given and `path` is gone: a copy still
    being checked on its host is its temp file, renamed into place once checked (see the
    controller's _fanout_ledger, "holding"). An open file stays readable whatever its host does
    with the name; whatever the receiver gets is compared with the controller's source anyway."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if not final_path:
            raise
        return os.open(final_path, os.O_RDONLY)


def settle(feed, reply):
    """Check one reply; count acknowledged bytes; finish parts whose close came back."""
    what, part, nbytes = reply[1]
    kind, body = reply[2], reply[3]
    if what == "open":
        return
    if kind != FXP_STATUS:
        raise Failure("interrupted", "the receiver answered %s of %s with type %d" % (what, part.item["temp"], kind))
    code, message = status_of(body)
    if code != FX_OK:
        raise Failure("interrupted", "the receiver refused to %s %s: %s" % (what, part.item["temp"], message))
    if nbytes:
        feed.acknowledged(nbytes)
    part.unacked -= 1
    if what == "close":
        part.closed = True
    if part.closed and part.unacked == 0:
        feed.part_done(part)


def write_batch(feed, connection, batch):
    """Open every part's temp (one round trip for the batch), then per part: its size when it
    creates the file, its writes (MAX_IN_FLIGHT in flight), its close; all replies checked."""
    opens = {}
    for part in batch:
        request_id = connection.request(FXP_OPEN, open_payload(part.item["temp"], part.create), "open", part)
        opens[request_id] = part
    handles = {}
    while len(handles) < len(opens):
        for reply in connection.replies():
            request_id, (what, part, _nbytes), kind, body = reply
            if what != "open":
                settle(feed, reply)
                continue
            part.unacked -= 1
            if kind == FXP_HANDLE:
                handles[request_id] = read_string(body)[0]
                continue
            reason = status_of(body)[1] if kind == FXP_STATUS else "reply type %d" % kind
            raise Failure("interrupted", "the receiver cannot open %s: %s" % (part.item["temp"], reason))
    for request_id, part in opens.items():
        handle = handles[request_id]
        if part.create:
            connection.request(FXP_SETSTAT, size_payload(part.item["temp"], part.item["size"]), "size", part)
        for offset, length in part.ranges:
            write_range(feed, connection, part, handle, offset, length)
        connection.request(FXP_CLOSE, sftp_string(handle), "close", part)
    while connection.pending:
        for reply in connection.replies():
            settle(feed, reply)


def write_range(feed, connection, part, handle, offset, length):
    position, end = offset, offset + length
    while position < end:
        if feed.stop.is_set():
            raise Failure("interrupted", "stopped")
        size = min(feed.chunk, end - position)
        feed.wait_until_there(connection, part.item, position, size)
        feed.wait_for_budget(size)
        if connection.splicing:
            data, source = b"", (feed.source_fd(part.item), position, part.item["source_path"])
        else:
            data, source = feed.read_source(part.item, position, size), None
        while len(connection.pending) >= MAX_IN_FLIGHT:
            for reply in connection.replies():
                settle(feed, reply)
        header = write_header(connection.next_write_id(), handle, position, size)
        connection.request(FXP_WRITE, header, "write", part, data=data, nbytes=size, source=source)
        position += size


def cpu_times():
    """(idle, total) clock ticks of the whole machine since boot, from Linux's /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as stream:
            fields = stream.readline().split()
        ticks = [int(value) for value in fields[1:9]]
    except (OSError, ValueError):
        return None
    if not fields or fields[0] != "cpu" or len(ticks) < 5:
        return None
    return ticks[3] + ticks[4], sum(ticks)  # idle and iowait: time no process wanted


class Growth:
    """Whether a feed adds a connection now. The feed starts on one; every GROW_SECONDS window
    another is added while all of this holds: fewer than the most allowed; the source's CPUs had
    a core idle over the window (where /proc/stat tells); what is left to send would last a few
    windows more; and the connection added last raised the rate by GROW_GAIN (else it settles).
    A fixed count is wrong both ways: on a multi-core host with a fast link one OpenSSH stream
    leaves cores idle; on a busy host (or several "hosts" on one machine) each stream more adds
    the CPU of an ssh client, an sshd and an sftp-server and slows every feed."""

    def __init__(self, ceiling, cores=None, cpu=cpu_times):
        self.ceiling = max(1, ceiling)
        self.cores = cores or os.cpu_count() or 1
        self.cpu = cpu
        self.settled = self.ceiling <= 1
        self.window = None  # (start, acknowledged bytes, cpu ticks) of the current window
        self.rate_before = None  # the rate before the connection added last
        self.joining = None  # the connection added last, until it has logged in

    def start(self, now, acked):
        self.window = (now, acked, self.cpu())

    def decide(self, now, acked, connections, bytes_left):
        """True: add a connection now. `connections` open, `bytes_left` not yet handed out."""
        if self.settled or self.window is None:
            return False
        joining = self.joining  # (failed() may clear it from the joining connection's thread)
        if joining is not None:
            if not joining.ready:
                return False
            self.joining = None
            self.start(now, acked)  # the new connection's rate is measured from its first write on
            return False
        started, acked_then, cpu_then = self.window
        if now - started < GROW_SECONDS:
            return False
        rate = (acked - acked_then) / (now - started)
        cpu_now = self.cpu()
        idle = self._idle_cores(cpu_then, cpu_now)
        self.window = (now, acked, cpu_now)
        if self.rate_before is not None and rate < self.rate_before * GROW_GAIN:
            self.settled = True  # the last one added did not pay: the link or a CPU is full
            return False
        self.rate_before = None
        if connections >= self.ceiling or (idle is not None and idle < GROW_IDLE_CORES) \
                or bytes_left < rate * GROW_SECONDS * GROW_WINDOWS_LEFT:
            return False
        self.rate_before = rate
        return True

    def added(self, connection):
        self.joining = connection

    def failed(self):
        """The connection added last could not log in (MaxStartups, a limit...): no more."""
        self.settled = True
        self.joining = None

    def _idle_cores(self, cpu_then, cpu_now):
        if cpu_now is None or cpu_then is None or cpu_now[1] <= cpu_then[1]:
            return None
        return self.cores * (cpu_now[0] - cpu_then[0]) / float(cpu_now[1] - cpu_then[1])


class Worker(threading.Thread):
    """Runs `job(connection)` and keeps its failure for the watchdog."""

    def __init__(self, connection, job):
        super(Worker, self).__init__(name="multipush-peer-%d" % connection.index)
        self.daemon = True
        self.connection = connection
        self.job = job
        self.failure = None

    def run(self):
        try:
            self.job(self.connection)
        except Failure as exc:
            self.failure = exc
        except Exception as exc:  # a bug or an odd reply: reported as such, never a hang
            self.failure = Failure("interrupted", "%s: %s" % (type(exc).__name__, exc))


def watch(feed, workers, connections, deadline_seconds, stop_all_on_failure=True, on_tick=None):
    """Wait for `workers`, reporting progress; end connections that stall or, when the controller
    leaves, all of them. on_tick(now) may add workers and connections to the lists. Returns the
    first failure (None: all succeeded)."""
    now = last_report = last_alive = time.monotonic()
    first = None
    while any(worker.is_alive() for worker in workers):
        for worker in list(workers):
            worker.join(REPORT_SECONDS / max(1, len(workers)))
        now = time.monotonic()
        if on_tick is not None and not feed.stop.is_set():
            on_tick(now)
        for connection in list(connections):
            since = connection.waiting_since
            if since is not None and now - since > deadline_seconds:
                connection.kill("no reply from the receiver for %d s" % deadline_seconds)
        failed = [worker.failure for worker in workers if worker.failure is not None]
        if failed and first is None:
            first = failed[0]
            if stop_all_on_failure:
                feed.stop.set()
        if feed.stop.is_set():
            for connection in connections:
                connection.kill("stopped")
        if now - last_report >= REPORT_SECONDS:
            last_report = now
            last_alive = report(feed, last_alive, now)
    report(feed, now, now)
    if first is None:
        failed = [worker.failure for worker in workers if worker.failure is not None]
        first = failed[0] if failed else None
    return first


def report(feed, last_alive, now):
    with feed.lock:
        acked, feed.acked = feed.acked, 0
    if acked:
        feed.emit({"bytes": acked})
        return now
    if now - last_alive >= ALIVE_SECONDS:
        feed.emit({"alive": True})
        return now
    return last_alive


def run(request, emit, stop=None, ssh="ssh", availability=None):
    """Write every file of `request` (parse_request's) to the receiver. Raises Failure.
    availability: what of the source copies is there (a streaming request's, fed from stdin)."""
    feed = Feed(request, emit, availability=availability)
    if stop is not None:
        feed.stop = stop
    if request["bandwidth_limit"] is not None:
        feed.bucket = TokenBucket(request["bandwidth_limit"], feed.chunk)
    first, rest = plan_parts(request["files"])
    for part in first + rest:
        feed.parts_left[part.item["temp"]] = feed.parts_left.get(part.item["temp"], 0) + 1
    feed.queue = list(rest)
    if not os.environ.get("SSH_AUTH_SOCK"):
        raise Failure("source", "no forwarded SSH agent in the session (the source's sshd may set "
                                "AllowAgentForwarding no)")
    if shutil.which(ssh) is None:
        raise Failure("source", "no OpenSSH client (%s) on the PATH" % ssh)
    remove_stale_directories(tempfile.gettempdir())
    private = tempfile.mkdtemp(prefix="%s%d-" % (PRIVATE_PREFIX, os.getpid()))
    connections = []
    try:
        feed.open_sources()
        known_hosts = os.path.join(private, "known_hosts")
        with open(known_hosts, "w") as stream:
            stream.write("\n".join(request["known_hosts_lines"]) + "\n")

        def new_connection():
            connection = Connection(len(connections), ssh_command(request, known_hosts, ssh),
                                    tempfile.TemporaryFile(dir=private))
            connections.append(connection)
            connection.start()
            return connection

        new_connection()
        _login_all(feed, connections, request["timeout"])
        live = [connection for connection in connections if connection.ready]
        feed.emit({"connections": len(live)})
        growth = Growth(min(request["connections"], len(rest)))
        _write_all(feed, live, first, request["timeout"], lambda now, workers: _grow(feed, growth, new_connection,
                                                                                     workers, live, now))
    finally:
        for connection in connections:
            if feed.stop.is_set():
                connection.kill("stopped")
            connection.close()
        deadline = time.monotonic() + CLOSE_SECONDS  # all together: one slow receiver costs it once
        for connection in connections:
            connection.reap(deadline)
            try:
                connection.errors_file.close()
            except OSError:
                pass
        feed.close_sources()
        shutil.rmtree(private, ignore_errors=True)


def remove_stale_directories(directory):
    """Private directories of senders that were killed (SIGKILL leaves no chance to clean up): named
    after their sender's pid, removed when that process is gone and the directory is this user's.
    They hold a public host key line and empty files; a live sender's is never touched."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        pid = name[len(PRIVATE_PREFIX):].split("-", 1)[0]
        if not name.startswith(PRIVATE_PREFIX) or not pid.isdigit() or _process_exists(int(pid)):
            continue
        path = os.path.join(directory, name)
        try:
            if os.lstat(path).st_uid == os.geteuid() and os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        return True
    return True


def _login_all(feed, connections, timeout):
    workers = [Worker(connection, lambda connection: connection.login()) for connection in connections]
    for worker in workers:
        worker.start()
    # a login takes the TCP connect, the key exchange and the authentication: each bounded by ssh
    # itself (ConnectTimeout, ServerAlive*) and, all together, here
    watch(feed, workers, connections, 2 * timeout + 5, stop_all_on_failure=False)
    if feed.stop.is_set():
        raise Failure("interrupted", "stopped by the controller")
    if not any(connection.ready for connection in connections):
        failures = [worker.failure for worker in workers if worker.failure is not None]
        raise failures[0] if failures else Failure("receiver", "no connection to the receiver could log in")


def _write_all(feed, live, first, timeout, grow=None):
    """The files of several ranges are created at their full size, then the connections drain the
    queue; grow(now, workers) may add connections (and their workers) meanwhile."""
    shares = [first[index::len(live)] for index in range(len(live))]
    steps = [
        ([Worker(connection, lambda connection, share=share: write_batch(feed, connection, share) if share else None)
          for connection, share in zip(live, shares)], None),
        ([Worker(connection, lambda connection: _drain_queue(feed, connection)) for connection in live], grow),
    ]
    for workers, grower in steps:
        for worker in workers:
            worker.start()
        on_tick = (lambda now, workers=workers, grower=grower: grower(now, workers)) if grower is not None else None
        failure = watch(feed, workers, live, timeout, on_tick=on_tick)
        if failure is not None:
            raise failure
        if feed.stop.is_set():
            raise Failure("interrupted", "stopped by the controller")


def _grow(feed, growth, new_connection, workers, live, now):
    """Add a connection to the draining ones if Growth says so; one that cannot log in ends the
    growth, not the feed."""
    if growth.window is None:
        growth.start(now, feed.acked_total)
    if not growth.decide(now, feed.acked_total, len(live), feed.queued_bytes()):
        return
    try:
        connection = new_connection()
    except Failure:
        growth.failed()
        return
    growth.added(connection)
    live.append(connection)

    def join(connection):
        try:
            connection.login()
        except Failure:
            growth.failed()
            live.remove(connection)
            connection.kill("it could not log in")
            return
        feed.emit({"connections": len(live)})
        _drain_queue(feed, connection)

    worker = Worker(connection, join)
    workers.append(worker)
    worker.start()


def _drain_queue(feed, connection):
    while not feed.stop.is_set():
        batch = feed.take_batch()
        if batch is None:  # streaming: what is left is still on its way to the source
            feed.availability.wait(feed.stop, REPORT_SECONDS)
            continue
        if not batch:
            return
        write_batch(feed, connection, batch)


# ---------------------------------------------------------------------------------------------
# Entry point: the controller's bootstrap calls serve(stdin, stdout)
# ---------------------------------------------------------------------------------------------


def _emitter(out):
    lock = threading.Lock()

    def emit(event):
        line = json.dumps(event, sort_keys=True) + "\n"
        with lock:
            try:
                out.write(line)
                out.flush()
            except (OSError, ValueError):
                pass  # the controller is gone; stdin's end stops the run

    return emit


def _on_signal(number, _frame):
    raise SystemExit(128 + number)


def serve(stream, out):
    """Read the request line from `stream`, run it, and end when done or when `stream` closes."""
    emit = _emitter(out)
    for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(number, _on_signal)
    stop = threading.Event()
    try:
        request = parse_request(stream.readline())
        availability = Availability(complete=not request["streaming"])

        def watch_stdin():
            # os.read, not the buffered stream: a daemon thread blocked inside the buffered reader
            # holds its lock, and Python's exit then waits a second for it and aborts. (The
            # controller sends offers only once it heard "listening": none sits in the stream's buffer.)
            rest = b""
            try:
                while True:
                    data = os.read(stream.fileno(), 1 << 16)
                    if not data:
                        break
                    rest = availability.read_offers(rest + data)
            except OSError:
                pass
            stop.set()

        threading.Thread(target=watch_stdin, name="multipush-peer-stdin", daemon=True).start()
        if request["streaming"]:
            emit({"listening": True})
        run(request, emit, stop, availability=availability)
    except Failure as exc:
        emit({"error": str(exc), "kind": exc.kind})
        raise SystemExit(1) from None
    except Exception as exc:  # a bug: said as an error of the run rather than a bare traceback
        emit({"error": "the sender failed: %s: %s" % (type(exc).__name__, exc), "kind": "interrupted"})
        raise SystemExit(1) from None
    emit({"done": True})
