# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Hash files on the target over an SSH connection of the push's own.

Running multipush.sftp.verify as an Ansible module costs, per call, building the module's
payload on the controller, Ansible's own SSH connection and a Python start-up on the target:
seconds on a busy controller or a long link. Here the push's coordinator opens one connection
for hashing, an exec channel on it, and runs the target's Python on the very code the verify
module uses (module_utils/_digest.py, standard library only), sent over stdin ahead of the
requests; each answer comes back as one line of JSON on stdout. The service stays up for the
push, so a push pays one login, one exec channel and one Python start-up, not one per check.

It needs a shell that can start `python3` (or the host's ansible_python_interpreter). Where that
fails the caller falls back to the module, which also serves become: sudo prompts stay with
Ansible's become machinery.
"""

from __future__ import annotations

import json
import shlex
import socket
import time

from ansible_collections.multipush.sftp.plugins.module_utils import _digest
from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp import ConnectionLost

# The system's Python first: a `python3` found on the PATH may be a version manager's shim (pyenv's
# runs a shell script and `pyenv exec` before Python, which delays the first answer of every
# connection's service). Then the PATH, then where distributions keep one.
PYTHON_CANDIDATES = ("/usr/bin/python3", "python3", "/usr/libexec/platform-python", "/usr/local/bin/python3")
# The bootstrap reads the service's source (length-prefixed) from stdin; requests follow, one per line.
BOOTSTRAP = ("import sys; stream = sys.stdin.buffer; size = int(stream.readline()); "
             "space = {'__name__': 'multipush_hasher'}; "
             "exec(compile(stream.read(size), 'multipush_hasher', 'exec'), space); "
             "space['serve'](stream, sys.stdout)")
NO_PYTHON_STATUS = 127
READ_POLL_SECONDS = 1.0
# The server's answer to the service's channel: Paramiko's own default waits an hour.
OPEN_SECONDS = 30.0


class HasherUnavailable(Exception):
    """The target cannot run the hashing service this way (no Python, a restricted shell...).

    shell: a shell command did run there (it found no Python, or only this connection refused
    another channel), so Ansible's own module run may still work; False where the target runs
    no commands at all (an SFTP-only account or server)."""

    def __init__(self, message: str, shell: bool = False):
        super().__init__(message)
        self.shell = shell


def _service_source() -> bytes:
    with open(_digest.__file__, "rb") as source:
        return source.read()


def hasher_command(interpreter: str | None) -> str:
    """A POSIX shell command that starts the first Python found with the bootstrap."""
    candidates = (interpreter,) if interpreter else PYTHON_CANDIDATES
    code = shlex.quote(BOOTSTRAP)
    tries = " ".join(shlex.quote(candidate) for candidate in candidates)
    missing = shlex.quote(f"multipush: no Python 3 among {' '.join(candidates)}")
    # -I: the user's PYTHON* variables and the working directory cannot put other modules in place of
    # the standard library's; -S: no site-packages scan (and no .pth file runs) for a standard-library
    # program, a shorter start-up.
    return (f'for p in {tries}; do if command -v "$p" >/dev/null 2>&1; then exec "$p" -I -S -c {code}; fi; done; '
            f'echo {missing} >&2; exit {NO_PYTHON_STATUS}')


class TargetHasher:
    """The hashing service on the target, on an exec channel of `transport` (HashingConnection's),
    started by warm() or the first request and kept for the connection's life: one exec channel
    and one Python start-up, not one per check. Requests go one JSON line at a time; each answer
    is one JSON line."""

    def __init__(self, transport, interpreter: str | None = None):
        self.transport = transport
        self.interpreter = interpreter  # None: the usual places of python3
        self.channel = None
        self.pending = bytearray()  # what arrived after the last complete answer
        self.errors = bytearray()
        self.refused: str | None = None  # why the server would not open the service's channel
        self.refused_shell = False

    def warm(self) -> None:
        """Start the service now, ahead of the first request. A failure is not raised here: a
        refused channel is remembered and a service that could not start is found by the first
        request, which reports why (and the push falls back to the module)."""
        if self.channel is not None or self.refused:
            return
        try:
            self._start_service()
        except HasherUnavailable as exc:
            self.refused = str(exc)
            self.refused_shell = exc.shell
            self.close()
        except Exception:  # a lost connection: the first request meets it and reports it
            self.close()

    def digests(self, requests: list, algorithm: str, get_checksum: bool, deadline_seconds: float) -> list[dict]:
        """Entries as multipush.sftp.verify returns them, for `requests` (dicts path, chunk_size,
        chunk_indexes, get_checksum). The service is started at the first request (unless warm()
        did) and keeps running for later ones. Raises HasherUnavailable when the
        service cannot run there, ConnectionLost when the connection fails."""
        request = json.dumps({"files": requests, "algorithm": algorithm, "get_checksum": get_checksum}) + "\n"
        try:
            if self.refused:
                raise HasherUnavailable(self.refused, shell=self.refused_shell)
            if self.channel is None:
                self._start_service()
            if self.channel.exit_status_ready():  # it ended before being asked (no Python there...)
                raise self._ended()
            self.channel.sendall(request.encode())
            line = self._answer(deadline_seconds)
        except (ConnectionLost, HasherUnavailable):
            self.close()
            raise
        except Exception as exc:  # OSError, EOFError, Paramiko's SSHException: the channel, not the data
            ended = self._ended() if self.channel is not None and self.channel.exit_status_ready() else None
            reason = str(ended) if ended is not None else (str(exc) or type(exc).__name__)
            self.close()
            if not self.transport.is_active():
                raise ConnectionLost(f"hashing on the target: connection lost ({reason})") from None
            raise ended or HasherUnavailable(reason) from None
        try:
            return json.loads(line.decode("utf-8"))["files"]
        except (ValueError, KeyError, TypeError) as exc:
            self.close()
            raise HasherUnavailable(f"unreadable answer ({exc}): {line[:200]!r}") from None

    def _start_service(self) -> None:
        try:
            channel = self.transport.open_session(timeout=OPEN_SECONDS)
        except Exception as exc:  # the server may refuse sessions beyond the first (MaxSessions 1)
            if not self.transport.is_active():
                raise ConnectionLost(f"hashing on the target: connection lost ({exc})") from None
            raise HasherUnavailable(f"the target refused another session on the connection ({exc})",
                                    shell=True) from None
        self.channel = channel
        channel.settimeout(READ_POLL_SECONDS)
        channel.exec_command(hasher_command(self.interpreter))
        source = _service_source()
        channel.sendall(f"{len(source)}\n".encode() + source)

    def _answer(self, deadline_seconds: float) -> bytes:
        """The next line on the channel's stdout, collecting stderr meanwhile."""
        channel = self.channel
        give_up = time.monotonic() + deadline_seconds
        while b"\n" not in self.pending:
            try:
                chunk = channel.recv(1 << 16)
            except socket.timeout:
                chunk = None
            while channel.recv_stderr_ready():
                self.errors += channel.recv_stderr(1 << 16)
            if chunk:
                self.pending += chunk
            elif chunk == b"":  # the service ended without an answer
                raise self._ended()
            elif not self.transport.is_active():
                raise ConnectionLost("hashing on the target: connection lost")
            elif time.monotonic() > give_up:
                raise HasherUnavailable(f"no answer within {deadline_seconds:.0f} s")
        line, _newline, rest = bytes(self.pending).partition(b"\n")
        self.pending = bytearray(rest)
        return line

    def _ended(self) -> HasherUnavailable:
        """Why the service's command ended: our own script's status says a shell ran it and
        found no Python; any other (an SFTP-only server's refusal...) says no command runs there."""
        channel = self.channel
        while channel.recv_stderr_ready():
            self.errors += channel.recv_stderr(1 << 16)
        status = channel.recv_exit_status()
        text = self.errors.decode("utf-8", "replace").strip()[-400:]
        shell = status == NO_PYTHON_STATUS
        if not text and not shell:
            text = "no message; the account may allow SFTP only"
        return HasherUnavailable(f"exit status {status}: {text or 'no message'}", shell=shell)

    def close(self) -> None:
        """End the service (its stdin closes, it exits) and forget the channel."""
        if self.channel is not None:
            try:
                self.channel.close()
            except Exception:
                pass
        self.channel = None
        self.pending = bytearray()
        self.errors = bytearray()


class HashingConnection:
    """The hashing service on a connection of its own, used by the push's coordinator.

    Not on the data connections: a check there waits for a worker to finish the range it is
    sending, holds that worker meanwhile, and every data connection starts a service of its own
    (the login shell and Python on the target, each a noticeable share of the target's CPU, times
    the number of connections). `connect()` returns an authenticated transport, with the caller's retries and
    handshake throttle, or raises HasherUnavailable.
    """

    def __init__(self, connect, interpreter: str | None = None):
        self.connect = connect
        self.interpreter = interpreter
        self.transport = None
        self.hasher: TargetHasher | None = None
        self.failed: str | None = None  # why it could not be had: not asked again

    def start(self) -> None:
        """Log in and start the service now (ahead of the first request). Failures are kept for
        the first request to raise."""
        try:
            self._hasher().warm()
        except HasherUnavailable:
            pass

    def digests(self, requests: list, algorithm: str, get_checksum: bool, deadline_seconds: float) -> list[dict]:
        """As TargetHasher.digests. A connection lost during a request is opened again, once."""
        for attempt in (1, 2):
            hasher = self._hasher()
            try:
                return hasher.digests(requests, algorithm, get_checksum, deadline_seconds)
            except ConnectionLost as exc:
                self.close()
                if attempt == 2:
                    self.failed = f"its connection was lost twice ({exc})"
        raise HasherUnavailable(self.failed)

    def _hasher(self) -> TargetHasher:
        if self.failed:
            raise HasherUnavailable(self.failed)
        if self.hasher is None:
            try:
                self.transport = self.connect()
            except HasherUnavailable as exc:
                self.failed = str(exc)
                raise
            self.hasher = TargetHasher(self.transport, self.interpreter)
        return self.hasher

    def close(self) -> None:
        if self.hasher is not None:
            self.hasher.close()
        if self.transport is not None:
            try:
                self.transport.close()
            except Exception:  # closing is best effort; the push's result does not depend on it
                pass
        self.hasher = None
        self.transport = None
