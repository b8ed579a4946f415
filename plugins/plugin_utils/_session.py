# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Opening one authenticated SSH connection with an SFTP session, the way `ssh` would.

`resolve_spec` turns what Ansible's ssh connection plugin would put on the ssh command line
(host, port, user, key, `-o`/`-F`/`-J`... from ssh_args, ssh_common_args and ssh_extra_args)
plus the OpenSSH client configuration (read with paramiko.SSHConfig) into one ConnectionSpec,
with OpenSSH's precedence: the command line first, then the first value found in the files.
`open_session` connects with it: directly (every address of the name in turn), through
ProxyCommand (a socketpair to a shell command) or ProxyJump (direct-tcpip channels of hop
connections), checks the host key against known_hosts, authenticates (ssh-agent keys,
identity files with passphrases, password, keyboard-interactive) and starts SFTP, either as
the subsystem or, with become, as `sudo -u USER <sftp-server>` on an exec channel.

The cipher preference puts AES-GCM first because it costs measurably less CPU per byte in
Paramiko. Passwords and passphrases never reach a command line, a log or an error message.
"""

from __future__ import annotations

import base64
import copy
import io
import glob
import os
import pwd
import secrets
import shlex
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

try:
    import paramiko
    from paramiko.sftp import CMD_FSETSTAT, CMD_SETSTAT
    from paramiko.sftp_attr import SFTPAttributes
    from paramiko.sftp_client import SFTPClient

    PARAMIKO_IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised only where paramiko is missing
    paramiko = None
    PARAMIKO_IMPORT_ERROR = exc

PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")
DEFAULT_USER_CONFIG = "~/.ssh/config"
DEFAULT_SYSTEM_CONFIG = "/etc/ssh/ssh_config"
DEFAULT_USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
DEFAULT_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
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
MAX_HOPS = 8
MAX_INCLUDE_DEPTH = 16
BECOME_POLL_SECONDS = 0.01
UNCHANGED_ID = 0xFFFFFFFF  # chown(2)'s "leave as is" (-1) as the 32-bit SFTP field
KBD_INTERACTIVE_MAX_PASSWORD_PROMPTS = 3


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
    sftp_server: str | None = None  # None: the first of SFTP_SERVER_PATHS that exists on the target


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


# ---------------------------------------------------------------------------------------------
# ssh command-line options and ssh_config
# ---------------------------------------------------------------------------------------------

# ssh flags that take a value, and the ssh_config keyword each one stands for.
_VALUE_FLAGS = {"-o": None, "-i": "identityfile", "-p": "port", "-l": "user", "-F": "configfile", "-J": "proxyjump"}
_KEY_ALIASES = {"challengeresponseauthentication": "kbdinteractiveauthentication"}


def parse_ssh_arguments(args: str | None) -> dict[str, list[str]]:
    """Every option in an ssh argument string, in order: keyword (lower case) -> values.

    Understands `-o Key=Value`, `-o "Key Value"`, `-oKey=Value`, `-i`, `-p`, `-l`, `-F`, `-J`,
    `-4` and `-6`. Other flags (`-C`, `-q`, `-v`...) do not change where or how we connect.
    """
    options: dict[str, list[str]] = {}
    if not args:
        return options
    try:
        words = shlex.split(args)
    except ValueError as exc:
        raise SessionError(f"cannot parse the ssh arguments {args!r}: {exc}", retryable=False) from None
    index = 0
    while index < len(words):
        word = words[index]
        flag, value = word[:2], None
        if flag in _VALUE_FLAGS and len(word) > 2:
            value = word[2:]
        elif word in _VALUE_FLAGS and index + 1 < len(words):
            value = words[index + 1]
            index += 1
        elif word in ("-4", "-6"):
            options.setdefault("addressfamily", []).append("inet" if word == "-4" else "inet6")
        if value is not None:
            if flag == "-o":
                key, _sep, rest = value.partition("=")
                if not _sep and " " in key.strip():
                    key, _sep, rest = key.strip().partition(" ")
                key = key.strip().lower()
                key = _KEY_ALIASES.get(key, key)
                options.setdefault(key, []).append(rest.strip().strip('"'))
            else:
                options.setdefault(_VALUE_FLAGS[flag], []).append(value)
        index += 1
    return options


def parse_ssh_args(args: str | None) -> dict[str, str]:
    """The first value of each option in an ssh argument string (ssh: the first one wins)."""
    return {key: values[0] for key, values in parse_ssh_arguments(args).items()}


def merge_ssh_arguments(*arg_strings: str | None) -> dict[str, list[str]]:
    """Options of several argument strings in command-line order (ssh_args, common, extra)."""
    merged: dict[str, list[str]] = {}
    for args in arg_strings:
        for key, values in parse_ssh_arguments(args).items():
            merged.setdefault(key, []).extend(values)
    return merged


def expand_path(path: str) -> str:
    """`~` is $HOME, as for every Python tool and for the shell that runs our printed remedies.

    (OpenSSH itself takes the home directory from the passwd entry; the two are the same
    unless HOME was changed.)"""
    return os.path.expanduser(path)


def _read_config_text(path: str, depth: int = 0) -> str:
    """A config file with its `Include` lines replaced by the included files (OpenSSH's globbing;
    relative paths are under ~/.ssh for the user's file and /etc/ssh for the system's).

    paramiko.SSHConfig does not follow Include. Inlined this way, an Include inside a Host or
    Match block applies to the hosts of the blocks that the included file opens, and lines after
    it in the enclosing block no longer belong to that block: keep Include at the top level.
    """
    if depth > MAX_INCLUDE_DEPTH:
        raise SessionError(f"ssh config {path}: Include nested deeper than {MAX_INCLUDE_DEPTH}", retryable=False)
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = handle.read().splitlines()
    base = expand_path("~/.ssh") if not path.startswith("/etc/") else "/etc/ssh"
    out = []
    for line in lines:
        words = line.strip().replace("=", " ", 1).split()
        if words and words[0].lower() == "include":
            for pattern in words[1:]:
                pattern = expand_path(pattern)
                if not os.path.isabs(pattern):
                    pattern = os.path.join(base, pattern)
                for included in sorted(glob.glob(pattern)):
                    if os.path.isfile(included):
                        out.append(_read_config_text(included, depth + 1))
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def load_ssh_config(config_file: str | None = None) -> "paramiko.SSHConfig":
    """`-F file` alone (as ssh does), else ~/.ssh/config then /etc/ssh/ssh_config."""
    require_paramiko()
    if config_file is not None:
        if config_file.lower() == "none":
            return _RawConfig()
        paths, required = [expand_path(config_file)], True
    else:
        paths, required = [expand_path(DEFAULT_USER_CONFIG), DEFAULT_SYSTEM_CONFIG], False
    config = _RawConfig()
    for path in paths:
        if not os.path.isfile(path):
            if required:
                raise SessionError(f"ssh config file {path} (given with -F) does not exist", retryable=False)
            continue
        try:
            config.parse(_read_config_text(path).splitlines())
        except (OSError, paramiko.ssh_exception.ConfigParseError) as exc:
            raise SessionError(f"cannot read ssh config file {path}: {exc}", retryable=False) from None
    return config


if paramiko is not None:

    class _RawConfig(paramiko.SSHConfig):
        """SSHConfig that leaves %-tokens in ProxyCommand and ProxyJump alone: they must be
        expanded with the effective port and user (the command line wins over the file)."""

        TOKENS_BY_CONFIG_KEY = dict(paramiko.SSHConfig.TOKENS_BY_CONFIG_KEY, proxycommand=[], proxyjump=[])

else:  # pragma: no cover
    _RawConfig = None


def _lookup(config, name: str) -> dict:
    try:
        return dict(config.lookup(name))
    except Exception as exc:  # Match exec without invoke, bad canonicalization...: say where
        raise SessionError(f"ssh config lookup of {name!r} failed: {type(exc).__name__}: {exc}",
                           retryable=False) from None


def _yes(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    return value.strip().lower() in ("yes", "true", "on", "1")


def _number(value, name: str, kind=float):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise SessionError(f"ssh option {name}={value!r} is not a number", retryable=False) from None


def expand_tokens(text: str, host: str, port: int, user: str, alias: str) -> str:
    """OpenSSH's %h %p %r %n %% in ProxyCommand and ProxyJump; ~ at the start of ProxyCommand."""
    out, index = [], 0
    values = {"h": host, "p": str(port), "r": user, "n": alias, "%": "%"}
    while index < len(text):
        char = text[index]
        if char == "%" and index + 1 < len(text) and text[index + 1] in values:
            out.append(values[text[index + 1]])
            index += 2
            continue
        out.append(char)
        index += 1
    result = "".join(out)
    return expand_path(result) if result.startswith("~/") else result


def parse_jump(hop: str) -> tuple[str, int | None, str | None]:
    """`[user@]host[:port]`, `[user@][v6addr]:port` or `ssh://[user@]host[:port]`."""
    text = hop.strip()
    if text.startswith("ssh://"):
        text = text[len("ssh://"):].rstrip("/")
    user = None
    if "@" in text:
        user, _sep, text = text.rpartition("@")
    port = None
    if text.startswith("["):
        host, _sep, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
    elif text.count(":") == 1:
        host, _sep, port = text.partition(":")
    else:
        host = text
    if not host:
        raise SessionError(f"ProxyJump hop {hop!r} names no host", retryable=False)
    return host, (_number(port, "ProxyJump port", int) if port else None), user


def resolve_spec(destination: str, *, ssh_args: tuple = (), port: int | None = None, user: str | None = None,
                 password: str | None = None, private_key_file: str | None = None, private_key: str | None = None,
                 key_passphrase: str | None = None, host_key_checking: bool = True, timeout: float = 30.0,
                 become: BecomeSpec | None = None, config=None) -> ConnectionSpec:
    """The connection to `destination` as `ssh [ssh_args] destination` would make it.

    Explicit values (Ansible's ansible_port, ansible_user, private key file; host_key_checking
    False) come first, as Ansible puts them on ssh's command line before ssh_common_args; then
    the `-o`/`-p`/`-l`/`-i`/`-F`/`-J` options of ssh_args (in order, the first value wins); then
    the ssh config files (`-F file`, else ~/.ssh/config and /etc/ssh/ssh_config).
    """
    require_paramiko()
    options = merge_ssh_arguments(*ssh_args)
    if config is None:
        config = load_ssh_config(options["configfile"][0] if "configfile" in options else None)
    spec = _resolve_host(destination, config, options, port=port, user=user, timeout=timeout,
                         host_key_checking=host_key_checking, identity=private_key_file, depth=0)
    spec.password = password
    spec.key_passphrase = key_passphrase
    spec.private_key = private_key
    spec.become = become
    return spec


def _resolve_host(alias: str, config, options: dict, *, port, user, timeout, host_key_checking, identity,
                  depth: int, allow_proxy: bool = True) -> ConnectionSpec:
    if depth > MAX_HOPS:
        raise SessionError(f"more than {MAX_HOPS} ProxyJump hops to reach {alias!r}; is there a loop in the ssh "
                           "config?", retryable=False)
    looked = _lookup(config, alias)

    def first(key: str, default=None):
        if options.get(key):
            return options[key][0]
        return looked.get(key, default)

    host = first("hostname") or alias
    port = int(port or _number(first("port", 22), "Port", int))
    user = user or first("user") or _local_user()
    identities = ([identity] if identity else []) + options.get("identityfile", []) + looked.get("identityfile", [])
    strict = (first("stricthostkeychecking") or "ask").strip().lower()
    checking = host_key_checking and strict not in ("no", "off", "false")
    user_known = first("userknownhostsfile")
    global_known = first("globalknownhostsfile")
    known = [expand_path(path) for path in (user_known.split() if user_known else DEFAULT_USER_KNOWN_HOSTS)]
    known += [expand_path(path) for path in (global_known.split() if global_known else DEFAULT_GLOBAL_KNOWN_HOSTS)]
    connect_timeout = first("connecttimeout")
    keepalive = first("serveraliveinterval")
    family = (first("addressfamily") or "any").lower()
    if family not in ("any", "inet", "inet6"):
        raise SessionError(f"AddressFamily {family!r} is not one of any, inet, inet6", retryable=False)
    spec = ConnectionSpec(
        host=host, port=port, user=user, alias=alias, timeout=float(timeout),
        private_key_file=expand_path(identities[0]) if identities else None,
        identity_files=[expand_path(path) for path in identities[1:]],
        look_for_keys=not identities,
        identities_only=_yes(first("identitiesonly"), False),
        allow_agent=(first("identityagent") or "").lower() != "none",
        known_hosts_files=known, host_key_checking=checking, accept_new_host_keys=strict == "accept-new",
        host_key_alias=first("hostkeyalias"),
        connect_timeout=_number(connect_timeout, "ConnectTimeout") if connect_timeout else None,
        keepalive=_number(keepalive, "ServerAliveInterval", int) if keepalive else 0,
        address_family=family,
        pubkey_auth=_yes(first("pubkeyauthentication"), True),
        password_auth=_yes(first("passwordauthentication"), True),
        kbd_interactive_auth=_yes(first("kbdinteractiveauthentication", looked.get("challengeresponseauthentication")),
                                  True),
    )
    if allow_proxy:
        _resolve_proxy(spec, config, options, looked, timeout, depth)
    return spec


def _resolve_proxy(spec: ConnectionSpec, config, options: dict, looked: dict, timeout: float, depth: int) -> None:
    """ProxyCommand or ProxyJump; on the command line before the files, as ssh reads them."""
    if "proxycommand" in options or "proxyjump" in options:
        choice = ("command", options["proxycommand"][0]) if "proxycommand" in options \
            else ("jump", options["proxyjump"][0])
    elif "proxycommand" in looked:  # None: "ProxyCommand none"
        choice = ("command", looked["proxycommand"])
    else:
        choice = ("jump", looked.get("proxyjump"))
    if choice[1] is None or not choice[1].strip() or choice[1].strip().lower() == "none":
        return
    kind, value = choice
    if kind == "command":
        spec.proxy_command = expand_tokens(value, spec.host, spec.port, spec.user, spec.alias or spec.host)
        return
    hops = [parse_jump(hop) for hop in expand_tokens(value, spec.host, spec.port, spec.user,
                                                     spec.alias or spec.host).split(",")]
    if hops[0][0] in (spec.alias, spec.host) and hops[0][1] in (None, spec.port):
        return  # a hop's own "Host *" ProxyJump naming that hop: it cannot jump through itself
    previous = None
    for index, (hop_host, hop_port, hop_user) in enumerate(hops):
        # Like the `ssh -W` OpenSSH runs for each hop: only -F reaches it, not the other options
        # of the command line; the first hop may have its own proxy in the config file.
        hop_spec = _resolve_host(hop_host, config, {}, port=hop_port, user=hop_user, timeout=timeout,
                                 host_key_checking=True, identity=None, depth=depth + index + 1,
                                 allow_proxy=previous is None)
        hop_spec.jump = previous if previous is not None else hop_spec.jump
        previous = hop_spec
    spec.jump = previous


def _local_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or "root"


# ---------------------------------------------------------------------------------------------
# Host keys
# ---------------------------------------------------------------------------------------------


def load_known_hosts(files: list[str]) -> "paramiko.HostKeys":
    """The host keys of the known_hosts files, read line by line as ssh does: a line Paramiko cannot
    parse (a key type it does not know, @cert-authority) is skipped instead of failing the file.
    Keys marked @revoked are kept in `multipush_revoked` and refused whatever the host."""
    keys = paramiko.HostKeys()
    revoked = set()
    for path in files:
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                lines = handle.read().splitlines()
        except OSError as exc:
            raise SessionError(f"cannot read known_hosts file {path}: {exc}", retryable=False) from None
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("@"):
                fields = line.split()
                if fields[0] == "@revoked" and len(fields) >= 4:
                    try:
                        revoked.add(base64.b64decode(fields[3]))
                    except ValueError:
                        pass
                continue  # @cert-authority: host certificates are not used
            try:
                entry = paramiko.hostkeys.HostKeyEntry.from_line(line, number)
            except Exception:  # InvalidHostKey, unknown key types: ssh skips such lines too
                continue
            if entry is not None and entry.key is not None:
                for name in entry.hostnames:
                    keys.add(name, entry.key.get_name(), entry.key)
    keys.multipush_revoked = revoked
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
    fingerprint = presented.fingerprint if hasattr(presented, "fingerprint") else presented.get_base64()
    if presented.asbytes() in getattr(known, "multipush_revoked", ()):
        raise SessionError(f"the host key of {spec.host_key_name} ({presented.get_name()} {fingerprint}) is marked "
                           "@revoked in known_hosts; nothing was written", retryable=False)
    entry = known.lookup(spec.host_key_name)
    files = ", ".join(path for path in spec.known_hosts_files if os.path.isfile(path)) or "~/.ssh/known_hosts"
    if not entry:
        if spec.accept_new_host_keys:
            return
        target = shlex.quote(spec.known_hosts_files[0] if spec.known_hosts_files else expand_path("~/.ssh/known_hosts"))
        keyscan = f"ssh-keyscan {'-p ' + str(spec.port) + ' ' if spec.port != 22 else ''}{spec.host} >> {target}"
        raise SessionError(
            f"host key for {spec.host_key_name} is not known ({presented.get_name()} {fingerprint}); nothing was "
            f"written. Verify the fingerprint, then add it to known_hosts ({files}), e.g. "
            f"`{keyscan}`, or connect once with ssh; or turn host key checking off "
            "(ANSIBLE_HOST_KEY_CHECKING=False) on a trusted network.",
            retryable=False,
        )
    expected = entry.get(presented.get_name())
    if expected is None or expected.asbytes() != presented.asbytes():
        holder = _file_with_entry(spec)
        remove = f"ssh-keygen -R {shlex.quote(spec.host_key_name)}" + (f" -f {shlex.quote(holder)}" if holder else "")
        raise SessionError(
            f"HOST KEY MISMATCH for {spec.host_key_name}: the target presented {presented.get_name()} "
            f"{fingerprint}, which differs from known_hosts ({holder or files}); nothing was written. Someone may be "
            f"intercepting the connection, or the host was reinstalled: check, then remove the old entry with "
            f"`{remove}` and add the new key.",
            retryable=False,
        )


def _file_with_entry(spec: ConnectionSpec) -> str | None:
    """The known_hosts file that holds the host's entry (for a remedy that edits the right file)."""
    for path in spec.known_hosts_files:
        if os.path.isfile(path):
            try:
                if paramiko.HostKeys(path).lookup(spec.host_key_name):
                    return path
            except (OSError, paramiko.SSHException):
                continue
    return None


# ---------------------------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------------------------


def _public_blob(path: str) -> bytes | None:
    """The public key of an identity file without decrypting it: from its .pub file."""
    try:
        with open(path + ".pub", encoding="ascii", errors="replace") as handle:
            fields = handle.read().split()
        return base64.b64decode(fields[1]) if len(fields) >= 2 else None
    except (OSError, ValueError):
        return None


def _secret_bytes(secret: str | None) -> bytes | None:
    """Paramiko 5 wants key passphrases as bytes."""
    return secret.encode("utf-8") if isinstance(secret, str) else secret


def _load_key_file(path: str, passphrase: str | None):
    try:
        return paramiko.PKey.from_path(path, password=_secret_bytes(passphrase)), None
    except (paramiko.PasswordRequiredException, TypeError) as exc:
        # cryptography says "password-protected, but password was not provided" with a TypeError
        if isinstance(exc, paramiko.PasswordRequiredException) or (not passphrase and "password" in str(exc)):
            return None, (f"private key {path} is encrypted and no passphrase was given; load it into ssh-agent "
                          "or set ansible_private_key_passphrase")
        return None, f"cannot load private key {path}: {exc}"
    except FileNotFoundError:
        return None, f"cannot load private key {path}: it does not exist"
    except (OSError, paramiko.SSHException, ValueError) as exc:
        reason = "wrong passphrase or damaged key" if passphrase else str(exc) or type(exc).__name__
        return None, f"cannot load private key {path}: {reason}"
    except Exception as exc:  # UnknownKeyType (DSA, security keys...): not a key Paramiko can use
        return None, f"cannot load private key {path}: {type(exc).__name__} (a key type Paramiko cannot use?)"


def _candidate_keys(spec: ConnectionSpec, agent) -> tuple[list, list[str]]:
    """Keys to offer, in OpenSSH's order, and the problems met while loading them.

    ssh-agent keys first (with IdentitiesOnly only those matching an identity file), then the
    identity files that the agent does not hold; without any identity file, the default ones.
    An encrypted file whose key the agent holds is never decrypted.
    """
    keys: list[tuple[str, paramiko.PKey]] = []
    problems: list[str] = []
    if spec.private_key:
        for key_class in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
            try:
                keys.append(("ansible_ssh_private_key",
                             key_class.from_private_key(io.StringIO(spec.private_key),
                                                        password=_secret_bytes(spec.key_passphrase))))
                break
            except (paramiko.SSHException, ValueError, TypeError):
                continue
        else:
            problems.append("ansible_ssh_private_key could not be loaded (wrong passphrase or not a private key)")
    files = [path for path in [spec.private_key_file, *spec.identity_files] if path]
    if not files and spec.look_for_keys:
        files = [path for name in DEFAULT_IDENTITIES if os.path.isfile(path := expand_path(f"~/.ssh/{name}"))]
    blobs = {path: _public_blob(path) for path in files}
    covered = set()
    for key in agent_keys(agent):
        blob = key.asbytes()
        matching = [path for path, known in blobs.items() if known == blob]
        if matching:
            covered.update(matching)
            keys.append((f"ssh-agent key of {matching[0]}", key))
        elif not spec.identities_only:
            keys.append((f"ssh-agent key {key.get_name()} {key.fingerprint}", key))
    for path in files:
        if path in covered:
            continue
        key, problem = _load_key_file(path, spec.key_passphrase)
        if key is not None:
            keys.append((f"key {path}", key))
        else:
            problems.append(problem)
    return keys, problems


def agent_keys(agent) -> list:
    if agent is None:
        return []
    try:
        return list(agent.get_keys())
    except paramiko.SSHException:
        return []


def _open_agent(spec: ConnectionSpec):
    if not spec.allow_agent or not os.environ.get("SSH_AUTH_SOCK"):
        return None
    try:
        return paramiko.Agent()
    except (paramiko.SSHException, OSError):
        return None


def _allowed_methods(transport: "paramiko.Transport", user: str) -> list[str] | None:
    """The server's list of authentication methods (the "none" request, as ssh sends first).
    None: the server let us in without authentication."""
    try:
        transport.auth_none(user)
    except paramiko.BadAuthenticationType as exc:
        return list(exc.allowed_types)
    except paramiko.AuthenticationException:
        return ["publickey", "password", "keyboard-interactive"]
    return None if transport.is_authenticated() else ["publickey", "password", "keyboard-interactive"]


def _password_handler(password: str):
    answered = {"count": 0}

    def handler(_title, _instructions, prompts):
        answers = []
        for _text, echo in prompts:
            if not echo and answered["count"] < KBD_INTERACTIVE_MAX_PASSWORD_PROMPTS:
                answered["count"] += 1
                answers.append(password)
            else:  # an echoed question or a server that keeps asking: nothing we know
                answers.append("")
        return answers

    return handler


def _authenticate(spec: ConnectionSpec, transport: "paramiko.Transport") -> None:
    user = spec.user or _local_user()
    tried: list[str] = []
    problems: list[str] = []
    try:
        allowed = _allowed_methods(transport, user)
        if allowed is None:
            return
        if spec.pubkey_auth and "publickey" in allowed:
            agent = _open_agent(spec)
            try:
                keys, problems = _candidate_keys(spec, agent)
                for label, key in keys:
                    try:
                        transport.auth_publickey(user, key)
                    except paramiko.AuthenticationException:
                        tried.append(label)
                        continue
                    if transport.is_authenticated():
                        return
            finally:
                if agent is not None:
                    agent.close()
        if spec.password is not None:
            if spec.kbd_interactive_auth and "keyboard-interactive" in allowed:
                try:
                    transport.auth_interactive(user, _password_handler(spec.password))
                    if transport.is_authenticated():
                        return
                except paramiko.AuthenticationException:
                    tried.append("keyboard-interactive with the password")
            if spec.password_auth and "password" in allowed:
                try:
                    transport.auth_password(user, spec.password)
                    if transport.is_authenticated():
                        return
                except paramiko.AuthenticationException:
                    tried.append("password")
    except (paramiko.SSHException, EOFError, OSError) as exc:
        if isinstance(exc, paramiko.AuthenticationException):
            raise SessionError(f"authentication to {spec.describe()} failed: {exc}", retryable=False) from None
        raise SessionError(f"SSH error while authenticating to {spec.describe()}: {exc}", retryable=True) from None
    offered = ", ".join(tried) or "no key or password was available"
    hints = " ".join(problem.rstrip(".") + "." for problem in problems)
    if spec.password is not None and not {"password", "keyboard-interactive"} & set(allowed):
        tried.append("password (not accepted by the server)")
        offered = ", ".join(tried)
        hints += f" The server does not accept passwords (it allows: {', '.join(allowed)})."
    raise SessionError(
        f"authentication to {spec.describe()} as {user} failed (tried: {offered}). {hints}"
        f"{' ' if hints else ''}Check ansible_user, ansible_ssh_private_key_file, ssh-agent or ansible_password.",
        retryable=False,
    )


# ---------------------------------------------------------------------------------------------
# Sockets: direct (every address in turn), ProxyCommand, ProxyJump
# ---------------------------------------------------------------------------------------------


def _tcp_connect(spec: ConnectionSpec) -> socket.socket:
    family = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}.get(spec.address_family, socket.AF_UNSPEC)
    try:
        infos = socket.getaddrinfo(spec.host, spec.port, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        retry = exc.errno in (socket.EAI_AGAIN,)
        raise SessionError(f"cannot resolve host {spec.host!r}: {exc.strerror}; check ansible_host", retry) from None
    timeout = spec.connect_timeout or spec.timeout
    errors, seen = [], set()
    for af, kind, proto, _canon, address in infos:
        if address in seen:
            continue
        seen.add(address)
        sock = socket.socket(af, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            reason = "timed out" if isinstance(exc, socket.timeout) else exc.strerror or str(exc)
            errors.append(f"{address[0]} port {address[1]}: {reason}")
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    where = f"[{spec.host}]:{spec.port}" if ":" in spec.host else f"{spec.host}:{spec.port}"
    raise SessionError(f"cannot connect to {where} ({'; '.join(errors) or 'no address'})", retryable=True)


class _ProxyProcess:
    """A ProxyCommand run by the shell with one end of a socketpair as its stdin and stdout.

    Not paramiko.ProxyCommand: that one splits the command without a shell, never reaps the
    process, and spins instead of reporting EOF when the command exits. A real socket gives
    the transport ordinary EOF and timeout behaviour.
    """

    def __init__(self, command: str):
        self.command = command
        ours, theirs = socket.socketpair()
        self.stderr = tempfile.TemporaryFile()
        try:
            self.process = subprocess.Popen(  # pylint: disable=consider-using-with
                ["/bin/sh", "-c", "exec " + command], stdin=theirs, stdout=theirs, stderr=self.stderr,
                close_fds=True, start_new_session=True)
        except OSError as exc:
            ours.close()
            self.stderr.close()
            raise SessionError(f"cannot run ProxyCommand {command!r}: {exc}", retryable=False) from None
        finally:
            theirs.close()
        self.sock = ours

    def error_text(self) -> str:
        try:
            self.stderr.seek(0)
            return self.stderr.read()[-2000:].decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.stderr.close()


if paramiko is not None:

    class _Transport(paramiko.Transport):
        """A transport that also closes what carries it (hop connections, a ProxyCommand)."""

        def __init__(self, sock, carriers=()):
            super().__init__(sock)
            self.multipush_carriers = list(carriers)

        def close(self):
            try:
                super().close()
            finally:
                for carrier in self.multipush_carriers:
                    try:
                        carrier.close()
                    except Exception:  # closing is best effort; the connection is gone anyway
                        pass
                self.multipush_carriers = []

    class _SFTPClient(SFTPClient):
        """SFTPClient that adds the wanted owner and group to every setstat/fsetstat that sets a
        mode or a modification time, i.e. whenever the push finalizes a file or a directory."""

        multipush_uid = None
        multipush_gid = None

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
    _Transport = _SFTPClient = None


def _carrier_socket(spec: ConnectionSpec):
    """(socket for the transport, things to close after it)."""
    if spec.proxy_command:
        proxy = _ProxyProcess(spec.proxy_command)
        return proxy.sock, [proxy]
    if spec.jump is not None:
        hop = _connect(spec.jump)
        try:
            channel = hop.open_channel("direct-tcpip", (spec.host, spec.port), ("127.0.0.1", 0),
                                       timeout=spec.connect_timeout or spec.timeout)
        except paramiko.ChannelException as exc:
            hop.close()
            # 1: administratively prohibited (AllowTcpForwarding no): fixing needs the admin.
            raise SessionError(f"jump host {spec.jump.describe()} could not reach {spec.host} port {spec.port}: "
                               f"{exc.text} (code {exc.code})", retryable=exc.code != 1) from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            hop.close()
            raise SessionError(f"jump host {spec.jump.describe()} failed while opening a channel to "
                               f"{spec.host}:{spec.port}: {exc}", retryable=True) from None
        return channel, [hop]
    return _tcp_connect(spec), []


def _connect(spec: ConnectionSpec) -> "paramiko.Transport":
    """An authenticated transport to spec's host, through whatever carries it."""
    known = load_known_hosts(spec.known_hosts_files) if spec.host_key_checking else paramiko.HostKeys()
    known_types = list((known.lookup(spec.host_key_name) or {}).keys())
    sock, carriers = _carrier_socket(spec)
    transport = _Transport(sock, carriers)
    try:
        _security_preferences(transport, known_types)
        try:
            transport.start_client(timeout=spec.timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            # sshd drops handshakes beyond MaxStartups; that is worth another try after a pause.
            detail = str(exc) or type(exc).__name__
            for carrier in carriers:
                if isinstance(carrier, _ProxyProcess) and carrier.error_text():
                    detail += f"; ProxyCommand said: {carrier.error_text()}"
            raise SessionError(f"SSH handshake with {spec.describe()} failed: {detail}", retryable=True) from None
        _check_host_key(spec, known, transport)
        _authenticate(spec, transport)
        if spec.keepalive:
            transport.set_keepalive(spec.keepalive)
        return transport
    except BaseException:
        transport.close()
        raise


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


def _become_channel(spec: ConnectionSpec, transport: "paramiko.Transport"):
    """An exec channel running sftp-server as the become user, ready for SFTP's init."""
    become = spec.become
    token = secrets.token_hex(8)
    marker = f"MULTIPUSH-SFTP-{token}"
    prompt = f"[multipush sudo {token}] password:" if become.password is not None else None
    where = f"on {spec.alias or spec.host}"
    try:
        channel = transport.open_session()
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


def _start_sftp(spec: ConnectionSpec, transport: "paramiko.Transport"):
    try:
        if spec.become is not None:
            sftp = _SFTPClient(_become_channel(spec, transport))
        else:
            sftp = _SFTPClient.from_transport(transport)
    except SessionError:
        raise
    except (paramiko.SSHException, EOFError, OSError) as exc:
        how = "sftp-server through sudo" if spec.become is not None else "the sftp subsystem"
        raise SessionError(f"cannot start SFTP on {spec.describe()}: {exc}; is {how} available on the target "
                           "(Subsystem sftp in its sshd_config)?", retryable=True, unreachable=False) from None
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


def open_session(spec: ConnectionSpec) -> tuple["paramiko.Transport", "SFTPClient"]:
    """Connect, verify the host key, authenticate and start the SFTP session."""
    require_paramiko()
    transport = _connect(spec)
    try:
        sftp = _start_sftp(spec, transport)
        sftp.get_channel().settimeout(spec.timeout)
        return transport, sftp
    except BaseException:
        transport.close()
        raise
