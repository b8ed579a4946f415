# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Authentication on a connected transport, in OpenSSH's order: ssh-agent keys, identity files
(with passphrases), password and keyboard-interactive, as far as the server allows them.

Passwords and passphrases never reach a command line, a log or an error message.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass, field

from ansible_collections.multipush.sftp.plugins.plugin_utils import _paramiko_compat
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import ConnectionSpec, SessionError, paramiko
from ansible_collections.multipush.sftp.plugins.plugin_utils._sshconfig import expand_path, local_user

DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")
KBD_INTERACTIVE_MAX_PASSWORD_PROMPTS = 3


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
    """The server's list of authentication methods (the "none" request).
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


@dataclass
class _Attempts:
    """What authentication tried so far, what went wrong loading keys, and the methods the server
    said it allows (None: not asked yet)."""

    tried: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    allowed: list[str] | None = None


def authenticate(spec: ConnectionSpec, transport: "paramiko.Transport") -> None:
    """Keys first, without asking the server which methods it takes: that question (the "none"
    request) costs a round trip on every login, and a refused key brings the same answer. It is
    asked only when a password is to be tried and nothing said yet what the server allows."""
    user = spec.user or local_user()
    attempts = _Attempts()
    try:
        if _logged_in(spec, transport, user, attempts):
            return
    except (paramiko.SSHException, EOFError, OSError) as exc:
        if isinstance(exc, paramiko.AuthenticationException):
            raise SessionError(f"authentication to {spec.describe()} failed: {exc}", retryable=False) from None
        raise SessionError(f"SSH error while authenticating to {spec.describe()}: {exc}", retryable=True) from None
    raise _refused(spec, user, attempts)


def _logged_in(spec: ConnectionSpec, transport: "paramiko.Transport", user: str, attempts: _Attempts) -> bool:
    if spec.pubkey_auth and _key_accepted(spec, transport, user, attempts):
        return True
    if spec.password is not None:
        return _password_accepted(spec, transport, user, attempts)
    if not attempts.tried and attempts.allowed is None:
        # Nothing to offer: the server may still let us in without authentication.
        attempts.allowed = _allowed_methods(transport, user)
        return attempts.allowed is None
    return False


def _key_accepted(spec: ConnectionSpec, transport: "paramiko.Transport", user: str, attempts: _Attempts) -> bool:
    agent = _open_agent(spec)
    try:
        keys, attempts.problems = _candidate_keys(spec, agent)
        for label, key in keys:
            try:
                _paramiko_compat.auth_publickey(transport, user, key)
            except paramiko.BadAuthenticationType as exc:  # the server takes no keys at all
                attempts.allowed = list(exc.allowed_types)
                attempts.problems = []  # what went wrong with keys does not matter then
                return False
            except paramiko.AuthenticationException:
                attempts.tried.append(label)
                continue
            if transport.is_authenticated():
                return True
        return False
    finally:
        if agent is not None:
            agent.close()


def _password_accepted(spec: ConnectionSpec, transport: "paramiko.Transport", user: str,
                       attempts: _Attempts) -> bool:
    if attempts.allowed is None:
        attempts.allowed = _allowed_methods(transport, user)
        if attempts.allowed is None:
            return True
    if spec.kbd_interactive_auth and "keyboard-interactive" in attempts.allowed:
        try:
            transport.auth_interactive(user, _password_handler(spec.password))
            if transport.is_authenticated():
                return True
        except paramiko.AuthenticationException:
            attempts.tried.append("keyboard-interactive with the password")
    if spec.password_auth and "password" in attempts.allowed:
        try:
            transport.auth_password(user, spec.password)
            if transport.is_authenticated():
                return True
        except paramiko.AuthenticationException:
            attempts.tried.append("password")
    return False


def _refused(spec: ConnectionSpec, user: str, attempts: _Attempts) -> SessionError:
    tried = attempts.tried
    offered = ", ".join(tried) or "no key or password was available"
    hints = " ".join(problem.rstrip(".") + "." for problem in attempts.problems)
    if spec.password is not None and not {"password", "keyboard-interactive"} & set(attempts.allowed):
        tried.append("password (not accepted by the server)")
        offered = ", ".join(tried)
        hints += f" The server does not accept passwords (it allows: {', '.join(attempts.allowed)})."
    return SessionError(
        f"authentication to {spec.describe()} as {user} failed (tried: {offered}). {hints}"
        f"{' ' if hints else ''}Check ansible_user, ansible_ssh_private_key_file, ssh-agent or ansible_password.",
        retryable=False,
    )
