# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What every part of opening a connection shares: Paramiko (or the reason it is missing), the
error type, and the ConnectionSpec that describes one connection.

`resolve_spec` (_sshconfig) builds a ConnectionSpec from the host's settings; `open_session`
(_session) connects with it. Passwords and passphrases never reach a command line, a log or an
error message (their fields stay out of the repr).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

try:
    import paramiko

    PARAMIKO_IMPORT_ERROR = None
    # Paramiko logs a failed handshake (a connection closed at the banner, as MaxStartups and
    # per-client limits do) with its traceback. With no handler of the user's anywhere, Python
    # prints that on stderr, in the middle of the play; the push reports every such failure itself.
    logging.getLogger("paramiko").addHandler(logging.NullHandler())
except ImportError as exc:  # pragma: no cover - exercised only where paramiko is missing
    paramiko = None
    PARAMIKO_IMPORT_ERROR = exc


class SessionError(Exception):
    """Connecting failed. `retryable` says whether trying again could help.

    `unreachable`: the host could not be reached or logged in to (Ansible reports such a host as
    UNREACHABLE). False for failures after the login: become, the SFTP session, owner/group.
    """

    def __init__(self, message: str, retryable: bool, unreachable: bool = True):
        super().__init__(message)
        self.retryable = retryable
        self.unreachable = unreachable


@dataclass
class BecomeSpec:
    """Run the target's sftp-server as another user through sudo (Ansible's become)."""

    user: str = "root"
    password: str | None = field(default=None, repr=False)
    exe: str = "sudo"
    sftp_server: str | None = None  # None: the first of _become.SFTP_SERVER_PATHS that exists on the target


@dataclass
class ConnectionSpec:
    """Everything needed to open a connection. Built by `resolve_spec` from the host's settings.

    `host` is the name or address to connect to (after ssh config's HostName); `alias` is the
    name the user gave (inventory's ansible_host), used in messages.
    """

    host: str
    port: int = 22
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    private_key_file: str | None = None
    key_passphrase: str | None = field(default=None, repr=False)
    known_hosts_files: list[str] = field(default_factory=list)
    host_key_checking: bool = True
    timeout: float = 30.0
    look_for_keys: bool = True
    allow_agent: bool = True
    # Added for parity with OpenSSH; the defaults keep a hand-made spec behaving as before.
    alias: str | None = None
    identity_files: list[str] = field(default_factory=list)  # tried after private_key_file
    private_key: str | None = field(default=None, repr=False)  # key text (ansible_ssh_private_key)
    identities_only: bool = False
    accept_new_host_keys: bool = False  # StrictHostKeyChecking=accept-new
    host_key_alias: str | None = None
    connect_timeout: float | None = None  # TCP connect per address; None: timeout
    keepalive: int = 0  # ServerAliveInterval
    address_family: str = "any"  # any, inet, inet6
    pubkey_auth: bool = True
    password_auth: bool = True
    kbd_interactive_auth: bool = True
    proxy_command: str | None = None  # tokens already expanded
    jump: "ConnectionSpec | None" = None  # the previous hop (ProxyJump), itself fully resolved
    become: BecomeSpec | None = None
    owner: str | None = None  # user name or uid for the pushed files (as copy's owner)
    group: str | None = None  # group name or gid

    @property
    def host_key_name(self) -> str:
        name = self.host_key_alias or self.host
        return name if self.port == 22 else f"[{name}]:{self.port}"

    def describe(self) -> str:
        where = f"{self.host}:{self.port}" if ":" not in self.host else f"[{self.host}]:{self.port}"
        text = f"{self.user}@{where}" if self.user else where
        if self.jump is not None:
            text += f" via {self.jump.describe()}"
        elif self.proxy_command:
            text += " via ProxyCommand"
        return text


def require_paramiko() -> None:
    if paramiko is None:
        raise SessionError(
            f"multipush.sftp.push needs the Python library paramiko on the controller ({PARAMIKO_IMPORT_ERROR}); "
            "install it into Ansible's Python with: pip install 'paramiko>=4,<6'",
            retryable=False,
        )
