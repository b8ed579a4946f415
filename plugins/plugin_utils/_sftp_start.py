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

from ansible_collections.multipush.sftp.plugins.plugin_utils import _paramiko_compat
from ansible_collections.multipush.sftp.plugins.plugin_utils._become import become_channel
from ansible_collections.multipush.sftp.plugins.plugin_utils._ownership import resolve_ownership
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import ConnectionSpec, SessionError, paramiko

if paramiko is not None:
    from paramiko.sftp import CMD_INIT, SFTPError

SFTP_VERSION = 3  # what Paramiko's client speaks


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


def _sftp_start_failed(spec: ConnectionSpec, exc: BaseException) -> SessionError:
    how = "sftp-server through sudo" if spec.become is not None else "the sftp subsystem"
    return SessionError(f"cannot start SFTP on {spec.describe()}: {exc}; is {how} available on the target "
                        "(Subsystem sftp in its sshd_config)?", retryable=True, unreachable=False)


def _not_sftp(spec: ConnectionSpec, what: str) -> SessionError:
    """Logged in, but the session did not turn into SFTP: what the target runs for it, not the network.
    Not retried (each try would wait as long again), and the host is reachable: a task failure."""
    how = "sftp-server through sudo" if spec.become is not None else "the sftp subsystem"
    return SessionError(
        f"cannot start SFTP on {spec.describe()}: {what}. The login worked, so something on the target runs "
        f"in place of {how} or before it: a ForceCommand in sshd_config (Match blocks included), or a shell "
        "startup file (.bashrc, .profile, /etc/bash.bashrc) that prints text or waits for input in "
        "non-interactive sessions. `sftp` from this machine to the same account fails the same way; make "
        "those startup files do nothing when not interactive (Debian's .bashrc opens with "
        "`case $- in *i*) ;; *) return;; esac` for this)",
        retryable=False, unreachable=False)


def open_sftp_channel(spec: ConnectionSpec, transport: "paramiko.Transport"):
    """The session channel SFTP will run on. Opening one costs the server no process, so a connection
    whose session starts later (see _engine.SessionGate) opens it at login and saves that round trip."""
    try:
        return transport.open_session()
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
        raise _not_sftp(spec, f"no SFTP answer within {spec.timeout:g}s") from None
    except SFTPError as exc:  # Paramiko read something that is not an SFTP packet
        raise _not_sftp(spec, f"the session answered with something that is not SFTP ({exc})") from None
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise _sftp_start_failed(spec, exc) from None
    sftp.multipush_uid, sftp.multipush_gid = resolve_ownership(spec, sftp)
    return sftp
