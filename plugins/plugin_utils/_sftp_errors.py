# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""How the SFTP layer fails, in one place: `RemoteError` (the server refused; deterministic, never
retried), `ConnectionLost` (the connection is gone; a fresh one may succeed), SFTP's status codes
by name, and `classified`, the one place where any other exception becomes one of the two.
"""

from __future__ import annotations

import contextlib
import errno
import socket

from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import paramiko

if paramiko is not None:
    from paramiko.sftp import (
        SFTP_BAD_MESSAGE, SFTP_CONNECTION_LOST, SFTP_EOF, SFTP_FAILURE, SFTP_NO_CONNECTION, SFTP_NO_SUCH_FILE,
        SFTP_OK, SFTP_OP_UNSUPPORTED, SFTP_PERMISSION_DENIED,
    )
else:  # pragma: no cover - the codes of SFTP version 3, for imports on a controller without Paramiko
    (SFTP_OK, SFTP_EOF, SFTP_NO_SUCH_FILE, SFTP_PERMISSION_DENIED, SFTP_FAILURE, SFTP_BAD_MESSAGE,
     SFTP_NO_CONNECTION, SFTP_CONNECTION_LOST, SFTP_OP_UNSUPPORTED) = range(9)

__all__ = [
    "SFTP_BAD_MESSAGE", "SFTP_CONNECTION_LOST", "SFTP_EOF", "SFTP_FAILURE", "SFTP_NO_CONNECTION", "SFTP_NO_SUCH_FILE",
    "SFTP_OK", "SFTP_OP_UNSUPPORTED", "SFTP_PERMISSION_DENIED", "STATUS_NAMES", "UNEXPLAINED_CODES",
    "PERMISSION_REMEDY", "ConnectionLost", "RemoteError", "classified", "describe", "lost_or_refused", "remedy",
    "status_text",
]

STATUS_NAMES = {SFTP_EOF: "end of file", SFTP_NO_SUCH_FILE: "no such file",
                SFTP_PERMISSION_DENIED: "permission denied", SFTP_FAILURE: "failure",
                SFTP_BAD_MESSAGE: "bad message", SFTP_NO_CONNECTION: "no connection",
                SFTP_CONNECTION_LOST: "connection lost", SFTP_OP_UNSUPPORTED: "operation unsupported"}
# Refusals that do not say why (a generic failure, or no status code at all): a full or read-only
# file system shows this way, so the engine asks the target about its disk before reporting them.
UNEXPLAINED_CODES = (SFTP_FAILURE, None)
PERMISSION_REMEDY = ("; the SSH user may not write there: push into a directory it owns, fix the permissions, "
                     "or use become (when the user may, the SFTP server refuses this request to everyone: "
                     "read-only with -R, or denied by a -P list on its Subsystem line)")


class RemoteError(Exception):
    """The server refused an operation. Retrying on another connection would not help."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class ConnectionLost(Exception):
    """The SSH connection failed mid-operation. `acked` is how far the current range got;
    `sent` how many bytes went out for it (acknowledged or not)."""

    def __init__(self, message: str, acked: int = 0, sent: int = 0):
        super().__init__(message)
        self.acked = acked
        self.sent = sent


def remedy(code: int | None) -> str:
    """What to do about a refusal with this status code, appended to its message ('' when nothing)."""
    return PERMISSION_REMEDY if code == SFTP_PERMISSION_DENIED else ""


def status_text(status: tuple[int | None, str]) -> str:
    code, text = status
    return text or str(STATUS_NAMES.get(code, code))


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, (OSError, EOFError)) and str(exc) else f"{type(exc).__name__}: {text}"


def lost_or_refused(transport, exc: BaseException, context: str, acked: int = 0, sent: int = 0) -> Exception:
    """`exc` as a RemoteError or a ConnectionLost (unchanged when it is one already)."""
    if isinstance(exc, (RemoteError, ConnectionLost)):
        return exc
    if isinstance(exc, (EOFError, socket.timeout)) or not transport.is_active():
        return ConnectionLost(f"{context}: connection lost ({describe(exc)})", acked, sent)
    if isinstance(exc, paramiko.SSHException):
        return ConnectionLost(f"{context}: {describe(exc)}", acked, sent)
    if isinstance(exc, OSError):
        code = {errno.ENOENT: SFTP_NO_SUCH_FILE, errno.EACCES: SFTP_PERMISSION_DENIED}.get(exc.errno)
        return RemoteError(f"{context}: {exc.strerror or exc}{remedy(code)}", code)
    return RemoteError(f"{context}: {describe(exc)}")


@contextlib.contextmanager
def classified(transport, context: str, acked_by=None, sent_by=None):
    """Every exception of the block leaves as a RemoteError or a ConnectionLost, none is dropped.
    acked_by, sent_by: the pipelines whose acknowledged and sent bytes a ConnectionLost reports, as
    they are when it happens (how far a range got)."""
    try:
        yield
    except (RemoteError, ConnectionLost):
        raise
    except Exception as exc:
        acked = acked_by.acked_bytes if acked_by is not None else 0
        sent = sent_by.sent_bytes if sent_by is not None else 0
        raise lost_or_refused(transport, exc, context, acked, sent) from None
