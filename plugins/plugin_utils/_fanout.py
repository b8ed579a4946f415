# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fan-out for one host of a task: which source feeds it, the peer's feed, the host's turn as a source.

The conductor (_push.Push) asks it twice: after the survey, `choose` picks the source (waiting
in the ledger, _fanout_ledger, for a peer when one is on its way); after the directories exist,
`write` has the peer write the host's temp files. From its choice on, the host passes on what it
has: `published` hears of every span of its temps acknowledged (the push's own writes through
`observe`, a peer's through the feed) and rewrites the host's stream file, from which a host it
feeds learns, while the copy is still coming in, what it may read (a streaming feed).

What a peer wrote is never trusted: the push compares every block of those temps with the source
(the resume's comparison, _resume), sends what differs from the controller and puts the files in
place as always. A failed feed goes to another peer or, failing that, the controller finishes it:
a half-written temp is a leftover like any other.
When the host's push succeeded, `finish` lists where each file lies on it, and it becomes a source.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Callable

from ansible_collections.multipush.sftp.plugins.plugin_utils._auth import DEFAULT_IDENTITIES
from ansible_collections.multipush.sftp.plugins.module_utils import _peer_sender
from ansible_collections.multipush.sftp.plugins.plugin_utils._fanout_ledger import (
    CONTROLLER, RECEIVING, SOURCES, Ledger, live, read_copy_map,
)
from ansible_collections.multipush.sftp.plugins.plugin_utils._jobs import WriteBatch, WriteRange, WriteWhole
from ansible_collections.multipush.sftp.plugins.plugin_utils._peer_feed import (
    FeedFailure, PeerFile, PeerReceiver, feed_from_peer,
)
from ansible_collections.multipush.sftp.plugins.plugin_utils._progress import human_bytes, human_rate
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import ConnectionSpec, SessionError
from ansible_collections.multipush.sftp.plugins.plugin_utils._sshconfig import expand_path, local_user

# How often a waiting host looks at the ledger again.
WAIT_POLL_SECONDS = 0.2
# Peers tried for one host before the controller takes over what is left.
MAX_PEER_ATTEMPTS = 3
# The least time between two rewrites of a host's stream file.
STREAM_WRITE_SECONDS = 0.2
# How often a streaming feed looks at its source's state in the ledger (done, or failed), in stream polls.
LEDGER_EVERY_POLLS = 5
# The most connections a peer opens to the receiver. It starts with one and adds more only while
# they raise its rate and its CPUs have room (the sender's Growth): its link is not the controller's
# uplink, and the sender's work per byte is OpenSSH's, so a few streams fill it.
PEER_CONNECTIONS = 4


def parse_peer_address(value, default_host: str, default_port: int) -> tuple[str, int]:
    """multipush_peer_address: "host", "host:port", "[v6]:port" or a bare IPv6 address."""
    text = str(value).strip() if value not in (None, "") else ""
    if not text:
        return default_host, default_port
    if text.startswith("["):
        host, _sep, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not host or (port and not port.isdigit()) or (port and not 0 < int(port) < 65536):
        raise ValueError(f"multipush_peer_address={value!r} is not 'host' or 'host:port'")
    return host, int(port) if port else 22


def _read_stream(path: str | None) -> dict:
    """A host's stream file (see Fanout.published); {} when there is none (yet) or it cannot be read."""
    try:
        return read_copy_map(path) if path else {}
    except (OSError, ValueError):
        return {}


def tree_identity(plans: list) -> str:
    """The source tree the push sends, by path, size and mtime of every file: peers share a copy only
    with hosts that get the very same source."""
    digest = hashlib.sha256()
    for plan in sorted(plans, key=lambda item: item.local.path):
        digest.update(f"{plan.local.path}\0{plan.local.size}\0{int(plan.local.mtime * 1e9)}\n"
                      .encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


class Fanout:
    """One host's part in a fan-out. peer_spec(name) -> the ConnectionSpec of another host of the
    play (how the controller logs in to it); peer_address: (host, port) where peers reach this one."""

    def __init__(self, ledger: Ledger, host: str, group: str | None, per_source: int,
                 peer_spec: Callable[[str], ConnectionSpec], spec: ConnectionSpec, peer_address: tuple[str, int],
                 warn: Callable[[str], None], say: Callable[[str], None], bandwidth_limit: float | None = None,
                 timeout: float = 30.0, python_interpreter: str | None = None, progress_interval: float = 5.0):
        self.ledger = ledger
        self.host = host
        self.group = group or ""
        self.per_source = per_source
        self.peer_spec = peer_spec
        self.spec = spec
        self.peer_address = peer_address
        self.warn = warn
        self.say = say
        self.bandwidth_limit = bandwidth_limit
        self.timeout = timeout
        self.python_interpreter = python_interpreter
        self.source = CONTROLLER
        self.tree = ""
        self.plans: list = []
        self.joined = False
        self.holding: str | None = None  # the source whose slot this host holds in the ledger
        self.waited = 0.0
        self.peer_bytes = 0
        self.attempts: list[dict] = []
        self.progress_interval = progress_interval
        self.lock = threading.Lock()  # the sender's byte counts come from its reader thread
        self.feeding: tuple = ("", 0, 0.0, 0.0)  # source, bytes to feed, when it started, last line
        self.stream_path: str | None = None  # where this host says which spans of its temps are there
        self.stream: dict = {"files": {}, "spans": {}}  # local path -> [path here, final path]; -> spans
        self.local_of: dict = {}  # temp -> local path
        self.stream_written = 0.0  # when the stream file was last rewritten
        self.stream_dirty = False  # spans acknowledged since
        self.catch_up: threading.Timer | None = None

    # -- after the survey ------------------------------------------------------------------------

    def choose(self, planned) -> frozenset:
        """The source of this host's data, waiting for one if need be. Returns the temps a peer is
        to write (empty: the controller sends as in a plain push)."""
        self.plans = list(planned.plans)
        self.tree = tree_identity(self.plans)
        if not self._feedable():
            return frozenset()
        self.ledger.join(self.host, self.group, self.tree)
        self.joined = True
        self._start_stream()
        started = time.monotonic()
        announced = ""
        while True:
            choice = self.ledger.take(self.host, self.group, self.tree, self.per_source, stream=self.stream_path)
            if choice.source is not None:
                break
            if choice.why != announced:
                self.say(f"fan-out: {choice.why}")
                announced = choice.why
            time.sleep(WAIT_POLL_SECONDS)
        self.waited = time.monotonic() - started
        self.source = self.holding = choice.source
        self.say(f"fan-out: fed by {choice.source} ({choice.why})")
        return frozenset(plan.temp for plan in self._feedable()) if choice.source != CONTROLLER else frozenset()

    def _start_stream(self) -> None:
        """The stream file: every file of the tree with where it lies here (a temp, renamed to its
        final path once checked; a file already in place, whole), no span of a temp yet."""
        for plan in self.plans:
            if plan.action == "send" and plan.local.size > 0:
                self.stream["files"][plan.local.path] = [plan.temp, plan.dest]
                self.stream["spans"][plan.local.path] = []
                self.local_of[plan.temp] = plan.local.path
            else:  # already in place here (or empty): whole
                self.stream["files"][plan.local.path] = [plan.dest, None]
                self.stream["spans"][plan.local.path] = [[0, plan.local.size]]
        self.stream_path = self.ledger.write_copy_map(self.host, self.stream, kind="stream")

    def published(self, spans) -> None:
        """Spans (temp, start, end) of this host's temps it acknowledged: a streaming feed from it
        may read them now. The stream file is rewritten at most every STREAM_WRITE_SECONDS (a tree
        of many small files acknowledges batch after batch); a later write catches up what waited.
        (The coordinator's thread, a feed's reader and the catch-up timer call it.)"""
        with self.lock:
            for temp, start, end in spans:
                local = self.local_of.get(temp)
                if local is None or end <= start:
                    continue
                self.stream["spans"][local] = _peer_sender.merge_span(self.stream["spans"][local], start, end)
                self.stream_dirty = True
            if not self.stream_dirty or self.stream_path is None:
                return
            wait = self.stream_written + STREAM_WRITE_SECONDS - time.monotonic()
            if wait > 0:
                if self.catch_up is None:
                    self.catch_up = threading.Timer(wait, self._catch_up)
                    self.catch_up.daemon = True
                    self.catch_up.start()
                return
            self.ledger.write_copy_map(self.host, self.stream, kind="stream")
            self.stream_written, self.stream_dirty = time.monotonic(), False

    def _catch_up(self) -> None:
        with self.lock:
            self.catch_up = None
        self.published(())

    def observe(self, event, job, _result) -> None:
        """The push's engine observer: the writes of this host's own pool, as they are acknowledged."""
        if event != "done" or self.stream_path is None:
            return
        if isinstance(job, WriteRange):
            self.published([(job.temp, job.start, job.end)])
        elif isinstance(job, WriteWhole):
            self.published([(job.temp, 0, job.size)])
        elif isinstance(job, WriteBatch):
            self.published([(item["temp"], 0, item["size"]) for item in job.files])

    def _feedable(self) -> list:
        """The files a peer can write: those to send that have bytes."""
        return [plan for plan in self.plans if plan.action == "send" and plan.local.size > 0]

    # -- after the directories -------------------------------------------------------------------

    def write(self, host_key: tuple[str, str] | None, write_size: int | None = None) -> frozenset:
        """Have the chosen peer (and others after a failure) write the temps. Returns every temp a
        peer touched: each is compared block by block with the source by the push afterwards.
        write_size: the largest write this host's SFTP server takes (None: not known)."""
        if self.source == CONTROLLER:
            return frozenset()
        touched: set[str] = set()
        written: set[str] = set()
        for attempt in range(MAX_PEER_ATTEMPTS):
            source = self.source
            files = self._files_from(source, written)
            try:
                written |= self._feed(source, files, host_key, write_size)
                touched.update(item.temp for item in files)
                self.ledger.sent_from(source)
                self._release()
                self._hold(written)
                return frozenset(touched)
            except FeedFailure as exc:
                written |= set(exc.written)
                if exc.launched:  # what it may have begun to write is compared like a leftover
                    touched.update(item.temp for item in files)
                self._release()
                self.ledger.source_failed(self.host, source, cannot_send=exc.kind == "source")
                self.attempts.append({"source": source, "failed": str(exc)})
                if exc.kind == "receiver":
                    host, port = self.peer_address
                    self.warn(f"fan-out: {self.host} could not be fed by {source} at its multipush_peer_address "
                              f"{host}:{port}: {exc}; the controller sends it instead")
                    break
                last = attempt + 1 == MAX_PEER_ATTEMPTS
                self.warn(f"fan-out: the feed of {self.host} from {source} failed: {exc}; "
                          + ("the controller finishes it" if last else "trying another source"))
                if attempt + 1 == MAX_PEER_ATTEMPTS:
                    break
                choice = self.ledger.take(self.host, self.group, self.tree, self.per_source, no_wait=True)
                self.source = self.holding = choice.source
                if choice.source == CONTROLLER:
                    break
        self.source = CONTROLLER
        return frozenset(touched)

    def _hold(self, written: set) -> None:
        """Every file a peer could write is in this host's temps: until they are checked and renamed,
        the temps are a source for other hosts (their own checks catch anything amiss)."""
        if not {plan.temp for plan in self._feedable()} <= written:
            return
        copies = {plan.local.path: [plan.temp, plan.dest] if plan.temp in written else plan.dest
                  for plan in self.plans if plan.temp in written or plan.action != "send"}
        self.ledger.holding(self.host, self.ledger.write_copy_map(self.host, copies, kind="held"))

    def _files_from(self, source: str, written: set) -> list:
        """What `source` can send of the files still unwritten: it must hold a copy of each (or,
        while it receives them, be about to: see _availability)."""
        copies = self._copies_on(source)
        files = []
        for plan in self._feedable():
            if plan.temp in written or plan.local.path not in copies:
                continue
            where = copies[plan.local.path]
            path, final = (where[0], where[1]) if isinstance(where, list) else (where, None)
            files.append(PeerFile(source_path=path, temp=plan.temp, size=plan.local.size, final_path=final,
                                  ranges=tuple(tuple(item) for item in plan.ranges) or ((0, plan.local.size),)))
        return files

    def _copies_on(self, source: str) -> dict:
        entry = self.ledger.snapshot()["hosts"].get(source) or {}
        if entry.get("copy_map"):
            try:
                return read_copy_map(entry["copy_map"])
            except (OSError, ValueError):
                return {}
        if entry.get("state") == RECEIVING and entry.get("stream"):
            return _read_stream(entry["stream"]).get("files", {})
        return {}

    def _availability(self, source: str, stream: str, files: list):
        """For a feed from a host still receiving the tree (its stream file `stream`): () -> (spans,
        complete), the spans of `files` there now (by their path on the source) and whether the
        source holds all of them; raises FeedFailure once the source failed."""
        wanted = {item.source_path for item in files}
        path_on_source = {local: where[0] for local, where in _read_stream(stream).get("files", {}).items()
                          if where and where[0] in wanted}
        polls = [0]
        seen: list = [None, []]  # the stream file's (mtime, size, inode) when last read, and its spans then

        def availability():
            polls[0] += 1
            if polls[0] % LEDGER_EVERY_POLLS == 1:
                entry = live(self.ledger.snapshot()["hosts"].get(source) or {})
                if entry.get("state") in SOURCES:
                    return [], True
                if entry.get("state") != RECEIVING:
                    raise FeedFailure("source", f"{source} stopped receiving the tree it was passing on")
            try:
                status = os.stat(stream)
                version = (status.st_mtime_ns, status.st_size, status.st_ino)
            except (OSError, TypeError):
                version = None
            if version is None or version != seen[0]:  # read and parsed only when it was rewritten
                spans = _read_stream(stream).get("spans", {})
                seen[:] = [version, [(path, start, end) for local, path in path_on_source.items()
                                     for start, end in spans.get(local, ())]]
            return seen[1], False

        return availability

    def _feed(self, source: str, files: list, host_key, write_size: int | None) -> set:
        if not files:
            return set()
        if host_key is None:
            raise FeedFailure("receiver", "the controller holds no verified host key of it to give the peer",
                              launched=False)
        host, port = self.peer_address
        name = host if port == 22 else f"[{host}]:{port}"
        receiver = PeerReceiver(host=host, port=port, user=self.spec.user or local_user(),
                                known_hosts_lines=(f"{name} {host_key[0]} {host_key[1]}",), write_size=write_size)
        try:
            source_spec = self.peer_spec(source)
        except (SessionError, ValueError, KeyError) as exc:
            raise FeedFailure("source", f"cannot log in to {source} from the controller: {exc}",
                              launched=False) from None
        started = time.monotonic()
        with self.lock:
            self.feeding = (source, sum(item.size for item in files), started, started)
        opened = []
        entry = self.ledger.snapshot()["hosts"].get(source) or {}
        streaming = entry.get("state") == RECEIVING and bool(entry.get("stream"))
        written = feed_from_peer(source_spec, receiver, files, connections=PEER_CONNECTIONS,
                                 agent_keys=self._agent_keys(), bandwidth_limit=self.bandwidth_limit,
                                 timeout=self.timeout, python_interpreter=self.python_interpreter,
                                 on_bytes=self._peer_sent, key_passphrase=self.spec.key_passphrase,
                                 on_connections=opened.append, on_spans=self.published,
                                 availability=self._availability(source, entry["stream"], files) if streaming
                                 else None)
        seconds = time.monotonic() - started
        self.attempts.append({"source": source, "files": len(written), "seconds": round(seconds, 3),
                              "connections": max(opened, default=0), "streamed": streaming})
        return set(written)

    def _peer_sent(self, nbytes: int) -> None:
        """Bytes the receiver acknowledged to the peer: counted, and a progress line now and then."""
        with self.lock:
            self.peer_bytes += nbytes
            source, total, started, last = self.feeding
            now = time.monotonic()
            if self.progress_interval <= 0 or now - last < self.progress_interval:
                return
            self.feeding = (source, total, started, now)
            done = self.peer_bytes
        self.say(f"fan-out: {human_bytes(done)} of {human_bytes(total)} from {source}, "
                 f"{human_rate(done / max(now - started, 1e-9))}")

    def _agent_keys(self) -> list:
        """The key files this push logs in to the host with: all the forwarded agent will hold. With
        none named, the default identities OpenSSH would try (unless the user's agent is forwarded)."""
        spec = self.spec
        named = [expand_path(path) for path in [spec.private_key_file, *spec.identity_files] if path]
        keys = [path for path in named if os.path.isfile(path)]
        if keys or os.environ.get("SSH_AUTH_SOCK"):
            return keys
        return [path for name in DEFAULT_IDENTITIES if os.path.isfile(path := expand_path(f"~/.ssh/{name}"))]

    def _release(self) -> None:
        if self.holding is not None:
            self.ledger.release(self.host, self.holding)
            self.holding = None

    # -- at the end ------------------------------------------------------------------------------

    def finish(self, ok: bool) -> None:
        """The push ended: on success the host is a source from now on."""
        self._release()
        with self.lock:
            self.stream_path = None  # from now on the ledger's state says it all
            if self.catch_up is not None:
                self.catch_up.cancel()
        if not self.plans and not ok:
            return
        copy_map = None
        if ok:
            copy_map = self.ledger.write_copy_map(self.host, {plan.local.path: plan.dest for plan in self.plans})
        if ok or self.joined:
            self.ledger.finish(self.host, ok, self.group, self.tree, copy_map)

    def report(self) -> dict:
        """For the result: where the data came from and what that took."""
        return {"source": self.source, "group": self.group, "waited_seconds": round(self.waited, 3),
                "peer_bytes": self.peer_bytes, "attempts": self.attempts}
