# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Why an SSH algorithm negotiation failed, in words an administrator can act on.

When Paramiko and the server have no key exchange, host key, cipher, MAC or compression
algorithm in common, Paramiko raises IncompatiblePeer with a one-line reason and nothing about
what the server offered. Only then (on the error path) the push opens one more carrier socket,
reads the server's SSH_MSG_KEXINIT itself (RFC 4253 section 7.1: after the version exchange it
comes in the clear) and compares its name-lists with what Paramiko supports, from its public
Transport.get_security_options(). Nothing here depends on Paramiko's internals.
"""

from __future__ import annotations

import socket
import struct
import time

MSG_KEXINIT = 20
NAME_LISTS = ("kex", "host_key", "cipher_c2s", "cipher_s2c", "mac_c2s", "mac_s2c",
              "compression_c2s", "compression_s2c", "language_c2s", "language_s2c")
# Names in the kex list that announce protocol extensions rather than algorithms (RFC 8308, OpenSSH's strict kex).
PSEUDO_ALGORITHMS = ("ext-info-s", "ext-info-c", "kex-strict-s-v00@openssh.com", "kex-strict-c-v00@openssh.com")
MAX_PACKET = 256 * 1024  # RFC 4253 asks for 35000 at least; a KEXINIT with many algorithms stays far below this
MAX_BANNER_LINES = 64  # lines a server may send before its version string (RFC 4253 section 4.2)
MAX_LINE = 8192
PROBE_VERSION = b"SSH-2.0-multipush_negotiation_probe\r\n"

# category: (label, sshd_config keyword, what to suggest first when Paramiko supports it)
CATEGORIES = {
    "kex": ("key exchange algorithm", "KexAlgorithms",
            ("curve25519-sha256@libssh.org", "ecdh-sha2-nistp256", "diffie-hellman-group14-sha256")),
    "host_key": ("host key algorithm", "HostKeyAlgorithms", ("ssh-ed25519", "rsa-sha2-512", "ecdsa-sha2-nistp256")),
    "cipher": ("cipher", "Ciphers", ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr")),
    "mac": ("MAC", "MACs", ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-256", "hmac-sha2-512")),
    "compression": ("compression method", "Compression", ("none",)),
}


class KexinitError(Exception):
    """The server's KEXINIT could not be read or parsed."""


def parse_name_list(data: bytes, offset: int) -> tuple[list[str], int]:
    """An RFC 4251 name-list at offset: (names, offset after it)."""
    if offset + 4 > len(data):
        raise KexinitError("KEXINIT ends inside a name-list length")
    (length,) = struct.unpack(">I", data[offset:offset + 4])
    start, end = offset + 4, offset + 4 + length
    if end > len(data):
        raise KexinitError(f"KEXINIT name-list of {length} bytes runs past the end of the packet")
    text = data[start:end].decode("ascii", "replace")
    return [name for name in text.split(",") if name], end


def parse_kexinit(payload: bytes) -> dict[str, list[str]]:
    """The ten name-lists of an SSH_MSG_KEXINIT payload (message number, 16-byte cookie, name-lists,
    first_kex_packet_follows, reserved)."""
    if not payload or payload[0] != MSG_KEXINIT:
        raise KexinitError(f"expected SSH_MSG_KEXINIT ({MSG_KEXINIT}), got message "
                           f"{payload[0] if payload else 'nothing'}")
    offset = 1 + 16
    lists = {}
    for name in NAME_LISTS:
        lists[name], offset = parse_name_list(payload, offset)
    return lists


class _Reader:
    """Bytes from a socket or a Paramiko channel, with one deadline for the whole probe."""

    def __init__(self, sock, timeout: float):
        self.sock = sock
        self.deadline = time.monotonic() + timeout
        self.buffer = b""

    def _fill(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise KexinitError("the server sent no KEXINIT in time")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            raise KexinitError("the server sent no KEXINIT in time") from None
        if not data:
            raise KexinitError("the server closed the connection before its KEXINIT")
        self.buffer += data

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_LINE:
                raise KexinitError("the server's version line is too long")
            self._fill()
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.rstrip(b"\r")

    def exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self._fill()
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data


def read_server_kexinit(sock, timeout: float = 10.0) -> tuple[str, dict[str, list[str]]]:
    """(the server's version string, its KEXINIT name-lists), read from a freshly connected carrier
    socket (a TCP socket, a ProxyCommand's socketpair or a jump host's channel). Sends only a version
    line; the caller closes the socket."""
    sock.sendall(PROBE_VERSION)
    reader = _Reader(sock, timeout)
    for _count in range(MAX_BANNER_LINES):
        line = reader.line()
        if line.startswith(b"SSH-"):
            version = line.decode("utf-8", "replace")
            break
    else:
        raise KexinitError("the server sent no SSH version line")
    packet_length, padding_length = struct.unpack(">IB", reader.exactly(5))
    if not 1 + padding_length < packet_length <= MAX_PACKET:
        raise KexinitError(f"the server's first packet has an implausible length ({packet_length})")
    body = reader.exactly(packet_length - 1)
    return version, parse_kexinit(body[:packet_length - 1 - padding_length])


def paramiko_supported(transport) -> dict[str, list[str]]:
    """What a Paramiko transport would accept, per category, from Transport.get_security_options()."""
    options = transport.get_security_options()
    return {"kex": list(options.kex), "host_key": list(options.key_types), "cipher": list(options.ciphers),
            "mac": list(options.digests), "compression": list(options.compression)}


def _offered(server: dict[str, list[str]], category: str) -> list[list[str]]:
    if category in ("kex", "host_key"):
        return [[name for name in server[category] if name not in PSEUDO_ALGORITHMS]]
    return [server[f"{category}_c2s"], server[f"{category}_s2c"]]


def mismatches(server: dict[str, list[str]], supported: dict[str, list[str]]) -> list[tuple[str, list[str]]]:
    """[(category, what the server offers there)] for each category with nothing in common, in
    negotiation order. For ciphers, MACs and compression either direction failing is enough."""
    found = []
    for category in CATEGORIES:
        for offered in _offered(server, category):
            if not set(offered) & set(supported[category]):
                found.append((category, offered))
                break
    return found


def _remedy(category: str, offered: list[str], supported: list[str]) -> str:
    _label, keyword, suggestions = CATEGORIES[category]
    pick = next((name for name in suggestions if name in supported), supported[0] if supported else None)
    if pick is None:
        return f"reinstall paramiko: it supports no {CATEGORIES[category][0]} at all"
    if category == "host_key":
        return (f"give the server a host key of a type Paramiko accepts and let it offer that algorithm (OpenSSH: "
                f"`ssh-keygen -A` makes the missing host keys, sshd_config `HostKey /etc/ssh/ssh_host_ed25519_key`, "
                f"and {pick} in HostKeyAlgorithms if that is set), then reload sshd")
    if category == "compression":
        return "let the server offer 'none' (OpenSSH always does), then reload it"
    line = ",".join(offered + [pick])
    return (f"let the server offer {pick} too (OpenSSH: add it to {keyword} in sshd_config, e.g. "
            f"`{keyword} {line}`, then reload sshd; `sshd -T | grep -i '^{keyword.lower()} '` shows what it uses)")


def explain(server: dict[str, list[str]], supported: dict[str, list[str]], paramiko_version: str = "") -> str:
    """The part of the message after "negotiation with HOST failed: "; empty when the name-lists do
    have something in common in every category (then the caller keeps Paramiko's own reason)."""
    found = mismatches(server, supported)
    if not found:
        return ""
    parts = []
    who = f"Paramiko {paramiko_version}".strip()
    for category, offered in found:
        label = CATEGORIES[category][0]
        remedy = _remedy(category, offered, supported[category])
        parts.append(f"no {label} in common: the server offers {', '.join(offered) or 'none'}; {who} supports "
                     f"{', '.join(supported[category]) or 'none'}. To fix, {remedy}.")
    return " ".join(parts)
