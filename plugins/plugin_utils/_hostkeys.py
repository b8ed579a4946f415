# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Host keys: known_hosts read as ssh reads it, the algorithm preferences offered to the server,
and the check of the key the target presents (unknown, changed or revoked: nothing is written).

The cipher preference puts AES-GCM first because it costs less CPU per byte in Paramiko, and the
write path seals AES-GCM packets in batches (_wire).
"""

from __future__ import annotations

import base64
import os
import shlex

from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import ConnectionSpec, SessionError, paramiko
from ansible_collections.multipush.sftp.plugins.plugin_utils._sshconfig import expand_path

PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")


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


def security_preferences(transport: "paramiko.Transport", known_types: list[str]) -> None:
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


def check_host_key(spec: ConnectionSpec, known: "paramiko.HostKeys", transport: "paramiko.Transport") -> None:
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
        known_hosts = spec.known_hosts_files[0] if spec.known_hosts_files else expand_path("~/.ssh/known_hosts")
        # Works on a fresh account too: `>> ~/.ssh/known_hosts` alone fails while ~/.ssh does not exist.
        keyscan = (f"ssh-keyscan {'-p ' + str(spec.port) + ' ' if spec.port != 22 else ''}{spec.host} | "
                   f"(mkdir -p -m 700 {shlex.quote(os.path.dirname(known_hosts) or '.')} && "
                   f"cat >> {shlex.quote(known_hosts)})")
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
