# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The write path's SSH packets, put on the wire with less work per packet than Paramiko's channel.

A write request is up to 255 KiB: eight SSH packets of 32 KiB. Channel.send builds a paramiko.Message
for each (the slice copied through add_string and a BytesIO, then once more by asbytes), and the
packetizer pads, encrypts and sends each alone: per packet one lock, one read of random padding,
four more copies and one send call. Here:

- every packet's header is packed in front of its slice (one copy), and the transport sends it as
  Paramiko does: `send_channel_data` with any cipher;
- with AES-GCM (what the connection setup asks for first), all the packets the send window allows
  are sealed under one hold of the packetizer's write lock, each encrypted into its place in one
  buffer that goes out in one send: `_send_sealed`.

What stays Paramiko's: the send window (taken under the channel's lock, waited for as Channel.send
does), the packet size limit, the hold on user packets while keys are re-exchanged, the cipher's
keys and nonce, the sequence numbers and the byte counts that trigger the next key exchange. The
private parts of Paramiko this takes are reached through _paramiko_compat only; with its switch
off (`USE_PRIVATE` False: a Paramiko without them, or MULTIPUSH_PARAMIKO_PUBLIC=1) every write
goes through Channel.sendall. Why each step pays off (CPU per GiB on one connection) is in
tests/bench/results/NOTES.md.
"""

from __future__ import annotations

import os
import socket
import struct
import time
import weakref

from ansible_collections.multipush.sftp.plugins.plugin_utils import _paramiko_compat
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import paramiko

if paramiko is not None:
    from paramiko.common import MSG_CHANNEL_DATA

_CHANNEL_DATA_HEAD = struct.Struct(">BII")  # message type, recipient channel, data length
_SEALED_HEAD = struct.Struct(">BBII")  # padding length, then the channel data head
_PACKET_LENGTH = struct.Struct(">I")  # in clear: AES-GCM's associated data (RFC 5647, 7.3)
_GCM_TAG = 16  # bytes after each sealed packet
_NONCE_COUNTER = slice(4, 12)  # RFC 5647, 7.1: the last 8 bytes of the 12-byte nonce count packets

# With the door's switch on (see _paramiko_compat.USE_PRIVATE): whether AES-GCM packets are sealed
# here when the packetizer allows it (see `_seals_here`); False hands them to the transport one by one.
SEAL_IN_BATCHES = True

_SEALING_BUFFERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # packetizer -> (plaintext, wire)


class _ChannelData:
    """An SSH_MSG_CHANNEL_DATA message already in its wire form, handed to Paramiko's transport
    in place of a paramiko.Message (which its packetizer only asks for asbytes())."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def asbytes(self) -> bytes:
        return self.data


def send_channel_data(channel, data: memoryview) -> None:
    """Channel.sendall for the write path: the same bytes on the wire, with less CPU per packet (one
    packet at a time costs less than Channel.sendall, sealed batches less again; figures in
    tests/bench/results/NOTES.md)."""
    if not _paramiko_compat.USE_PRIVATE:
        channel.sendall(data)
        return
    transport = channel.transport
    while data:
        sizes = _take_send_window(channel, len(data))
        _while_clear_to_send(transport, _send_packets, transport, channel.remote_chanid, data, sizes)
        data = data[sum(sizes):]


def _send_packets(transport, channel_id: int, data: memoryview, sizes: list[int]) -> None:
    """One SSH_MSG_CHANNEL_DATA packet per size, while no key exchange can start: sealed here when
    the packetizer allows it (asked under the hold, as a key exchange may change the cipher), else
    handed to Paramiko's transport one by one."""
    packetizer = transport.packetizer
    if SEAL_IN_BATCHES and _seals_here(packetizer):
        _send_sealed(packetizer, channel_id, data, sizes)
        return
    offset = 0
    for size in sizes:
        head = _CHANNEL_DATA_HEAD.pack(MSG_CHANNEL_DATA, channel_id, size)
        _paramiko_compat.send_message(transport, _ChannelData(head + data[offset:offset + size]))
        offset += size


def _take_send_window(channel, wanted: int) -> list[int]:
    """Packet sizes for up to `wanted` bytes: waits for some send window as Channel.send does, then
    takes what more is open without waiting."""
    with channel.lock:
        # the wait answers 0 for a closed channel, where Channel.sendall would spin
        size = 0 if channel.closed else _paramiko_compat.wait_for_send_window(channel, wanted)
        if size == 0:
            raise socket.error("Socket is closed")
        sizes = [size]
        taken = size
        while taken < wanted and channel.out_window_size > 0:
            size = _paramiko_compat.wait_for_send_window(channel, wanted - taken)
            if size == 0:
                break
            sizes.append(size)
            taken += size
    return sizes


def _seals_here(packetizer) -> bool:
    """Whether this packetizer encrypts with AES-GCM, uncompressed, and keeps its outbound state
    where `_send_sealed` reads it. Asked per request: the cipher is chosen at login and again at
    every key exchange."""
    state = _paramiko_compat.outbound(packetizer)
    return state is not None and state.seals_aes_gcm()


def _while_clear_to_send(transport, send, *args) -> None:
    """The hold Paramiko's transport puts on user messages: user packets wait while keys are re-exchanged, and no
    exchange starts while they are being sent."""
    deadline = time.monotonic() + transport.clear_to_send_timeout
    while True:
        transport.clear_to_send.wait(0.1)
        if not transport.active:
            raise EOFError("the SSH connection is closed")
        transport.clear_to_send_lock.acquire()
        if transport.clear_to_send.is_set():
            break
        transport.clear_to_send_lock.release()
        if time.monotonic() > deadline:
            raise paramiko.SSHException("Key-exchange timed out waiting for key negotiation")
    try:
        send(*args)
    finally:
        transport.clear_to_send_lock.release()


def _send_sealed(packetizer, channel_id: int, data: memoryview, sizes: list[int]) -> None:
    """Seal one SSH_MSG_CHANNEL_DATA packet per size with AES-GCM and send them together, keeping
    the packetizer's nonce, sequence number and rekey counts as Packetizer.send_message does."""
    state = _paramiko_compat.outbound(packetizer)
    with state.write_lock:
        engine = state.cipher
        block = state.block_size
        nonce = state.nonce
        fixed, counter = nonce[:4], int.from_bytes(nonce[_NONCE_COUNTER], "big")
        # Packetizer._build_packet's padding: at least 4 bytes, the encrypted part a whole number of blocks
        paddings = [3 + block - ((_CHANNEL_DATA_HEAD.size + size + 4) % block) for size in sizes]
        random_padding = os.urandom(sum(paddings))  # as OpenSSH and Paramiko pad: random bytes
        wire_bytes = sum(sizes) + sum(paddings) + len(sizes) * (_PACKET_LENGTH.size + _SEALED_HEAD.size + _GCM_TAG)
        plain, wire = _buffers(packetizer, _SEALED_HEAD.size + max(sizes) + max(paddings), wire_bytes)
        position = offset = padded = 0
        for size, padding in zip(sizes, paddings):
            end = _SEALED_HEAD.size + size + padding
            _SEALED_HEAD.pack_into(plain, 0, padding, MSG_CHANNEL_DATA, channel_id, size)
            plain[_SEALED_HEAD.size:end - padding] = data[offset:offset + size]
            plain[end - padding:end] = random_padding[padded:padded + padding]
            _PACKET_LENGTH.pack_into(wire, position, end)
            sealed = position + _PACKET_LENGTH.size
            engine.encrypt_into(fixed + counter.to_bytes(8, "big"), plain[:end], wire[position:sealed],
                                wire[sealed:sealed + end + _GCM_TAG])
            counter += 1
            position = sealed + end + _GCM_TAG
            offset += size
            padded += padding
        state.sent(fixed + counter.to_bytes(8, "big"), len(sizes), wire[:wire_bytes])


def _buffers(packetizer, plain_bytes: int, wire_bytes: int) -> tuple[memoryview, memoryview]:
    """The packetizer's plaintext and wire buffers, at least this large. Kept from batch to batch:
    fresh buffers cost more per packet (memory the kernel maps again on first touch)."""
    plain, wire = _SEALING_BUFFERS.get(packetizer, (b"", b""))
    if len(plain) < plain_bytes:
        plain = memoryview(bytearray(plain_bytes))
    if len(wire) < wire_bytes:
        wire = memoryview(bytearray(wire_bytes))
    _SEALING_BUFFERS[packetizer] = (plain, wire)
    return plain, wire
