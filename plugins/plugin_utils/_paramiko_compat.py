# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one door to Paramiko's private API: every private name of Paramiko the collection uses is
written in this module and nowhere else, checked when it is imported.

Why private names at all: Paramiko's public API cannot pipeline SFTP requests with every reply
checked, and its channel costs several copies per packet on the write path. What is used, and what
happens without it:

With a public fallback (taken when anything below is missing, when Paramiko is outside
SUPPORTED_VERSIONS, or when the environment variable MULTIPUSH_PARAMIKO_PUBLIC=1 is set; then
`USE_PRIVATE` is False):

- Write requests as ready-made SSH packets (_wire): `Channel._wait_for_send_window`,
  `Transport._send_message`. Public path: `Channel.sendall`.
- AES-GCM packets sealed in batches on the packetizer's own nonce, sequence number and rekey
  counters (_wire, `OutboundState`): the name-mangled `Packetizer.__*` outbound state and
  `Packetizer._trigger_rekey`. Security-critical and bound to Paramiko's Packetizer.send_message:
  the nonce must never be reused, the sequence number must match the server's. Public path:
  `Channel.sendall`. (Also per connection: a cipher other than AES-GCM, compression or packet
  dumps send one packet at a time through `Transport._send_message`.)
- SFTP's init sent right behind the subsystem request, one round trip less per connection
  (_sftp_start): `Channel._event_pending`, `Channel._wait_for_event`,
  `Transport._send_user_message`, and `SFTPClient._send_version` overridden to only read the
  server's version (with `BaseSFTP._read_packet`). Public path: `Channel.invoke_subsystem`, then
  Paramiko's public `SFTPClient(channel)`. (OpenSSH opens a session channel with a window of 0
  and grants one when the session starts, so against OpenSSH the init still waits for that.)
- The public-key userauth request sent right behind the service request, one round trip less per
  login (_auth): `AuthHandler._request_auth` and `_parse_service_accept`, and `Transport.auth_handler`
  set as Transport.auth_publickey does. Public path: `Transport.auth_publickey`.

Without a public fallback (checked here too, at import and on each new SFTP client; when missing,
starting a session fails with a message naming what is missing, whatever the switch says):

- Request pipelining (_sftp_pipeline, and the single requests of _sftp_tree and _sftp_data):
  `SFTPClient._async_request`, `_read_response`, `_request`, the client's `_lock` and `_expecting`
  (a request number reserved for a write request framed in place), the reply callback
  `_async_response` (see `ReplyOwner`) and `SFTPAttributes._from_msg` (attributes in replies read
  by the pipeline). Paramiko's public SFTPFile pipelining truncates on open, sends 32 KiB requests
  and never checks the replies of the last writes, and nothing public reads a statvfs or a
  limits@openssh.com reply: there is no public way to do a checked, ranged, pipelined upload.

Owner and group are added by the SFTP layer itself to the attributes of its setstats (public
SFTPAttributes fields): no private override is involved.
"""

from __future__ import annotations

import os
import socket
import threading

from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import SessionError, paramiko

SUPPORTED_VERSIONS = ((4, 0), (6, 0))  # from, up to (not including): what requirements.txt allows
PUBLIC_SWITCH = "MULTIPUSH_PARAMIKO_PUBLIC"

# Class -> private names the fast paths use; each has a public fallback.
FAST_PATH_NEEDS = {
    "Channel": ("_wait_for_send_window", "_event_pending", "_wait_for_event"),
    "Transport": ("_send_message", "_send_user_message"),
    "Packetizer": ("_trigger_rekey", "write_all", "need_rekey"),
    "SFTPClient": ("_send_version", "_read_packet"),
    "AuthHandler": ("_request_auth", "_parse_service_accept", "wait_for_response"),
}
# Class -> private names request pipelining uses; no public fallback.
PIPELINING_NEEDS = {
    "SFTPClient": ("_async_request", "_read_response", "_request"),
    "SFTPAttributes": ("_from_msg",),
}
CLIENT_STATE = ("_lock", "_expecting", "request_number")  # set by SFTPClient.__init__: checked per client
# Packetizer.send_message's outbound state (name-mangled): checked per packetizer by `outbound`.
_OUTBOUND = {name: "_Packetizer__" + name for name in (
    "write_lock", "block_engine_out", "block_size_out", "iv_out", "sequence_number_out", "sent_bytes",
    "sent_packets", "need_rekey", "received_bytes_overflow", "received_packets_overflow", "aead_out",
    "etm_out", "compress_engine_out", "dump_packets", "socket")}


def _version(module) -> tuple[int, ...]:
    parts = []
    for part in str(getattr(module, "__version__", "0")).split(".")[:3]:
        digits = "".join(character for character in part if character.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def missing(module, needs: dict) -> list[str]:
    """'Class.name' for each needed name `module` (paramiko) lacks."""
    absent = []
    for class_name, names in needs.items():
        owner = getattr(module, class_name, None)
        for name in names:
            if owner is None or not callable(getattr(owner, name, None)):
                absent.append(f"{class_name}.{name}")
    return absent


def check(module, environ) -> tuple[bool, list[str], list[str]]:
    """(use the private fast paths?, why not, what pipelining lacks) for this Paramiko and environment."""
    if module is None:
        return False, ["paramiko is not installed"], []
    why_public = []
    version = _version(module)
    low, high = SUPPORTED_VERSIONS
    if not low <= version < high:
        why_public.append(f"Paramiko {module.__version__} is outside the range checked "
                          f"({'.'.join(map(str, low))} to before {'.'.join(map(str, high))})")
    why_public += [f"Paramiko lacks {name}" for name in missing(module, FAST_PATH_NEEDS)]
    if environ.get(PUBLIC_SWITCH, "") not in ("", "0"):
        why_public.append(f"{PUBLIC_SWITCH}={environ[PUBLIC_SWITCH]} is set")
    return not why_public, why_public, missing(module, PIPELINING_NEEDS)


# The one switch: True takes the private fast paths, False Paramiko's public ones.
USE_PRIVATE, WHY_PUBLIC, PIPELINING_MISSING = check(paramiko, os.environ)


# ---------------------------------------------------------------------------------------------
# SFTP request machinery (no public fallback)
# ---------------------------------------------------------------------------------------------


def require_pipelining(sftp) -> None:
    """Refuse a client whose Paramiko lacks what request pipelining needs, naming it."""
    absent = list(PIPELINING_MISSING) + [f"SFTPClient.{name}" for name in CLIENT_STATE if not hasattr(sftp, name)]
    if absent:
        raise SessionError(f"this Paramiko ({getattr(paramiko, '__version__', '?')}) lacks what pipelined SFTP "
                           f"requests need: {', '.join(absent)}; install 'paramiko>=4,<6'", retryable=False,
                           unreachable=False)


class ReplyOwner:
    """The owner of pipelined requests: SFTPClient hands it each reply, as it does to an SFTPFile,
    through `_async_response`, while any response is read. Subclasses implement `on_reply`."""

    def on_reply(self, reply_type: int, msg, num: int) -> None:
        raise NotImplementedError

    def _async_response(self, reply_type, msg, num):  # Paramiko's callback name
        self.on_reply(reply_type, msg, num)


def send_request(sftp, owner: ReplyOwner, command: int, *args) -> int:
    """Send a request whose reply goes to owner.on_reply; its request number."""
    return sftp._async_request(owner, command, *args)


def reserve_request(sftp, owner: ReplyOwner) -> int:
    """A request number for a request the caller frames and sends itself; its reply goes to owner."""
    with sftp._lock:
        num = sftp.request_number
        sftp._expecting[num] = owner
        sftp.request_number += 1
    return num


def read_reply(sftp) -> None:
    """Read one reply and hand it to the owner of its request."""
    sftp._read_response()


def request(sftp, command: int, *args):
    """One request and its reply: (reply type, message). A failed status raises as Paramiko does
    (IOError/FileNotFoundError...)."""
    return sftp._request(command, *args)


def attributes(msg, name=None, longname=None):
    """The SFTPAttributes in a reply message."""
    return paramiko.SFTPAttributes._from_msg(msg, name, longname)


# ---------------------------------------------------------------------------------------------
# SFTP start (public fallback: invoke_subsystem and SFTPClient)
# ---------------------------------------------------------------------------------------------


def request_subsystem_with(transport, channel, name: str, first_data: bytes) -> None:
    """Ask for the subsystem and send `first_data` right behind the request, then wait for the
    answer (raises as Channel.invoke_subsystem does when it is refused)."""
    message = paramiko.Message()
    message.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
    message.add_int(channel.remote_chanid)
    message.add_string("subsystem")
    message.add_boolean(True)
    message.add_string(name)
    channel._event_pending()
    transport._send_user_message(message)
    channel.sendall(first_data)
    channel._wait_for_event()


def sftp_client(channel, init_sent: bool):
    """An SFTPClient on `channel`; init_sent: its SSH_FXP_INIT already went out (see
    request_subsystem_with), only the server's version is to be read."""
    client = _InitSentClient(channel) if init_sent else paramiko.SFTPClient(channel)
    require_pipelining(client)
    return client


if paramiko is not None:
    from paramiko.sftp import CMD_VERSION, SFTPError

    class _InitSentClient(paramiko.SFTPClient):
        def _send_version(self):
            kind, data = self._read_packet()
            if kind != CMD_VERSION:
                raise SFTPError("Incompatible sftp protocol")
            return int.from_bytes(data[:4], "big")

    class _UserauthBehindService(paramiko.AuthHandler):
        """Sends the userauth request right behind the service request instead of on the server's
        accept: the server handles one connection's messages in order, so the request finds the
        service started, and the answer to both comes in one round trip."""

        sent_early = False

        def _request_auth(self):
            # Marked before anything goes out: the accept may be handled (in the transport's
            # thread) while the request is still being signed here.
            self.sent_early = True
            super()._request_auth()
            accepted = paramiko.Message()
            accepted.add_string("ssh-userauth")
            accepted.rewind()
            super()._parse_service_accept(accepted)

        def _parse_service_accept(self, m):
            if not self.sent_early:
                super()._parse_service_accept(m)

else:  # pragma: no cover
    _InitSentClient = _UserauthBehindService = None


def auth_publickey(transport, username: str, key) -> list:
    """Transport.auth_publickey, with the userauth request sent behind the service request. An RSA
    key waits for the server's accept as before when the server's signature algorithms
    (server-sig-algs, which arrive right after the key exchange) are not in yet: its algorithm is
    chosen from them."""
    rsa = "rsa" in key.get_name()
    if not USE_PRIVATE or (rsa and "server-sig-algs" not in transport.server_extensions):
        return transport.auth_publickey(username, key)
    if not transport.is_active() or not transport.initial_kex_done:
        raise paramiko.SSHException("No existing session")
    event = threading.Event()
    transport.auth_handler = _UserauthBehindService(transport)
    transport.auth_handler.auth_publickey(username, key, event)
    return transport.auth_handler.wait_for_response(event)


# ---------------------------------------------------------------------------------------------
# Channel data and sealed packets (public fallback: Channel.sendall)
# ---------------------------------------------------------------------------------------------


def wait_for_send_window(channel, wanted: int) -> int:
    """Channel.send's wait for send window, under channel.lock: bytes granted, 0 if closed."""
    return channel._wait_for_send_window(wanted)


def send_message(transport, message) -> None:
    """Transport's send of one message (anything with asbytes()), through its packetizer."""
    transport._send_message(message)


class OutboundState:
    """A packetizer's outbound state, read and advanced as Packetizer.send_message does."""

    def __init__(self, packetizer, state: dict):
        self.packetizer = packetizer
        self._state = state

    def _get(self, name):
        return self._state[_OUTBOUND[name]]

    @property
    def write_lock(self) -> threading.RLock:
        return self._get("write_lock")

    @property
    def cipher(self):
        return self._get("block_engine_out")

    @property
    def block_size(self) -> int:
        return self._get("block_size_out")

    @property
    def nonce(self) -> bytes:
        return self._get("iv_out")

    def seals_aes_gcm(self) -> bool:
        """Whether this packetizer encrypts with AES-GCM, uncompressed, with no packet dumps."""
        return (self._get("aead_out") is True and not self._get("etm_out")
                and callable(getattr(self.cipher, "encrypt_into", None))
                and self._get("compress_engine_out") is None and not self._get("dump_packets"))

    def sent(self, nonce: bytes, packets: int, wire: memoryview) -> None:
        """Record `packets` sealed packets (the next nonce, sequence number), send their bytes, count
        them toward the next key exchange. Call with write_lock held."""
        state = self._state
        state[_OUTBOUND["iv_out"]] = nonce
        state[_OUTBOUND["sequence_number_out"]] = (self._get("sequence_number_out") + packets) & 0xFFFFFFFF
        if isinstance(self._get("socket"), socket.socket):
            self.packetizer.write_all(wire)
        else:  # a ProxyJump channel or a ProxyCommand takes bytes
            self.packetizer.write_all(bytes(wire))
        state[_OUTBOUND["sent_bytes"]] += len(wire)
        state[_OUTBOUND["sent_packets"]] += packets
        if ((self._get("sent_packets") >= self.packetizer.REKEY_PACKETS
             or self._get("sent_bytes") >= self.packetizer.REKEY_BYTES) and not self._get("need_rekey")):
            state[_OUTBOUND["received_bytes_overflow"]] = 0
            state[_OUTBOUND["received_packets_overflow"]] = 0
            self.packetizer._trigger_rekey()


def outbound(packetizer) -> OutboundState | None:
    """The packetizer's outbound state, or None where it is not kept as this module expects."""
    state = vars(packetizer)
    if any(name not in state for name in _OUTBOUND.values()):
        return None
    return OutboundState(packetizer, state)
