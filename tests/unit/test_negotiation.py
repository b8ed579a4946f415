"""_negotiation: reading a server's SSH_MSG_KEXINIT and explaining an algorithm mismatch.

The reader is tested on a real sshd over loopback and on crafted packets through a socketpair;
the comparison with Paramiko uses a real (unconnected) Paramiko transport's security options."""

from __future__ import annotations

import socket
import struct
import threading

import paramiko
import pytest

from ansible_collections.multipush.sftp.plugins.plugin_utils._negotiation import (
    KexinitError, NAME_LISTS, explain, mismatches, paramiko_supported, read_server_kexinit,
)
from tests.support.sshd import SshServer

BOUND = 10.0  # seconds any read of these tests may take before it counts as a hang


def kexinit_payload(lists: dict[str, list[str]]) -> bytes:
    body = bytes([20]) + bytes(range(16))  # the cookie: any 16 bytes; fixed, so test ids match across workers
    for name in NAME_LISTS:
        text = ",".join(lists.get(name, [])).encode()
        body += struct.pack(">I", len(text)) + text
    return body + b"\x00" + struct.pack(">I", 0)


def packet(payload: bytes) -> bytes:
    padding = 8 - (len(payload) + 5) % 8 + 8
    return struct.pack(">IB", len(payload) + padding + 1, padding) + payload + b"\x00" * padding


OFFER = {
    "kex": ["curve25519-sha256", "curve25519-sha256@libssh.org", "ext-info-s", "kex-strict-s-v00@openssh.com"],
    "host_key": ["ssh-ed25519"],
    "cipher_c2s": ["chacha20-poly1305@openssh.com"], "cipher_s2c": ["chacha20-poly1305@openssh.com"],
    "mac_c2s": ["hmac-sha2-256"], "mac_s2c": ["hmac-sha2-256"],
    "compression_c2s": ["none", "zlib@openssh.com"], "compression_s2c": ["none", "zlib@openssh.com"],
}


def serve_once(data: bytes) -> socket.socket:
    """Our end of a socketpair whose other end sends `data` in small pieces, then closes."""
    ours, theirs = socket.socketpair()

    def send():
        with theirs:
            theirs.recv(100)  # the probe's version line
            for start in range(0, len(data), 7):
                theirs.sendall(data[start:start + 7])

    threading.Thread(target=send, daemon=True).start()
    return ours


@pytest.fixture
def supported() -> dict:
    left, right = socket.socketpair()
    transport = paramiko.Transport(left)
    try:
        yield paramiko_supported(transport)
    finally:
        transport.close()
        right.close()


def test_crafted_kexinit_after_banner_lines_is_parsed():
    data = b"Welcome\r\nto the lab\nSSH-2.0-Example_1.0 extra\r\n" + packet(kexinit_payload(OFFER))
    with serve_once(data) as sock:
        version, lists = read_server_kexinit(sock, timeout=BOUND)
    assert version == "SSH-2.0-Example_1.0 extra"
    assert lists["cipher_c2s"] == ["chacha20-poly1305@openssh.com"]
    assert lists["kex"] == OFFER["kex"]
    assert lists["compression_s2c"] == ["none", "zlib@openssh.com"]
    assert lists["language_c2s"] == []


@pytest.mark.parametrize("data, words", [
    (b"SSH-2.0-X\r\n" + packet(bytes([21]) + b"\x00" * 40), "expected SSH_MSG_KEXINIT"),
    (b"SSH-2.0-X\r\n" + packet(bytes([20]) + bytes(range(16)) + struct.pack(">I", 500) + b"abc"), "runs past"),
    (b"SSH-2.0-X\r\n" + struct.pack(">IB", 10 ** 9, 4), "implausible length"),
    (b"SSH-2.0-X\r\n" + packet(kexinit_payload(OFFER))[:40], "closed the connection"),
    (b"no version here\n", "closed the connection"),
], ids=["other message", "list past the end", "huge length", "truncated", "no version line"])
def test_malformed_or_truncated_kexinit_is_an_error(data, words):
    with serve_once(data) as sock:
        with pytest.raises(KexinitError, match=words):
            read_server_kexinit(sock, timeout=BOUND)


def test_a_server_that_says_nothing_times_out():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        with pytest.raises(KexinitError, match="in time"):
            read_server_kexinit(ours, timeout=0.3)


def test_real_sshd_kexinit_over_loopback(tmp_path):
    with SshServer(workdir=tmp_path / "sshd", options={"Ciphers": "chacha20-poly1305@openssh.com"}) as server:
        with socket.create_connection((server.host, server.port), timeout=BOUND) as sock:
            version, lists = read_server_kexinit(sock, timeout=BOUND)
    assert version.startswith("SSH-2.0-OpenSSH_")
    assert lists["cipher_c2s"] == lists["cipher_s2c"] == ["chacha20-poly1305@openssh.com"]
    assert "curve25519-sha256" in lists["kex"]
    assert "ssh-ed25519" in lists["host_key"]
    assert "none" in lists["compression_c2s"]


def test_paramiko_supported_lists_come_from_its_security_options(supported):
    assert "aes128-ctr" in supported["cipher"]
    assert "chacha20-poly1305@openssh.com" not in supported["cipher"]
    assert "ssh-ed25519" in supported["host_key"]
    assert "hmac-sha2-256" in supported["mac"]
    assert "none" in supported["compression"]
    assert supported["kex"]


def test_cipher_mismatch_names_both_sides_and_the_fix(supported):
    text = explain(OFFER, supported, "5.1.0")
    assert [category for category, _offer in mismatches(OFFER, supported)] == ["cipher"]
    assert text.startswith("no cipher in common: the server offers chacha20-poly1305@openssh.com; Paramiko 5.1.0 "
                           "supports ")
    assert "aes128-gcm@openssh.com" in text
    assert "`Ciphers chacha20-poly1305@openssh.com,aes128-gcm@openssh.com`" in text


@pytest.mark.parametrize("category, changed, words", [
    ("kex", {"kex": ["sntrup761x25519-sha512@openssh.com", "ext-info-s"]},
     ["no key exchange algorithm in common", "sntrup761x25519-sha512@openssh.com;", "KexAlgorithms"]),
    ("host_key", {"host_key": ["ssh-dss"]}, ["no host key algorithm in common", "HostKey", "ssh-keygen -A"]),
    ("mac", {"mac_s2c": ["umac-128-etm@openssh.com"]}, ["no MAC in common", "`MACs umac-128-etm@openssh.com,"]),
    ("compression", {"compression_c2s": ["zlib"]}, ["no compression method in common", "'none'"]),
])
def test_each_kind_of_mismatch_is_named_with_its_remedy(supported, category, changed, words):
    offer = dict(OFFER, cipher_c2s=["aes128-ctr"], cipher_s2c=["aes128-ctr"], **changed)
    assert [found for found, _offer in mismatches(offer, supported)] == [category]
    text = explain(offer, supported)
    for word in words:
        assert word in text
    assert "ext-info-s" not in text  # announces an extension, it is no algorithm


def test_nothing_to_explain_when_every_category_has_a_common_algorithm(supported):
    offer = dict(OFFER, cipher_c2s=["aes128-ctr"], cipher_s2c=["aes256-ctr"])
    assert mismatches(offer, supported) == []
    assert explain(offer, supported) == ""
