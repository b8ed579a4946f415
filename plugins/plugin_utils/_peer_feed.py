# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Feeding one host from another (fleet fan-out): the controller's end of the peer sender.

A host that holds a verified copy writes it to another host's temp files itself, so the
controller's uplink carries the content once per group instead of once per host. The sender
(module_utils/_peer_sender.py, standard library only) is started here on the source host the way
the hashing service is (_remote_hash: the bootstrap reads its source from stdin), over a connection
of this feed's own, and reports each temp it finished as one JSON line.

Trust stays on the controller: the sender is given the receiver's host key as the controller
verified it, and logs in with an SSH agent forwarded on this one exec channel. That agent is the
user's (SSH_AUTH_SOCK) or, when the push names key files, a temporary ssh-agent holding exactly
those keys, started here and killed when the feed ends. No key, password or passphrase is ever sent
to a host or written into a message. What a compromised source could do with the forwarded agent
while the feed runs (log in where those keys are accepted) is what `synchronize` with
`delegate_to` already allows it.

Checking the written temps and putting them in place is the caller's: it hashes every block of
them against the source's digests, as for a push from the controller.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ansible_collections.multipush.sftp.plugins.module_utils import _peer_sender
from ansible_collections.multipush.sftp.plugins.plugin_utils._remote_hash import NO_PYTHON_STATUS, hasher_command
from ansible_collections.multipush.sftp.plugins.plugin_utils._session import open_connection, stop_process
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import ConnectionSpec, SessionError

KINDS = ("source", "receiver", "interrupted")
POLL_SECONDS = 0.5
AGENT_START_SECONDS = 10.0
# How long a stopped sender may take to end: it kills its ssh clients and waits for them (the
# sender's CLOSE_SECONDS), plus its own exit.
SENDER_EXIT_SECONDS = _peer_sender.CLOSE_SECONDS + 5.0
# A streaming feed (its source still receiving the copy) looks this often for more of it.
STREAM_POLL_SECONDS = 0.1
SOCKET_DIRECTORY_MAX = 90
AGENT_CHANNELS = 32  # agent connections the source may hold open at once (one per ssh login)


@dataclass(frozen=True)
class PeerFile:
    source_path: str  # absolute path of the verified copy on the source host
    temp: str  # absolute temp path on the receiver (its directory exists); created/truncated, written at full size
    size: int
    ranges: tuple  # ((offset, length), ...) covering [0, size); () for an empty file
    final_path: str | None = None  # where source_path is once renamed (a copy still being checked is a temp)


@dataclass(frozen=True)
class PeerReceiver:
    host: str  # the address the source uses to reach the receiver (multipush_peer_address)
    port: int
    user: str  # login user on the receiver
    known_hosts_lines: tuple  # the receiver's host key as the controller verified it, named as the source dials it
    write_size: int | None = None  # the largest write its SFTP server takes, as the controller's connection learned


class FeedFailure(Exception):
    """A feed that did not complete.

    kind: "source" (this host cannot act as a source: no ssh client or Python there, its copy
    unreadable, our connection to it failed or broke), "receiver" (the source could not reach or
    log in to the receiver: no route, refused, timeout, host key mismatch, authentication refused;
    also no agent to forward at all), "interrupted" (the transfer broke midway otherwise, or was
    cancelled). written: the temps completely written before it stopped. launched: whether the
    sender ran at all (False: it touched nothing on the receiver)."""

    def __init__(self, kind: str, message: str, written=frozenset(), launched: bool = True):
        super().__init__(message)
        self.kind = kind
        self.written = frozenset(written)
        self.launched = launched


# ---------------------------------------------------------------------------------------------
# The agent: the user's, or a temporary one holding the push's keys
# ---------------------------------------------------------------------------------------------


class TemporaryAgent:
    """An ssh-agent of this feed's own, in a private directory, holding exactly `keys`.

    A key with a passphrase is added through SSH_ASKPASS: a 0700 script in the directory that
    prints the passphrase from its own environment, so it is never on a command line or in a file.
    """

    def __init__(self, keys: list, key_passphrase: str | None = None):
        self.directory = tempfile.mkdtemp(prefix="multipush-agent-")
        if len(self.directory) > SOCKET_DIRECTORY_MAX:  # a socket's path has room for about 100 bytes
            os.rmdir(self.directory)
            self.directory = tempfile.mkdtemp(prefix="multipush-agent-", dir="/tmp")
        self.socket_path = os.path.join(self.directory, "agent.sock")
        self.process = None
        try:
            self._start()
            for key in keys:
                self._add(str(key), key_passphrase)
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        with tempfile.TemporaryFile() as errors:
            try:
                self.process = subprocess.Popen(  # pylint: disable=consider-using-with
                    ["ssh-agent", "-D", "-a", self.socket_path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=errors, close_fds=True, start_new_session=True)
            except OSError as exc:
                raise FeedFailure("receiver", f"fan-out needs ssh-agent on the controller to hold the push's keys: "
                                              f"{exc.strerror or exc}") from None
            deadline = time.monotonic() + AGENT_START_SECONDS
            # The socket file appears at bind(), before the agent listens: connecting tells it is up (an
            # ssh-add in between was refused once under load).
            while not self._listening():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    errors.seek(0)
                    said = " ".join(errors.read()[-300:].decode("utf-8", "replace").split())
                    raise FeedFailure("receiver", "the temporary ssh-agent on the controller did not start"
                                      + (f": {said}" if said else ""))
                time.sleep(0.02)

    def _listening(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.socket_path)
        except OSError:
            return False
        finally:
            probe.close()
        return True

    def _add(self, key: str, passphrase: str | None) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SSH_AUTH_SOCK": self.socket_path,
               "HOME": os.environ.get("HOME", "/")}
        if passphrase:
            askpass = os.path.join(self.directory, "askpass")
            with open(os.open(askpass, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700), "w", encoding="utf-8") as script:
                # once only: ssh-add asks again after a wrong passphrase, forever
                script.write('#!/bin/sh\n[ -e "$0.used" ] && exit 1\n: > "$0.used"\n'
                             'printf "%s\\n" "$MULTIPUSH_KEY_PASSPHRASE"\n')
            env.update({"SSH_ASKPASS": askpass, "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0",
                        "MULTIPUSH_KEY_PASSPHRASE": passphrase})
        try:
            done = subprocess.run(["ssh-add", "-q", key], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=30, check=False, start_new_session=True)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FeedFailure("receiver", f"could not add the key {key} to the temporary ssh-agent: {exc}") from None
        finally:
            if passphrase:
                Path(self.directory, "askpass").unlink(missing_ok=True)
                Path(self.directory, "askpass.used").unlink(missing_ok=True)
        if done.returncode != 0:
            said = " ".join(done.stderr.decode("utf-8", "replace").split()).replace(passphrase or "\0", "***")
            hint = ("the passphrase given was refused" if passphrase
                    else "it needs a passphrase (key_passphrase) or is unreadable")
            raise FeedFailure("receiver", f"could not add the key {key} to the temporary ssh-agent: {hint}"
                                          + (f" ({said[-300:]})" if said else ""))

    def close(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)


class AgentForwarder:
    """The handler of channel.request_forward_agent: each agent channel the source opens is
    joined to a new connection to the local agent's socket, pumped by one thread, all closed
    with the feed."""

    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.pumps: list[threading.Thread] = []

    def __call__(self, channel) -> None:  # called on Paramiko's transport thread: must not block
        with self.lock:
            self.pumps = [pump for pump in self.pumps if pump.is_alive()]
            if self.closed.is_set() or len(self.pumps) >= AGENT_CHANNELS:
                channel.close()
                return
            pump = threading.Thread(target=self._pump, args=(channel,), name="multipush-agent-forward", daemon=True)
            self.pumps.append(pump)
        pump.start()

    def _pump(self, channel) -> None:
        agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        selector = selectors.DefaultSelector()
        try:
            agent.settimeout(5)
            agent.connect(self.socket_path)
            agent.setblocking(False)
            channel.setblocking(False)
            selector.register(agent, selectors.EVENT_READ, channel)
            selector.register(channel, selectors.EVENT_READ, agent)
            while not self.closed.is_set():
                for key, _events in selector.select(POLL_SECONDS):
                    data = key.fileobj.recv(1 << 16)
                    if not data:
                        return
                    key.data.setblocking(True)
                    key.data.sendall(data)
                    key.data.setblocking(False)
        except (OSError, EOFError, socket.timeout):
            return
        except Exception:  # Paramiko's SSHException when the transport ends: the agent channel is gone
            return
        finally:
            selector.close()
            agent.close()
            channel.close()

    def close(self) -> None:
        self.closed.set()
        for pump in list(self.pumps):
            pump.join(2 * POLL_SECONDS + 1)


def _agent_for(agent_keys: list, key_passphrase: str | None):
    """(socket path to forward, TemporaryAgent or None)."""
    if agent_keys:
        agent = TemporaryAgent(agent_keys, key_passphrase)
        return agent.socket_path, agent
    if os.environ.get("SSH_AUTH_SOCK"):
        return os.environ["SSH_AUTH_SOCK"], None
    raise FeedFailure("receiver", "fan-out needs a key file (private_key_file) or an SSH agent (SSH_AUTH_SOCK) on "
                                  "the controller for the sending hosts to log in to the others; passwords are never "
                                  "sent to hosts")


# ---------------------------------------------------------------------------------------------
# The feed
# ---------------------------------------------------------------------------------------------


def _request_line(receiver: PeerReceiver, files: list, connections: int, bandwidth_limit, timeout: float,
                  streaming: bool = False) -> bytes:
    request = {
        "receiver": {"host": receiver.host, "port": int(receiver.port), "user": receiver.user,
                     "known_hosts_lines": [line.strip() for line in receiver.known_hosts_lines]},
        "files": [{"source_path": item.source_path, "temp": item.temp, "size": int(item.size),
                   "ranges": [[int(offset), int(length)] for offset, length in item.ranges],
                   "final_path": item.final_path} for item in files],
        "connections": int(connections), "bandwidth_limit": bandwidth_limit, "timeout": float(timeout),
        "write_size": receiver.write_size, "streaming": streaming,
    }
    return (json.dumps(request) + "\n").encode("utf-8")


class _Run:
    """One sender run on one exec channel: events read, written temps collected."""

    def __init__(self, source: ConnectionSpec, receiver: PeerReceiver, timeout: float, on_bytes, cancel,
                 availability=None, on_spans=None):
        self.where = f"feeding {receiver.host}:{receiver.port} from {source.alias or source.host}"
        self.timeout = timeout
        self.on_bytes = on_bytes
        self.cancel = cancel
        self.availability = availability  # streaming: () -> (spans [(source path, start, end)], complete)
        self.on_spans = on_spans
        self.listening = False  # the sender reads offers from now on
        self.offered: set = set()
        self.offered_all = availability is None
        self.offered_at = 0.0
        self.written: set = set()
        self.pending = bytearray()
        self.errors = bytearray()
        self.channel = None
        self.transport = None
        self.connections = 0  # the most the sender had open

    def failure(self, kind: str, cause: str) -> FeedFailure:
        return FeedFailure(kind, f"{self.where}: {cause}", self.written)

    def start(self, source: ConnectionSpec, request: bytes, interpreter, forwarder) -> None:
        try:
            self.transport = open_connection(source)
        except SessionError as exc:
            raise FeedFailure("source", f"{self.where}: cannot connect to the source: {exc}", launched=False) from None
        try:
            channel = self.transport.open_session(timeout=self.timeout)
            self.channel = channel
            channel.request_forward_agent(forwarder)
            channel.settimeout(POLL_SECONDS if self.availability is None else STREAM_POLL_SECONDS)
            channel.exec_command(hasher_command(interpreter))
            with open(_peer_sender.__file__, "rb") as stream:
                code = stream.read()
            channel.sendall(f"{len(code)}\n".encode() + code + request)
        except Exception as exc:  # Paramiko's SSHException, EOFError, OSError: the source's connection
            reason = str(exc) or type(exc).__name__
            raise self.failure("source", f"cannot start the sender on the source: {reason}") from None

    def follow(self) -> None:
        """Read events until done; raise FeedFailure on an error, an early end or silence."""
        heard = time.monotonic()
        silence = max(3 * self.timeout, 30.0)  # the sender speaks at least every few seconds
        while True:
            if self.cancel is not None and self.cancel.is_set():
                raise self.failure("interrupted", "cancelled")
            self._offer()
            try:
                chunk = self.channel.recv(1 << 16)
            except socket.timeout:
                chunk = None
            except Exception as exc:  # the channel or transport failed
                raise self.failure("source", f"the connection to the source broke ({exc or type(exc).__name__})") \
                    from None
            self._collect_stderr()
            if chunk:
                heard = time.monotonic()
                self.pending += chunk
                if self._events():
                    return
            elif chunk == b"":
                raise self._ended()
            elif not self.transport.is_active():
                raise self.failure("source", "the connection to the source broke")
            elif time.monotonic() - heard > silence:
                raise self.failure("interrupted", f"the sender on the source said nothing for {silence:.0f} s")

    def _offer(self) -> None:
        """Streaming: tell the sender what more of the source's copy is there (see the sender's
        Availability). Raises FeedFailure when the source can no longer get it."""
        now = time.monotonic()
        if self.offered_all or not self.listening or now - self.offered_at < STREAM_POLL_SECONDS:
            return
        self.offered_at = now
        spans, complete = self.availability()
        fresh = [list(span) for span in spans if tuple(span) not in self.offered]
        if not fresh and not complete:
            return
        try:
            self.channel.sendall((json.dumps({"available": fresh, "complete": complete}) + "\n").encode("utf-8"))
        except Exception as exc:  # the channel or transport failed
            raise self.failure("source", f"the connection to the source broke ({exc or type(exc).__name__})") \
                from None
        self.offered.update(tuple(span) for span in fresh)
        self.offered_all = complete

    def _events(self) -> bool:
        """Handle the complete lines received; True once the sender said done."""
        while b"\n" in self.pending:
            line, _newline, rest = bytes(self.pending).partition(b"\n")
            self.pending = bytearray(rest)
            try:
                event = json.loads(line.decode("utf-8"))
            except ValueError:
                continue  # not ours (a login banner on stdout...)
            if not isinstance(event, dict):
                continue
            if "written" in event:
                self.written.add(event["written"])
            if event.get("listening"):
                self.listening = True
            if isinstance(event.get("spans"), list) and self.on_spans is not None:
                self.on_spans([tuple(span) for span in event["spans"]])
            if event.get("bytes") and self.on_bytes is not None:
                self.on_bytes(int(event["bytes"]))
            if isinstance(event.get("connections"), int):
                self.connections = max(self.connections, event["connections"])
            if event.get("done"):
                return True
            if "error" in event:
                kind = event.get("kind") if event.get("kind") in KINDS else "interrupted"
                raise self.failure(kind, str(event["error"]))
        return False

    def _collect_stderr(self) -> None:
        while self.channel.recv_stderr_ready():
            self.errors += self.channel.recv_stderr(1 << 16)
        del self.errors[:-4000]

    def _ended(self) -> FeedFailure:
        """The sender's output ended without done or error: why, from its exit status and stderr."""
        status = self.channel.recv_exit_status() if self.transport.is_active() else -1
        self._collect_stderr()
        said = " ".join(self.errors.decode("utf-8", "replace").split())[-400:]
        if status == NO_PYTHON_STATUS:
            return self.failure("source", f"no Python 3 to run the sender: {said or 'not found'}")
        if status == -1:
            return self.failure("source", f"the connection to the source broke{': ' + said if said else ''}")
        return self.failure("interrupted", f"the sender ended with status {status}{': ' + said if said else ''}")

    def close(self) -> None:
        """End the sender before anything else touches the receiver's temps: a sender that outlived
        a failed feed would go on writing (and creating) them under the controller's comparison or a
        next peer's feed. EOF on its stdin stops it; its exit status says its ssh clients are gone."""
        channel, transport = self.channel, self.transport
        try:
            if channel is not None and transport is not None and transport.is_active() \
                    and not channel.exit_status_ready():
                channel.shutdown_write()
                deadline = time.monotonic() + SENDER_EXIT_SECONDS
                while not channel.exit_status_ready() and transport.is_active() and time.monotonic() < deadline:
                    time.sleep(POLL_SECONDS / 10)
        except Exception:  # the connection went away meanwhile: the session, and the sender with it, end
            pass
        for closable in (self.channel, self.transport):
            if closable is not None:
                try:
                    closable.close()
                except Exception:  # best effort: the feed's outcome is already decided
                    pass


def feed_from_peer(source: ConnectionSpec, receiver: PeerReceiver, files: list, *, connections: int,
                   agent_keys: list, bandwidth_limit: float | None, timeout: float,
                   python_interpreter: str | None = None, on_bytes=None, cancel: threading.Event | None = None,
                   key_passphrase: str | None = None, on_connections=None, availability=None,
                   on_spans=None) -> frozenset:
    """Have `source` write `files` (PeerFile) to `receiver`'s temps with at most `connections` SSH
    connections of its own (it starts with one and adds more while they pay: the sender's Growth),
    at most `bandwidth_limit` bytes/s for all of them together.

    agent_keys: key files the sender may log in to the receiver with (held by a temporary agent,
    with key_passphrase if they need one); empty: the controller's own agent. on_bytes(n): bytes
    the receiver acknowledged (any thread). cancel: set to stop the feed. on_connections(n): the
    most connections the sender had open, once it ended (successfully or not).
    availability: for a source still receiving the copy (a streaming feed), () -> (spans, complete):
    the byte spans (source path, start, end) of its copies that are there, and whether all are;
    polled while the feed runs; it raises FeedFailure when the source can no longer get them.
    on_spans([(temp, start, end)]): spans of the receiver's temps the receiver acknowledged.
    Returns the set of temps written completely; raises FeedFailure (kind and written set)."""
    where = f"feeding {receiver.host}:{receiver.port} from {source.alias or source.host}"
    if not files:
        return frozenset()
    if cancel is not None and cancel.is_set():
        raise FeedFailure("interrupted", f"{where}: cancelled")
    if not receiver.known_hosts_lines:
        raise FeedFailure("receiver", f"{where}: no host key line for the receiver; it cannot be trusted")
    try:
        socket_path, agent = _agent_for(agent_keys, key_passphrase)
    except FeedFailure as exc:
        raise FeedFailure(exc.kind, f"{where}: {exc}", launched=False) from None
    forwarder = AgentForwarder(socket_path)
    run = _Run(source, receiver, timeout, on_bytes, cancel, availability, on_spans)
    try:
        request = _request_line(receiver, files, connections, bandwidth_limit, timeout, availability is not None)
        run.start(source, request, python_interpreter, forwarder)
        run.follow()
        return frozenset(run.written)
    finally:
        run.close()
        if on_connections is not None and run.connections:
            on_connections(run.connections)
        forwarder.close()
        if agent is not None:
            agent.close()
