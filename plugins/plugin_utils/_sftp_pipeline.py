# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""SFTP requests in flight on one session, every reply checked: the `Pipeline`, the framing of
write requests sent as they are, and the attributes that requests carry and replies bring.

Paramiko's SFTPFile cannot do what a ranged upload needs: it always truncates on put, sends
32 KiB requests, and in pipelined mode never checks the acknowledgements of the last writes.
`Pipeline` sends requests through SFTPClient's request machinery (reached through
_paramiko_compat, which has no public equivalent for it) and checks every reply, so a failed write
can never pass silently.
"""

from __future__ import annotations

import stat as stat_module
import struct
from collections import deque

from ansible_collections.multipush.sftp.plugins.plugin_utils import _paramiko_compat
from ansible_collections.multipush.sftp.plugins.plugin_utils._bandwidth import request_bytes, wire_bytes
from ansible_collections.multipush.sftp.plugins.plugin_utils._plan import RemoteEntry
from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp_errors import (
    SFTP_EOF, SFTP_OK, STATUS_NAMES, RemoteError, remedy,
)
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import paramiko
from ansible_collections.multipush.sftp.plugins.plugin_utils._wire import send_channel_data

if paramiko is not None:
    from paramiko.sftp import CMD_DATA, CMD_STATUS, CMD_WRITE
    from paramiko.sftp_attr import SFTPAttributes

# Enough requests in flight to cover sshd's 2 MiB channel window several times over.
MAX_OUTSTANDING_BYTES = 8 * 1024 * 1024
MAX_OUTSTANDING_REQUESTS = 64
# Requests of a batch of small files (opens, closes, attributes, renames) carry no data: the byte
# cap above still bounds what is in flight, so their count is capped only loosely.
BATCH_OUTSTANDING_REQUESTS = 4096

# SSH_FXP_WRITE: uint32 length, byte type, uint32 request id, string handle, uint64 offset, string data
_WRITE_HEAD = struct.Struct(">IBII")  # length, type, id, handle length
_WRITE_TAIL = struct.Struct(">QI")  # offset, data length


def write_header_size(handle: bytes) -> int:
    return _WRITE_HEAD.size + len(handle) + _WRITE_TAIL.size


def new_attributes(mode: int | None = None, mtime: float | None = None) -> "SFTPAttributes":
    """SFTP attributes carrying a mode and/or an mtime (atime set to the same)."""
    attrs = SFTPAttributes()
    if mode is not None:
        attrs.st_mode = mode
    if mtime is not None:
        attrs.st_atime = int(mtime)
        attrs.st_mtime = int(mtime)
    return attrs


def attributes_in(msg, name=None, longname=None) -> "SFTPAttributes":
    """The attributes an ATTRS or NAME reply carries."""
    return _paramiko_compat.attributes(msg, name, longname)


def entry_of(attrs) -> RemoteEntry:
    """SFTP attributes as the planner's RemoteEntry."""
    mode = attrs.st_mode or 0
    if stat_module.S_ISDIR(mode):
        kind = "directory"
    elif stat_module.S_ISLNK(mode):
        kind = "link"
    elif stat_module.S_ISREG(mode):
        kind = "file"
    else:
        kind = "other"
    return RemoteEntry(kind=kind, size=attrs.st_size or 0, mtime=int(attrs.st_mtime or 0),
                       mode=stat_module.S_IMODE(mode))


class Pipeline(_paramiko_compat.ReplyOwner):
    """Requests in flight on one SFTP session, every reply checked.

    Registered with SFTPClient as the owner of its requests, so Paramiko hands each reply to
    `on_reply` while any response is being read.
    """

    def __init__(self, sftp, context: str, max_requests: int = MAX_OUTSTANDING_REQUESTS, tolerant: bool = False):
        self.sftp = sftp
        self.context = context
        self.max_requests = max_requests
        # tolerant: a failed status is kept as the reply (CMD_STATUS, (code, text)) for the caller to judge
        self.tolerant = tolerant
        self.outstanding: deque = deque()  # (num, nbytes in flight, label, on_data)
        self.replies: dict = {}
        self.error: RemoteError | None = None
        self.acked_bytes = 0
        self.in_flight_bytes = 0
        self.sent_bytes = 0
        # The push's bandwidth budget (_bandwidth.Budget), kept on the session by RemoteFiles: every
        # request waits for its bytes' slot before it goes out. None: no limit, no cost.
        self.budget = getattr(sftp, "multipush_budget", None)

    def send(self, command: int, *args, nbytes: int = 0, label: str = "", on_data=None, incoming: int = 0) -> int:
        """Send a request. nbytes: data it carries out; incoming: data its reply brings back (both
        count against the bytes in flight); on_data(msg): takes a CMD_DATA reply as it arrives
        instead of keeping it."""
        if self.budget is not None:
            self.budget.take(request_bytes(args))
        num = _paramiko_compat.send_request(self.sftp, self, command, *args)
        self._track(num, nbytes, label, on_data, incoming)
        return num

    def _track(self, num: int, nbytes: int, label: str, on_data=None, incoming: int = 0) -> None:
        """Count a request just sent until its reply comes."""
        self.outstanding.append((num, nbytes + incoming, label, on_data))
        self.in_flight_bytes += nbytes + incoming
        self.sent_bytes += nbytes

    def on_reply(self, reply_type: int, msg, num: int) -> None:
        expected_num, nbytes, label, on_data = self.outstanding.popleft()
        if expected_num != num:  # OpenSSH answers in order; anything else is a protocol breach
            self.error = self.error or RemoteError(f"{self.context}: out-of-order SFTP reply {num}")
            return
        self.in_flight_bytes -= nbytes
        if on_data is not None and reply_type == CMD_DATA:
            on_data(msg)
            return
        if reply_type != CMD_STATUS:
            self.replies[num] = (reply_type, msg)
            return
        code = msg.get_int()
        if code == SFTP_EOF and on_data is not None:
            return  # read past the end: the file is shorter than asked, which the caller sees in what came
        text = msg.get_text()
        if code != SFTP_OK and self.tolerant:
            self.replies[num] = (CMD_STATUS, (code, text))
        elif code != SFTP_OK:
            self.error = self.error or RemoteError(
                f"{self.context}: {label or 'request'} failed: {text or STATUS_NAMES.get(code, code)}{remedy(code)}",
                code)
        else:
            self.acked_bytes += nbytes

    def send_write(self, handle: bytes, offset: int, request: bytearray, label: str = "") -> int:
        """Send a write request whose data was read into `request` behind room for its header
        (see `write_header_size`). The header is filled in place and the buffer goes to the channel as
        it is: Paramiko's own framing would copy every byte several times."""
        if self.budget is not None:
            self.budget.take(wire_bytes(len(request)))
        num = _paramiko_compat.reserve_request(self.sftp, self)
        nbytes = len(request) - write_header_size(handle)
        _WRITE_HEAD.pack_into(request, 0, len(request) - 4, CMD_WRITE, num, len(handle))
        request[_WRITE_HEAD.size:_WRITE_HEAD.size + len(handle)] = handle
        _WRITE_TAIL.pack_into(request, _WRITE_HEAD.size + len(handle), offset, nbytes)
        self._track(num, nbytes, label)
        send_channel_data(self.sftp.sock, memoryview(request))
        return num

    def wait_one(self) -> None:
        _paramiko_compat.read_reply(self.sftp)

    def throttle(self) -> None:
        # Take in every reply already here, not only when the window is full: the acknowledged
        # offset is what a cut connection keeps, so it must stay current.
        while self.outstanding and self.sftp.sock.recv_ready():
            self.wait_one()
        while self.outstanding and (len(self.outstanding) >= self.max_requests
                                    or self.in_flight_bytes >= MAX_OUTSTANDING_BYTES):
            self.wait_one()
        self.raise_error()

    def drain(self) -> None:
        while self.outstanding:
            self.wait_one()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def reply(self, num: int, expected: int, what: str):
        """The message of a reply that carries data (a handle, attributes), checked for its type."""
        reply_type, msg = self.replies.pop(num, (None, None))
        if reply_type != expected:
            raise RemoteError(f"{self.context}: {what}: unexpected SFTP reply {reply_type}")
        return msg
