# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Starting SFTP on an authenticated transport: as the sftp subsystem or, with become, as
`sudo -u USER <sftp-server>` on an exec channel; and the owner and group wanted for the pushed
files, looked up on the target and added by the SFTP client to every setstat.

The become password never reaches a command line, a log or an error message: sudo reads it
from the channel.
"""

from __future__ import annotations

import copy
import secrets
import shlex
import struct
import time

from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import (
    BecomeSpec, ConnectionSpec, SessionError, paramiko, paramiko_has,
)

# Where distributions put OpenSSH's sftp-server (become runs it through sudo).
SFTP_SERVER_PATHS = (
    "/usr/lib/openssh/sftp-server",  # Debian, Ubuntu
    "/usr/libexec/openssh/sftp-server",  # Fedora, RHEL, CentOS
    "/usr/lib/ssh/sftp-server",  # Arch, openSUSE
    "/usr/libexec/ssh/sftp-server",
    "/usr/lib/misc/sftp-server",  # Gentoo
    "/usr/libexec/sftp-server",  # macOS, FreeBSD
    "/usr/local/libexec/sftp-server",
    "/usr/local/lib/openssh/sftp-server",
)
BECOME_POLL_SECONDS = 0.01
UNCHANGED_ID = 0xFFFFFFFF  # chown(2)'s "leave as is" (-1) as the 32-bit SFTP field


# ---------------------------------------------------------------------------------------------
# SFTP: the subsystem, or sftp-server through sudo (become)
# ---------------------------------------------------------------------------------------------


def become_command(become: BecomeSpec, marker: str, prompt: str | None) -> str:
    """The command of the exec channel: sudo, then a shell that announces itself and becomes
    sftp-server. The password is never part of it: sudo reads it from the channel (-S)."""
    if become.sftp_server:
        path = shlex.quote(become.sftp_server)
        script = (f"if [ -x {path} ]; then echo {marker}; exec {path}; fi; "
                  f"echo {shlex.quote('multipush: no sftp-server at ' + become.sftp_server)} >&2; exit 127")
    else:
        paths = " ".join(shlex.quote(path) for path in SFTP_SERVER_PATHS)
        script = (f'for p in {paths}; do if [ -x "$p" ]; then echo {marker}; exec "$p"; fi; done; '
                  f'echo "multipush: no sftp-server in {" ".join(SFTP_SERVER_PATHS)}" >&2; exit 127')
    flags = ["-S", "-p", shlex.quote(prompt)] if prompt else ["-n"]
    return " ".join([become.exe or "sudo", *flags, "-u", shlex.quote(become.user), "/bin/sh", "-c",
                     shlex.quote(script)])


def _become_channel(spec: ConnectionSpec, channel):
    """The session channel made an exec channel running sftp-server as the become user, ready for
    SFTP's init."""
    become = spec.become
    token = secrets.token_hex(8)
    marker = f"MULTIPUSH-SFTP-{token}"
    prompt = f"[multipush sudo {token}] password:" if become.password is not None else None
    where = f"on {spec.alias or spec.host}"
    try:
        channel.settimeout(spec.timeout)
        channel.exec_command(become_command(become, marker, prompt))
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise SessionError(f"become: the target {where} refused to run sudo for {spec.user} ({exc}); become needs "
                           "an account that may run commands (not an SFTP-only one)",
                           retryable=False, unreachable=False) from None
    out, err, answered = b"", b"", 0
    deadline = time.monotonic() + spec.timeout
    try:
        while True:
            progressed = False
            if channel.recv_ready():
                out += channel.recv(4096)
                progressed = True
                if (marker + "\n").encode() in out:
                    return channel
            if channel.recv_stderr_ready():
                err += channel.recv_stderr(4096)
                progressed = True
                if prompt and err.count(prompt.encode()) > answered:
                    if answered:
                        raise SessionError(f"become: sudo {where} refused the become password for "
                                           f"{become.user}; check ansible_become_password",
                                           retryable=False, unreachable=False)
                    channel.sendall(become.password.encode() + b"\n")
                    answered += 1
            if not progressed:
                if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
                    raise _become_failure(spec, where, channel.recv_exit_status(), err, prompt)
                if time.monotonic() > deadline:
                    raise SessionError(f"become: sudo {where} did not start sftp-server as {become.user} within "
                                       f"{spec.timeout:g}s (output: {_clean(err, prompt) or 'none'}); an account "
                                       "limited to SFTP (ForceCommand internal-sftp) cannot use become",
                                       retryable=False, unreachable=False)
                time.sleep(BECOME_POLL_SECONDS)
    except SessionError:
        channel.close()
        raise
    except (paramiko.SSHException, EOFError, OSError) as exc:
        channel.close()
        raise SessionError(f"become: connection lost while starting sudo {where}: {exc}",
                           retryable=True, unreachable=False) from None


def _clean(err: bytes, prompt: str | None) -> str:
    text = err.decode("utf-8", "replace")
    if prompt:
        text = text.replace(prompt, "")
    return " ".join(line.strip() for line in text.splitlines() if line.strip())[-600:]


def _become_failure(spec: ConnectionSpec, where: str, status: int, err: bytes, prompt: str | None) -> SessionError:
    become = spec.become
    text = _clean(err, prompt)
    low = text.lower()
    if "a password is required" in low or "a terminal is required" in low:
        message = (f"become: sudo {where} needs a password to run sftp-server as {become.user}; set "
                   "ansible_become_password (or allow the command without a password in sudoers)")
    elif "incorrect password" in low or "try again" in low:
        message = f"become: sudo {where} refused the become password for {become.user}; check ansible_become_password"
    elif "must have a tty" in low or "requiretty" in low:
        message = (f"become: sudo {where} requires a tty (Defaults requiretty); file transfers cannot run through "
                   f"it. Remove requiretty for {spec.user} in sudoers")
    elif "multipush: no sftp-server" in low:
        looked = become.sftp_server or ", ".join(SFTP_SERVER_PATHS)
        message = (f"become: no sftp-server program found {where} (looked for {looked}); give its path on the "
                   "target with the push option sftp_server")
    elif status == 127 and ("not found" in low or not text):
        message = (f"become: {become.exe or 'sudo'} is not installed {where} or the sftp-server path is wrong "
                   f"({text or 'exit status 127'}); install sudo there or drop become")
    elif not text:
        message = (f"become: could not start sftp-server as {become.user} through sudo {where} (exit status "
                   f"{status}, no message): the command never ran; an account limited to SFTP (ForceCommand "
                   "internal-sftp) cannot use become")
    else:
        message = (f"become: could not start sftp-server as {become.user} through sudo {where} "
                   f"(exit status {status}): {text}")
    return SessionError(message, retryable=False, unreachable=False)


PIPELINE_SUBSYSTEM = (paramiko_has("Channel", "_event_pending", "_wait_for_event")
                      and paramiko_has("Transport", "_send_user_message"))
SFTP_VERSION = 3  # what Paramiko's client speaks


def _sftp_subsystem_channel(transport: "paramiko.Transport", channel):
    """The session channel made to run the sftp subsystem, its SFTP init already sent.

    Channel.invoke_subsystem waits for the server's answer before SFTP's init may go: two round
    trips before the server's version comes back. The init is sent right behind the request here
    (as OpenSSH's client does: the server runs a channel's messages in order, so it reaches the
    subsystem once that started) and the answer to the request is waited for after: one round
    trip. A refused subsystem still raises, as in invoke_subsystem.
    """
    if not PIPELINE_SUBSYSTEM:
        channel.invoke_subsystem("sftp")
        return channel
    request = paramiko.Message()
    request.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
    request.add_int(channel.remote_chanid)
    request.add_string("subsystem")
    request.add_boolean(True)
    request.add_string("sftp")
    channel._event_pending()
    transport._send_user_message(request)
    channel.sendall(struct.pack(">IBI", 5, CMD_INIT, SFTP_VERSION))  # length, SSH_FXP_INIT, version
    channel._wait_for_event()
    channel.multipush_init_sent = True
    return channel


def _sftp_start_failed(spec: ConnectionSpec, exc: BaseException) -> SessionError:
    how = "sftp-server through sudo" if spec.become is not None else "the sftp subsystem"
    return SessionError(f"cannot start SFTP on {spec.describe()}: {exc}; is {how} available on the target "
                        "(Subsystem sftp in its sshd_config)?", retryable=True, unreachable=False)


def open_sftp_channel(spec: ConnectionSpec, transport: "paramiko.Transport"):
    """The session channel SFTP will run on. Opening one costs the server no process, so a connection
    whose session starts later (see _engine.SessionGate) opens it at login and saves that round trip."""
    try:
        return transport.open_session()
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise _sftp_start_failed(spec, exc) from None


def _start_sftp(spec: ConnectionSpec, transport: "paramiko.Transport", channel=None):
    """SFTP on `channel` (opened by open_sftp_channel), or on a channel opened now."""
    channel = channel if channel is not None else open_sftp_channel(spec, transport)
    try:
        if spec.become is not None:
            sftp = _SFTPClient(_become_channel(spec, channel))
        else:
            sftp = _SFTPClient(_sftp_subsystem_channel(transport, channel))
    except SessionError:
        raise
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise _sftp_start_failed(spec, exc) from None
    sftp.multipush_uid, sftp.multipush_gid = resolve_ownership(spec, sftp)
    return sftp


# ---------------------------------------------------------------------------------------------
# owner / group
# ---------------------------------------------------------------------------------------------


def _remote_table(sftp, path: str) -> list[list[str]] | None:
    """/etc/passwd or /etc/group of the target, read over SFTP (no remote command), or None."""
    try:
        with sftp.open(path, "r") as handle:
            text = handle.read(4 * 1024 * 1024).decode("utf-8", "replace")
    except (OSError, paramiko.SSHException):
        return None
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#") and ":" in line]


def _id_of(value: str, table: list[list[str]] | None, what: str, path: str, where: str) -> int:
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    if table is None:
        raise SessionError(f"{what}={text!r}: cannot read {path} on {where} over SFTP to find its number (chrooted "
                           f"SFTP?); give the number instead", retryable=False, unreachable=False)
    for fields in table:
        if fields[0] == text and len(fields) > 2 and fields[2].isdigit():
            return int(fields[2])
    raise SessionError(f"{what}={text!r} does not exist on {where} (not in its {path}; directory users such as LDAP "
                       "are not looked up: give the number instead)", retryable=False, unreachable=False)


def resolve_ownership(spec: ConnectionSpec, sftp) -> tuple[int | None, int | None]:
    """The uid and gid wanted for the pushed files, looked up in the target's /etc/passwd and
    /etc/group, after checking that whoever writes the files (the become user, else the login
    user) may give them that owner and group: only root can give files away."""
    if spec.owner is None and spec.group is None:
        return None, None
    where = spec.alias or spec.host
    passwd = _remote_table(sftp, "/etc/passwd")
    groups = _remote_table(sftp, "/etc/group") if spec.group is not None else None
    uid = _id_of(spec.owner, passwd, "owner", "/etc/passwd", where) if spec.owner is not None else None
    gid = _id_of(spec.group, groups, "group", "/etc/group", where) if spec.group is not None else None
    writer = spec.become.user if spec.become is not None else spec.user
    entry = next((fields for fields in passwd or [] if fields[0] == writer and len(fields) > 3), None)
    if entry is None or not entry[2].isdigit() or int(entry[2]) == 0:
        return uid, gid  # root (or unknown: the target's answer to chown will tell)
    how = "use become: true (root) or leave it out"
    if uid is not None and uid != int(entry[2]):
        raise SessionError(f"owner={spec.owner}: the files are written by {writer} (uid {entry[2]}) on {where}, and "
                           f"only root can give files to another user; {how}", retryable=False, unreachable=False)
    if gid is not None and str(gid) != entry[3]:
        members = next((fields[3].split(",") for fields in groups or []
                        if len(fields) > 3 and fields[2] == str(gid)), [])
        if writer not in members:
            raise SessionError(f"group={spec.group}: {writer}, who writes the files on {where}, is not a member of "
                               f"that group; {how}, or add {writer} to the group", retryable=False, unreachable=False)
    return uid, gid


if paramiko is not None:
    from paramiko.sftp import CMD_FSETSTAT, CMD_INIT, CMD_SETSTAT, CMD_VERSION, SFTPError
    from paramiko.sftp_attr import SFTPAttributes
    from paramiko.sftp_client import SFTPClient

    class _SFTPClient(SFTPClient):
        """SFTPClient that adds the wanted owner and group to every setstat/fsetstat that sets a
        mode or a modification time, i.e. whenever the push finalizes a file or a directory."""

        multipush_uid = None
        multipush_gid = None

        def _send_version(self):
            if not getattr(self.sock, "multipush_init_sent", False):
                return super()._send_version()
            # the init went out with the subsystem request: only the server's version is to come
            kind, data = self._read_packet()
            if kind != CMD_VERSION:
                raise SFTPError("Incompatible sftp protocol")
            return struct.unpack(">I", data[:4])[0]

        def _async_request(self, fileobj, t, *args):
            if (self.multipush_uid is not None or self.multipush_gid is not None) and t in (CMD_SETSTAT, CMD_FSETSTAT):
                args = tuple(self._with_owner(item) for item in args)
            return super()._async_request(fileobj, t, *args)

        def _with_owner(self, item):
            if not isinstance(item, SFTPAttributes) or item.st_uid is not None:
                return item
            if item.st_mode is None and item.st_mtime is None:
                return item  # a size-only request (allocation): ownership comes with the metadata
            item = copy.copy(item)
            item.st_uid = UNCHANGED_ID if self.multipush_uid is None else self.multipush_uid
            item.st_gid = UNCHANGED_ID if self.multipush_gid is None else self.multipush_gid
            return item

else:  # pragma: no cover
    _SFTPClient = None
