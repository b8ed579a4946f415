# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Starting SFTP on an authenticated transport: as the sftp subsystem or, with become, on an exec
channel running sftp-server through sudo (_become); then the owner and group wanted for the pushed
files (_ownership), kept on the session for the SFTP layer.
"""

from __future__ import annotations

import socket
import struct
import time

from ansible_collections.multipush.sftp.plugins.plugin_utils import _paramiko_compat
from ansible_collections.multipush.sftp.plugins.plugin_utils._become import become_channel
from ansible_collections.multipush.sftp.plugins.plugin_utils._ownership import resolve_ownership
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import ConnectionSpec, SessionError, paramiko

if paramiko is not None:
    from paramiko.sftp import CMD_INIT, SFTPError

SFTP_VERSION = 3  # what Paramiko's client speaks
END_GRACE_SECONDS = 1.0


def _sftp_subsystem_channel(transport: "paramiko.Transport", channel):
    """The session channel made to run the sftp subsystem; whether SFTP's init was sent already.

    Channel.invoke_subsystem waits for the server's answer before SFTP's init may go: two round
    trips before the server's version comes back. With the door's private paths
    (_paramiko_compat.USE_PRIVATE) the init is sent right behind the request (as OpenSSH's client
    does: the server runs a channel's messages in order, so it reaches the subsystem once that
    started) and the answer to the request is waited for after: one round trip. A refused
    subsystem still raises, as in invoke_subsystem.
    """
    if not _paramiko_compat.USE_PRIVATE:
        channel.invoke_subsystem("sftp")
        return channel, False
    init = struct.pack(">IBI", 5, CMD_INIT, SFTP_VERSION)  # length, SSH_FXP_INIT, version
    _paramiko_compat.request_subsystem_with(transport, channel, "sftp", init)
    channel.multipush_init_sent = True
    return channel, True


def _sftp_program(spec: ConnectionSpec) -> str:
    """What runs SFTP on the target for this connection, as messages name it."""
    return "sftp-server through sudo" if spec.become is not None else "the sftp subsystem"


def _sftp_start_failed(spec: ConnectionSpec, exc: BaseException) -> SessionError:
    how = _sftp_program(spec)
    return SessionError(f"cannot start SFTP on {spec.describe()}: {exc}; is {how} available on the target "
                        "(Subsystem sftp in its sshd_config)?", retryable=True, unreachable=False)


# Why a session that logged in did not become SFTP, by what the client saw: the causes to look for.
_SHELL_IN_THE_WAY = (
    "something on the target runs in place of {how} or before it: a ForceCommand in sshd_config (Match "
    "blocks included), or a shell startup file (.bashrc, .profile, /etc/bash.bashrc) that prints text or "
    "waits for input in non-interactive sessions; make those do nothing when not interactive (Debian's "
    ".bashrc opens with `case $- in *i*) ;; *) return;; esac` for this)")
_PROGRAM_ENDED = (
    "the program the target runs for {how} ended: check that the `Subsystem sftp` line of its sshd_config "
    "(with become: the push's `sftp_server` option) names an installed sftp-server (or internal-sftp), "
    "that no ForceCommand replaces it, and that the user's shell can run it (exit status 127: not found)")
_SESSION_REFUSED = (
    "the target ran nothing for {how}: is it enabled there (a `Subsystem sftp` line in its sshd_config, "
    "and MaxSessions above 0)?")


def _not_sftp(spec: ConnectionSpec, what: str, causes: str) -> SessionError:
    """Logged in, but the session did not turn into SFTP: what the target runs for it, not the network.
    Not retried (each try would fail the same way, or wait as long again), and the host is reachable:
    a task failure. `sftp` from the controller to the same account fails the same way."""
    return SessionError(f"cannot start SFTP on {spec.describe()}: {what}. The login worked, so "
                        + causes.format(how=_sftp_program(spec)), retryable=False, unreachable=False)


def _ended_session(spec: ConnectionSpec, transport, channel) -> SessionError | None:
    """The error for a session the server ended itself before SFTP started, with the exit status it
    gave and what it wrote on stderr; None when the connection itself went away (worth a retry)."""
    # sshd ends the channel's output when the program closes it and sends the exit status once it has
    # reaped it: the status (and any stderr) may trail the end of output by a moment.
    deadline = time.monotonic() + END_GRACE_SECONDS
    while not channel.closed and transport.is_active() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not transport.is_active() or not channel.exit_status_ready():
        return None
    errors = b""
    while channel.recv_stderr_ready():
        errors += channel.recv_stderr(1 << 12)
    status = channel.recv_exit_status()
    if status == -1:  # closed, no status: nothing ran
        return _not_sftp(spec, "the session was closed before SFTP started", _SESSION_REFUSED)
    said = errors.decode("utf-8", "replace").strip()[:300]  # sshd drops a subsystem's stderr; sudo's comes
    return _not_sftp(spec, f"the session ended before SFTP started (exit status {status}"
                     + (f": {said!r})" if said else ")"), _PROGRAM_ENDED)


def open_sftp_channel(spec: ConnectionSpec, transport: "paramiko.Transport"):
    """The session channel SFTP will run on. Opening one costs the server no process, so a connection
    whose session starts later (see _engine.SessionGate) opens it at login and saves that round trip."""
    try:
        return transport.open_session(timeout=spec.timeout)  # Paramiko's own default waits an hour
    except paramiko.ChannelException as exc:  # the first session of a fresh login: never a passing state
        raise _not_sftp(spec, f"the target refused a session ({exc})", _SESSION_REFUSED) from None
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise _sftp_start_failed(spec, exc) from None


def start_sftp(spec: ConnectionSpec, transport: "paramiko.Transport", channel=None):
    """SFTP on `channel` (opened by open_sftp_channel), or on a channel opened now. The client
    carries the wanted owner and group as multipush_uid and multipush_gid (None: unchanged)."""
    channel = channel if channel is not None else open_sftp_channel(spec, transport)
    # The server's version is the first thing read: without a timeout, a session that never starts
    # SFTP (a ForceCommand, a startup file waiting for input) would hold the push for good.
    channel.settimeout(spec.timeout)
    try:
        if spec.become is not None:
            sftp = _paramiko_compat.sftp_client(become_channel(spec, channel), init_sent=False)
        else:
            sftp = _paramiko_compat.sftp_client(*_sftp_subsystem_channel(transport, channel))
    except SessionError:
        raise
    except socket.timeout:
        raise _not_sftp(spec, f"no SFTP answer within {spec.timeout:g}s", _SHELL_IN_THE_WAY) from None
    except SFTPError as exc:  # Paramiko read something that is not an SFTP packet
        raise _not_sftp(spec, f"the session answered with something that is not SFTP ({exc})",
                        _SHELL_IN_THE_WAY) from None
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise _ended_session(spec, transport, channel) or _sftp_start_failed(spec, exc) from None
    sftp.multipush_uid, sftp.multipush_gid = resolve_ownership(spec, sftp)
    return sftp
