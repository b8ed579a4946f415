# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Hash files on the target over an SSH connection the push already has.

Running multipush.sftp.verify as an Ansible module costs, per call, building the module's
payload on the controller, Ansible's own SSH connection and a Python start-up on the target:
seconds on a busy controller or a long link. Here a worker opens one more exec channel on its
open connection and runs the target's Python on the very code the verify module uses
(module_utils/_digest.py, standard library only), sent over stdin with the request; the answer
comes back as JSON on stdout. One channel per call, one round trip or two, no new login.

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

# Where targets keep a Python 3 when `python3` is not on the PATH of a non-interactive shell.
PYTHON_CANDIDATES = ("python3", "/usr/bin/python3", "/usr/libexec/platform-python", "/usr/local/bin/python3")
# The bootstrap reads the service's source (length-prefixed), then the request, from stdin.
BOOTSTRAP = ("import sys; stream = sys.stdin.buffer; size = int(stream.readline()); "
             "space = {'__name__': 'multipush_hasher'}; "
             "exec(compile(stream.read(size), 'multipush_hasher', 'exec'), space); "
             "space['serve'](stream, sys.stdout)")
NO_PYTHON_STATUS = 127
READ_POLL_SECONDS = 1.0


class HasherUnavailable(Exception):
    """The target cannot run the hashing service this way (no Python, a restricted shell...)."""


def _service_source() -> bytes:
    with open(_digest.__file__, "rb") as source:
        return source.read()


def hasher_command(interpreter: str | None) -> str:
    """A POSIX shell command that starts the first Python found with the bootstrap."""
    candidates = (interpreter,) if interpreter else PYTHON_CANDIDATES
    code = shlex.quote(BOOTSTRAP)
    tries = " ".join(shlex.quote(candidate) for candidate in candidates)
    missing = shlex.quote(f"multipush: no Python 3 among {' '.join(candidates)}")
    return (f'for p in {tries}; do if command -v "$p" >/dev/null 2>&1; then exec "$p" -c {code}; fi; done; '
            f'echo {missing} >&2; exit {NO_PYTHON_STATUS}')


def hash_on_target(transport, requests: list, algorithm: str, get_checksum: bool, interpreter: str | None,
                   deadline_seconds: float) -> list[dict]:
    """Entries as multipush.sftp.verify returns them, for `requests` (dicts path, chunk_size,
    chunk_indexes, get_checksum). Raises HasherUnavailable when the service cannot run there,
    ConnectionLost when the connection fails."""
    source = _service_source()
    payload = json.dumps({"files": requests, "algorithm": algorithm, "get_checksum": get_checksum}).encode()
    try:
        channel = transport.open_session()
    except Exception as exc:  # the server may refuse sessions beyond the first (MaxSessions 1)
        if not transport.is_active():
            raise ConnectionLost(f"hashing on the target: connection lost ({exc})") from None
        raise HasherUnavailable(f"the target refused another session on the connection ({exc})") from None
    try:
        channel.settimeout(READ_POLL_SECONDS)
        channel.exec_command(hasher_command(interpreter))
        channel.sendall(f"{len(source)}\n".encode() + source + payload)
        channel.shutdown_write()
        out, err = bytearray(), bytearray()
        give_up = time.monotonic() + deadline_seconds
        while True:
            try:
                chunk = channel.recv(1 << 16)
            except socket.timeout:
                chunk = None
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(1 << 16)
            if chunk:
                out += chunk
            elif chunk == b"":  # end of the answer
                break
            elif not transport.is_active():
                raise ConnectionLost("hashing on the target: connection lost")
            elif time.monotonic() > give_up:
                raise HasherUnavailable(f"no answer within {deadline_seconds:.0f} s")
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(1 << 16)
        status = channel.recv_exit_status()
    except (ConnectionLost, HasherUnavailable):
        raise
    except (OSError, EOFError) as exc:
        if not transport.is_active():
            raise ConnectionLost(f"hashing on the target: connection lost ({exc})") from None
        raise HasherUnavailable(str(exc)) from None
    except Exception as exc:  # Paramiko's SSHException and the like: the channel, not the data
        if not transport.is_active():
            raise ConnectionLost(f"hashing on the target: connection lost ({exc})") from None
        raise HasherUnavailable(f"{type(exc).__name__}: {exc}") from None
    finally:
        channel.close()
    text = err.decode("utf-8", "replace").strip()[-400:]
    if status != 0:
        raise HasherUnavailable(f"exit status {status}: {text or 'no message'}")
    try:
        return json.loads(out.decode("utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise HasherUnavailable(f"unreadable answer ({exc}): {text or out[:200]!r}") from None
