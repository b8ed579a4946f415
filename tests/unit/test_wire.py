"""The write path's sealed packets (_wire._send_sealed) against Paramiko's own receiving side: real
AES-GCM keys on a socket pair, a Paramiko Packetizer reading what was sent. Whatever it cannot
decrypt, or finds out of sequence with the packets Paramiko sends itself, fails here."""

from __future__ import annotations

import logging
import os
import socket
import threading

import pytest

from ansible_collections.multipush.sftp.plugins.plugin_utils import _paramiko_compat, _wire

paramiko = pytest.importorskip("paramiko")
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402  (paramiko brings it)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from paramiko.common import MSG_CHANNEL_DATA, MSG_IGNORE  # noqa: E402
from paramiko.packet import Packetizer  # noqa: E402

# Whatever MULTIPUSH_PARAMIKO_PUBLIC says: these call the sealing directly, which needs only this Paramiko.
pytestmark = pytest.mark.skipif(bool(_paramiko_compat.missing(paramiko, _paramiko_compat.FAST_PATH_NEEDS)),
                                reason="this Paramiko lacks what sealing needs")

BOUND = 10.0  # seconds any read may take before it counts as a hang


@pytest.fixture
def link():
    """A sending and a receiving Packetizer sharing one AES-GCM key and nonce, the sender's socket
    buffer small so that sends are partial."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.settimeout(BOUND)
    key, nonce = os.urandom(16), os.urandom(12)
    sender, receiver = Packetizer(ours), Packetizer(theirs)
    for packetizer in (sender, receiver):
        packetizer.set_log(logging.getLogger("test_wire"))
    sender.set_outbound_cipher(AESGCM(key), 16, None, 16, None, aead=True, iv_out=nonce)
    receiver.set_inbound_cipher(AESGCM(key), 16, None, 16, None, aead=True, iv_in=nonce)
    yield sender, receiver
    ours.close()
    theirs.close()


def read_in_background(receiver: Packetizer, count: int) -> tuple[threading.Thread, list]:
    messages: list = []

    def read():
        while len(messages) < count:
            messages.append(receiver.read_message())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, messages


def channel_data(message) -> tuple[int, bytes]:
    return message.get_int(), message.get_binary()


def test_sealed_packets_read_back_between_paramikos_own(link):
    sender, receiver = link
    data = memoryview(os.urandom(200_000))
    sizes = [32_704] * 6 + [200_000 - 6 * 32_704]  # the last one short, as at a request's end
    reader, messages = read_in_background(receiver, 2 + len(sizes) + 1)

    ignore = paramiko.Message()
    ignore.add_byte(bytes([MSG_IGNORE]))
    ignore.add_string(b"before")
    sender.send_message(ignore)  # Paramiko's own packet first: the nonce and sequence go on from it
    assert _wire._seals_here(sender)
    _wire._send_sealed(sender, 7, data, sizes)
    _wire._send_sealed(sender, 7, data[:100], [100])
    ignore = paramiko.Message()
    ignore.add_byte(bytes([MSG_IGNORE]))
    ignore.add_string(b"after")
    sender.send_message(ignore)
    reader.join(BOUND)

    assert not reader.is_alive(), f"only {len(messages)} packets could be read back"
    kinds = [kind for kind, message in messages]
    assert kinds == [MSG_IGNORE] + [MSG_CHANNEL_DATA] * (len(sizes) + 1) + [MSG_IGNORE]
    received = [channel_data(message) for kind, message in messages[1:-1]]
    assert {channel for channel, chunk in received} == {7}
    assert b"".join(chunk for channel, chunk in received[:-1]) == bytes(data)
    assert received[-1][1] == bytes(data[:100])
    assert messages[-1][1].get_binary() == b"after"
    # what non-AEAD MACs and SSH_MSG_UNIMPLEMENTED count with: one number per packet, on both sides
    assert sender._Packetizer__sequence_number_out == receiver._Packetizer__sequence_number_in == len(messages)


def test_sealing_counts_toward_the_next_key_exchange(link, monkeypatch):
    sender, receiver = link
    monkeypatch.setattr(Packetizer, "REKEY_BYTES", 100_000)
    data = memoryview(os.urandom(60_000))
    reader, messages = read_in_background(receiver, 4)
    _wire._send_sealed(sender, 1, data, [32_704, 60_000 - 32_704])
    assert not sender.need_rekey()  # 60 kB and their framing: under the limit
    _wire._send_sealed(sender, 1, data, [32_704, 60_000 - 32_704])
    assert sender.need_rekey()
    reader.join(BOUND)
    assert len(messages) == 4


def test_other_ciphers_are_left_to_paramiko(link):
    sender = link[0]
    counter_mode = Cipher(algorithms.AES(os.urandom(16)), modes.CTR(os.urandom(16))).encryptor()
    sender.set_outbound_cipher(counter_mode, 16, None, 0, b"", sdctr=True)
    assert not _wire._seals_here(sender)


def test_buffers_are_kept_per_connection_and_grow_when_needed(link):
    sender = link[0]
    plain, wire = _wire._buffers(sender, 100, 1000)
    assert len(plain) >= 100 and len(wire) >= 1000
    assert _wire._buffers(sender, 50, 500) == (plain, wire)
    bigger_plain, bigger_wire = _wire._buffers(sender, 100, 5000)
    assert bigger_plain is plain and len(bigger_wire) >= 5000
