# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Become: the target's sftp-server run as another user through `sudo -u USER <sftp-server>` on an
exec channel, in place of the sftp subsystem (_sftp_start starts SFTP on the channel this gives).

The become password never reaches a command line, a log or an error message: sudo reads it
from the channel.
"""

from __future__ import annotations

import secrets
import shlex
import time

from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import (
    BecomeSpec, ConnectionSpec, SessionError, paramiko,
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


def become_channel(spec: ConnectionSpec, channel):
    """The session channel made an exec channel running sftp-server as the become user, ready for
    SFTP's init."""
    marker, prompt = _become_channel(spec, channel)
    try:
        _await_sftp_server(spec, channel, marker, prompt)
        return channel
    except SessionError:
        channel.close()
        raise
    except (paramiko.SSHException, EOFError, OSError) as exc:
        channel.close()
        raise SessionError(f"become: connection lost while starting sudo on {spec.alias or spec.host}: {exc}",
                           retryable=True, unreachable=False) from None


def _become_channel(spec: ConnectionSpec, channel) -> tuple[str, str | None]:
    """Run sudo with sftp-server on the channel: (the marker the shell announces itself with, the
    password prompt sudo will show, None without a password)."""
    become = spec.become
    token = secrets.token_hex(8)
    marker = f"MULTIPUSH-SFTP-{token}"
    prompt = f"[multipush sudo {token}] password:" if become.password is not None else None
    try:
        channel.settimeout(spec.timeout)
        channel.exec_command(become_command(become, marker, prompt))
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise SessionError(f"become: the target on {spec.alias or spec.host} refused to run sudo for {spec.user} "
                           f"({exc}); become needs an account that may run commands (not an SFTP-only one)",
                           retryable=False, unreachable=False) from None
    return marker, prompt


def _await_sftp_server(spec: ConnectionSpec, channel, marker: str, prompt: str | None) -> None:
    """Wait until the shell announced sftp-server, answering sudo's password prompt once."""
    where = f"on {spec.alias or spec.host}"
    out, err, answered = b"", b"", 0
    deadline = time.monotonic() + spec.timeout
    while True:
        progressed = False
        if channel.recv_ready():
            out += channel.recv(4096)
            progressed = True
            if (marker + "\n").encode() in out:
                return
        if channel.recv_stderr_ready():
            err += channel.recv_stderr(4096)
            progressed = True
            if prompt and err.count(prompt.encode()) > answered:
                _answer_prompt(spec, channel, where, answered)
                answered += 1
        if progressed:
            continue
        if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
            raise _become_failure(spec, where, channel.recv_exit_status(), err, prompt)
        if time.monotonic() > deadline:
            raise SessionError(f"become: sudo {where} did not start sftp-server as {spec.become.user} within "
                               f"{spec.timeout:g}s (output: {_clean(err, prompt) or 'none'}); an account "
                               "limited to SFTP (ForceCommand internal-sftp) cannot use become",
                               retryable=False, unreachable=False)
        time.sleep(BECOME_POLL_SECONDS)


def _answer_prompt(spec: ConnectionSpec, channel, where: str, answered: int) -> None:
    """Send the become password; a second prompt means sudo refused it."""
    if answered:
        raise SessionError(f"become: sudo {where} refused the become password for {spec.become.user}; check "
                           "ansible_become_password", retryable=False, unreachable=False)
    channel.sendall(spec.become.password.encode() + b"\n")


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
