# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""From ssh arguments and the OpenSSH client configuration to a ConnectionSpec, the way `ssh` would.

`resolve_spec` turns what Ansible's ssh connection plugin would put on the ssh command line
(host, port, user, key, `-o`/`-F`/`-J`... from ssh_args, ssh_common_args and ssh_extra_args)
plus the OpenSSH client configuration (read with paramiko.SSHConfig) into one ConnectionSpec,
with OpenSSH's precedence: the command line first, then the first value found in the files.
"""

from __future__ import annotations

import glob
import os
import pwd
import shlex

from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import (
    BecomeSpec, ConnectionSpec, SessionError, paramiko, require_paramiko,
)

DEFAULT_USER_CONFIG = "~/.ssh/config"
DEFAULT_SYSTEM_CONFIG = "/etc/ssh/ssh_config"
DEFAULT_USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
DEFAULT_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
MAX_HOPS = 8
MAX_INCLUDE_DEPTH = 16

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
    user = user or first("user") or local_user()
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


def local_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or "root"
