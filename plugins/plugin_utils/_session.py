# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Opening one authenticated SSH connection with an SFTP session, the way `ssh` would.

Host keys are checked against known_hosts unless the user turned checking off; the cipher
preference puts AES-GCM first because it costs measurably less CPU per byte in Paramiko.
"""

from __future__ import annotations

import os
import shlex
import socket
from dataclasses import dataclass, field

try:
    import paramiko
    from paramiko.sftp_client import SFTPClient

    PARAMIKO_IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised only where paramiko is missing
    paramiko = None
    PARAMIKO_IMPORT_ERROR = exc

PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")


class SessionError(Exception):
    """Connecting failed. `retryable` says whether trying again could help."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class ConnectionSpec:
    """Everything needed to open a connection. Built by the action from the host's variables."""

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

    @property
    def host_key_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def describe(self) -> str:
        return f"{self.user}@{self.host}:{self.port}" if self.user else f"{self.host}:{self.port}"


def require_paramiko() -> None:
    if paramiko is None:
        raise SessionError(
            f"multipush.sftp.push needs the Python library paramiko on the controller ({PARAMIKO_IMPORT_ERROR}); "
            "install it into Ansible's Python with: pip install 'paramiko>=4,<6'",
            retryable=False,
        )


def parse_ssh_args(args: str | None) -> dict[str, str]:
    """The -o options (and -i/-p) out of ansible_ssh_common_args / ansible_ssh_extra_args.

    Keys come back lower-cased as ssh treats them case-insensitively.
    """
    options: dict[str, str] = {}
    if not args:
        return options
    words = shlex.split(args)
    index = 0
    while index < len(words):
        word = words[index]
        value = None
        if word in ("-o", "-i", "-p") and index + 1 < len(words):
            value = words[index + 1]
            index += 1
        elif word.startswith(("-o", "-i", "-p")) and len(word) > 2:
            value = word[2:]
        if value is not None:
            flag = word[:2]
            if flag == "-o":
                key, _sep, rest = value.partition("=")
                if not rest and " " in key:
                    key, _sep, rest = key.partition(" ")
                options.setdefault(key.strip().lower(), rest.strip())
            elif flag == "-i":
                options.setdefault("identityfile", value)
            else:
                options.setdefault("port", value)
        index += 1
    return options


def known_hosts_candidates(extra_files: list[str]) -> list[str]:
    files = [os.path.expanduser(path) for path in extra_files]
    files.append(os.path.expanduser("~/.ssh/known_hosts"))
    return files


def load_known_hosts(files: list[str]) -> "paramiko.HostKeys":
    keys = paramiko.HostKeys()
    for path in files:
        if os.path.isfile(path):
            try:
                keys.load(path)
            except (OSError, paramiko.SSHException) as exc:
                raise SessionError(f"cannot read known_hosts file {path}: {exc}", retryable=False) from None
    return keys


def _security_preferences(transport: "paramiko.Transport", known_types: list[str]) -> None:
    options = transport.get_security_options()
    available = list(options.ciphers)
    options.ciphers = tuple([c for c in PREFERRED_CIPHERS if c in available] +
                            [c for c in available if c not in PREFERRED_CIPHERS])
    if known_types:
        # Ask for the host key type we can check, as ssh does; otherwise the server may present
        # a key type missing from known_hosts and a known host would look unknown.
        current = list(options.key_types)
        preferred = [t for t in current if t in known_types or _base_key_type(t) in known_types]
        options.key_types = tuple(preferred + [t for t in current if t not in preferred])


def _base_key_type(key_type: str) -> str:
    return {"rsa-sha2-256": "ssh-rsa", "rsa-sha2-512": "ssh-rsa"}.get(key_type, key_type)


def _check_host_key(spec: ConnectionSpec, known: "paramiko.HostKeys", transport: "paramiko.Transport") -> None:
    presented = transport.get_remote_server_key()
    if not spec.host_key_checking:
        return
    entry = known.lookup(spec.host_key_name)
    fingerprint = presented.fingerprint if hasattr(presented, "fingerprint") else presented.get_base64()
    files = ", ".join(spec.known_hosts_files) or "~/.ssh/known_hosts"
    if not entry:
        keyscan = f"ssh-keyscan {'-p ' + str(spec.port) + ' ' if spec.port != 22 else ''}{spec.host}"
        raise SessionError(
            f"host key for {spec.host_key_name} is not known ({presented.get_name()} {fingerprint}); nothing was "
            f"written. Verify the fingerprint, then add it to known_hosts ({files}), e.g. "
            f"`{keyscan} >> ~/.ssh/known_hosts`, or connect once with ssh; or turn host key checking off "
            "(ANSIBLE_HOST_KEY_CHECKING=False) on a trusted network.",
            retryable=False,
        )
    expected = entry.get(presented.get_name())
    if expected is None or expected.asbytes() != presented.asbytes():
        raise SessionError(
            f"HOST KEY MISMATCH for {spec.host_key_name}: the target presented {presented.get_name()} "
            f"{fingerprint}, which differs from known_hosts ({files}); nothing was written. Someone may be "
            f"intercepting the connection, or the host was reinstalled: check, then remove the old entry with "
            f"`ssh-keygen -R '{spec.host_key_name}'` and add the new key.",
            retryable=False,
        )


def _candidate_keys(spec: ConnectionSpec) -> list[tuple[str, "paramiko.PKey"]]:
    keys: list[tuple[str, paramiko.PKey]] = []
    if spec.private_key_file:
        path = os.path.expanduser(spec.private_key_file)
        try:
            keys.append((path, paramiko.PKey.from_path(path, password=spec.key_passphrase)))
        except paramiko.PasswordRequiredException:
            raise SessionError(
                f"private key {path} is encrypted and no passphrase was given; load it into ssh-agent or set "
                "ansible_private_key_passphrase",
                retryable=False,
            ) from None
        except (OSError, paramiko.SSHException, ValueError) as exc:
            raise SessionError(f"cannot load private key {path}: {exc}", retryable=False) from None
        return keys
    if spec.allow_agent:
        try:
            keys.extend(("ssh-agent", key) for key in paramiko.Agent().get_keys())
        except paramiko.SSHException:
            pass
    if spec.look_for_keys:
        for name in DEFAULT_IDENTITIES:
            path = os.path.expanduser(f"~/.ssh/{name}")
            if os.path.isfile(path):
                try:
                    keys.append((path, paramiko.PKey.from_path(path, password=spec.key_passphrase)))
                except (paramiko.SSHException, OSError, ValueError):
                    continue
    return keys


def _authenticate(spec: ConnectionSpec, transport: "paramiko.Transport") -> None:
    user = spec.user or os.environ.get("USER") or "root"
    tried = []
    for label, key in _candidate_keys(spec):
        try:
            transport.auth_publickey(user, key)
            if transport.is_authenticated():
                return
        except paramiko.AuthenticationException:
            tried.append(f"key {label}")
        except paramiko.SSHException as exc:
            raise SessionError(f"SSH error while authenticating to {spec.describe()}: {exc}", retryable=True) from None
    if spec.password is not None:
        try:
            transport.auth_password(user, spec.password)
            if transport.is_authenticated():
                return
        except paramiko.BadAuthenticationType:
            tried.append("password (not accepted by the server)")
        except paramiko.AuthenticationException:
            tried.append("password")
    raise SessionError(
        f"authentication to {spec.describe()} failed (tried: {', '.join(tried) or 'no keys found, no password'}); "
        "check ansible_user, ansible_ssh_private_key_file or ansible_password",
        retryable=False,
    )


def open_session(spec: ConnectionSpec) -> tuple["paramiko.Transport", "SFTPClient"]:
    """Connect, verify the host key, authenticate and start the SFTP subsystem."""
    require_paramiko()
    known = load_known_hosts(spec.known_hosts_files) if spec.host_key_checking else paramiko.HostKeys()
    known_types = list((known.lookup(spec.host_key_name) or {}).keys())
    try:
        sock = socket.create_connection((spec.host, spec.port), timeout=spec.timeout)
    except socket.gaierror as exc:
        raise SessionError(f"cannot resolve host {spec.host!r}: {exc.strerror}; check ansible_host", False) from None
    except OSError as exc:
        raise SessionError(f"cannot connect to {spec.host}:{spec.port}: {exc.strerror or exc}", True) from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = paramiko.Transport(sock)
    try:
        _security_preferences(transport, known_types)
        try:
            transport.start_client(timeout=spec.timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            # sshd drops handshakes beyond MaxStartups; that is worth another try after a pause.
            raise SessionError(f"SSH handshake with {spec.host}:{spec.port} failed: {exc}", retryable=True) from None
        _check_host_key(spec, known, transport)
        _authenticate(spec, transport)
        try:
            sftp = SFTPClient.from_transport(transport)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise SessionError(f"cannot start SFTP on {spec.describe()}: {exc}; is the sftp subsystem enabled "
                               "in the target's sshd_config?", retryable=True) from None
        sftp.get_channel().settimeout(spec.timeout)
        return transport, sftp
    except BaseException:
        transport.close()
        raise
