# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""SFTP operations one worker needs, on top of Paramiko's SFTPClient.

Paramiko's SFTPFile cannot do what a ranged upload needs: it always truncates on put, sends
32 KiB requests, and in pipelined mode never checks the acknowledgements of the last writes.
`Pipeline` sends requests through SFTPClient's request machinery and checks every reply, so a
failed write can never pass silently; `RemoteFiles` wraps the handful of operations the engine
uses and turns their failures into `RemoteError` (deterministic, never retried) or
`ConnectionLost` (the connection is gone; a fresh one may succeed).
"""

from __future__ import annotations

import errno
import os
import socket
import stat as stat_module
import struct
from collections import deque

from ansible_collections.multipush.sftp.plugins.plugin_utils._plan import RemoteEntry
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import paramiko
from ansible_collections.multipush.sftp.plugins.plugin_utils._wire import send_channel_data

if paramiko is not None:
    from paramiko.sftp import (
        CMD_ATTRS, CMD_CLOSE, CMD_DATA, CMD_EXTENDED, CMD_EXTENDED_REPLY, CMD_FSETSTAT, CMD_FSTAT, CMD_HANDLE,
        CMD_LSTAT, CMD_MKDIR, CMD_NAME, CMD_OPEN, CMD_OPENDIR, CMD_READ, CMD_READDIR, CMD_SETSTAT, CMD_STATUS,
        CMD_WRITE, SFTP_EOF, SFTP_FLAG_CREATE, SFTP_FLAG_EXCL, SFTP_FLAG_READ, SFTP_FLAG_TRUNC, SFTP_FLAG_WRITE,
        SFTP_NO_SUCH_FILE, SFTP_OK, int64,
    )
    from paramiko.sftp_attr import SFTPAttributes

# Paramiko's own request size; safe with every server. Anything larger only after the server
# said so through limits@openssh.com: a request over its limit kills the session.
DEFAULT_WRITE_SIZE = 32768
READ_BLOCK = 4 * 1024 * 1024
# Enough requests in flight to cover sshd's 2 MiB channel window several times over.
MAX_OUTSTANDING_BYTES = 8 * 1024 * 1024
MAX_OUTSTANDING_REQUESTS = 64
OWNER_ONLY = 0o600  # temp files until they are verified and put in place
# Requests of a batch of small files (opens, closes, attributes, renames) carry no data: the byte
# cap above still bounds what is in flight, so their count is capped only loosely.
BATCH_OUTSTANDING_REQUESTS = 4096
SFTP_OP_UNSUPPORTED = 8
NAMES_PER_READDIR = 100  # OpenSSH's sftp-server sends at most this many names per reply
PERMISSION_REMEDY = ("; the SSH user may not write there: push into a directory it owns, fix the permissions, "
                     "or use become")
STATUS_NAMES = {1: "end of file", 2: "no such file", 3: "permission denied", 4: "failure", 5: "bad message",
                6: "no connection", 7: "connection lost", 8: "operation unsupported"}


class RemoteError(Exception):
    """The server refused an operation. Retrying on another connection would not help."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class ConnectionLost(Exception):
    """The SSH connection failed mid-operation. `acked` is how far the current range got;
    `sent` how many bytes went out for it (acknowledged or not)."""

    def __init__(self, message: str, acked: int = 0, sent: int = 0):
        super().__init__(message)
        self.acked = acked
        self.sent = sent


def _attributes(mode: int | None = None, mtime: float | None = None) -> "SFTPAttributes":
    """SFTP attributes carrying a mode and/or an mtime (atime set to the same)."""
    attrs = SFTPAttributes()
    if mode is not None:
        attrs.st_mode = mode
    if mtime is not None:
        attrs.st_atime = int(mtime)
        attrs.st_mtime = int(mtime)
    return attrs


def _status_text(status: tuple[int, str]) -> str:
    code, text = status
    return text or str(STATUS_NAMES.get(code, code))


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, (OSError, EOFError)) and str(exc) else f"{type(exc).__name__}: {text}"


# SSH_FXP_WRITE: uint32 length, byte type, uint32 request id, string handle, uint64 offset, string data
_WRITE_HEAD = struct.Struct(">IBII")  # length, type, id, handle length
_WRITE_TAIL = struct.Struct(">QI")  # offset, data length


def write_header_size(handle: bytes) -> int:
    return _WRITE_HEAD.size + len(handle) + _WRITE_TAIL.size


class Pipeline:
    """Requests in flight on one SFTP session, every reply checked.

    Registered with SFTPClient as the owner of its requests, so Paramiko hands each reply to
    `_async_response` while any response is being read.
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

    def send(self, command: int, *args, nbytes: int = 0, label: str = "", on_data=None, incoming: int = 0) -> int:
        """Send a request. nbytes: data it carries out; incoming: data its reply brings back (both
        count against the bytes in flight); on_data(msg): takes a CMD_DATA reply as it arrives
        instead of keeping it."""
        num = self.sftp._async_request(self, command, *args)
        self._track(num, nbytes, label, on_data, incoming)
        return num

    def _track(self, num: int, nbytes: int, label: str, on_data=None, incoming: int = 0) -> None:
        """Count a request just sent until its reply comes."""
        self.outstanding.append((num, nbytes + incoming, label, on_data))
        self.in_flight_bytes += nbytes + incoming
        self.sent_bytes += nbytes

    def _async_response(self, reply_type, msg, num):
        expected_num, nbytes, label, on_data = self.outstanding.popleft()
        if expected_num != num:  # OpenSSH answers in order; anything else is a protocol breach
            self.error = self.error or RemoteError(f"{self.context}: out-of-order SFTP reply {num}")
            return
        self.in_flight_bytes -= nbytes
        if on_data is not None and reply_type == CMD_DATA:
            on_data(msg)
            return
        if reply_type == CMD_STATUS:
            code = msg.get_int()
            if code == SFTP_EOF and on_data is not None:
                return  # read past the end: the file is shorter than asked, which the caller sees in what came
            text = msg.get_text()
            if code != SFTP_OK and self.tolerant:
                self.replies[num] = (CMD_STATUS, (code, text))
                return
            if code != SFTP_OK:
                self.error = self.error or RemoteError(
                    f"{self.context}: {label or 'request'} failed: {text or STATUS_NAMES.get(code, code)}", code)
                return
            self.acked_bytes += nbytes
        else:
            self.replies[num] = (reply_type, msg)

    def send_write(self, handle: bytes, offset: int, request: bytearray, label: str = "") -> int:
        """Send a write request whose data was read into `request` behind room for its header
        (see `write_header_size`). The header is filled in place and the buffer goes to the channel as
        it is: Paramiko's own framing would copy every byte several times."""
        sftp = self.sftp
        with sftp._lock:
            num = sftp.request_number
            sftp._expecting[num] = self
            sftp.request_number += 1
        nbytes = len(request) - write_header_size(handle)
        _WRITE_HEAD.pack_into(request, 0, len(request) - 4, CMD_WRITE, num, len(handle))
        request[_WRITE_HEAD.size:_WRITE_HEAD.size + len(handle)] = handle
        _WRITE_TAIL.pack_into(request, _WRITE_HEAD.size + len(handle), offset, nbytes)
        self._track(num, nbytes, label)
        send_channel_data(sftp.sock, memoryview(request))
        return num

    def wait_one(self) -> None:
        self.sftp._read_response()

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


class RemoteFiles:
    """The operations of one worker's SFTP session."""

    def __init__(self, transport, sftp, write_size: int | None = None):
        self.transport = transport
        self.sftp = sftp
        self.requested_write_size = write_size
        # Asked now, read later: the server answers in order, so the reply is in before the
        # replies of the first job, and login does not wait a round trip for it.
        self._limits = Pipeline(sftp, "limits@openssh.com", tolerant=True)
        self._limits_request = self._limits.send(CMD_EXTENDED, "limits@openssh.com")
        self._write_size: int | None = None
        self._read_size: int | None = None

    # -- error mapping -------------------------------------------------------------------------

    def _lost_or_refused(self, exc: BaseException, context: str, acked: int = 0, sent: int = 0) -> Exception:
        if isinstance(exc, (RemoteError, ConnectionLost)):
            return exc
        if isinstance(exc, (EOFError, socket.timeout)) or not self.transport.is_active():
            return ConnectionLost(f"{context}: connection lost ({_describe(exc)})", acked, sent)
        if isinstance(exc, paramiko.SSHException):
            return ConnectionLost(f"{context}: {_describe(exc)}", acked, sent)
        if isinstance(exc, OSError):
            code = {errno.ENOENT: 2, errno.EACCES: 3}.get(exc.errno)
            remedy = PERMISSION_REMEDY if code == 3 else ""
            return RemoteError(f"{context}: {exc.strerror or exc}{remedy}", code)
        return RemoteError(f"{context}: {_describe(exc)}")

    def _call(self, context: str, function, *args):
        try:
            return function(*args)
        except Exception as exc:  # every failure is classified, none is dropped
            raise self._lost_or_refused(exc, context) from None

    # -- extensions ----------------------------------------------------------------------------

    @property
    def write_size_known(self) -> bool:
        """Whether the write size can be had without waiting (the limits reply is in)."""
        return self._write_size is not None or not self._limits.outstanding

    @property
    def write_size(self) -> int:
        """Bytes per write request: the user's request_size, never above the server's limit."""
        if self._write_size is None:
            self._read_limits()
        return self._write_size

    @property
    def read_size(self) -> int:
        """Bytes per read request: the server's limit (more would come back short)."""
        if self._read_size is None:
            self._read_limits()
        return self._read_size

    def _read_limits(self) -> None:
        self._limits.drain()
        reply_type, msg = self._limits.replies.pop(self._limits_request, (None, None))
        max_read = max_write = 0
        if reply_type == CMD_EXTENDED_REPLY:  # else a status: the server does not know the extension
            msg.get_int64()  # max packet length
            max_read = msg.get_int64()
            max_write = msg.get_int64()
        write_limit = max_write if max_write > 0 else DEFAULT_WRITE_SIZE
        self._write_size = min(self.requested_write_size or write_limit, write_limit)
        self._read_size = max_read if max_read > 0 else DEFAULT_WRITE_SIZE

    def fs_status(self, path: str) -> tuple[int | None, bool]:
        """(bytes available to the user, read-only?) at path (statvfs@openssh.com); (None, False) if unknown."""
        try:
            reply_type, msg = self.sftp._request(CMD_EXTENDED, "statvfs@openssh.com", path)
        except Exception:
            return None, False
        if reply_type != CMD_EXTENDED_REPLY:
            return None, False
        fields = [msg.get_int64() for _field in range(11)]
        frsize, bavail, flags = fields[1], fields[4], fields[9]
        return frsize * bavail, bool(flags & 0x1)  # SSH2_FXE_STATVFS_ST_RDONLY

    # -- metadata ------------------------------------------------------------------------------

    @staticmethod
    def _entry(attrs) -> RemoteEntry:
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

    def lstat(self, path: str) -> RemoteEntry | None:
        try:
            return self._entry(self.sftp.lstat(path))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._lost_or_refused(exc, f"lstat {path!r}") from None

    def stat(self, path: str) -> RemoteEntry | None:
        """What `path` leads to through symlinks; None when nothing does (missing, dangling, a loop)."""
        try:
            return self._entry(self.sftp.stat(path))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._lost_or_refused(exc, f"stat {path!r}") from None

    def readlink(self, path: str) -> str | None:
        try:
            return self.sftp.readlink(path)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._lost_or_refused(exc, f"readlink {path!r}") from None

    def realpath(self, path: str) -> str:
        """The server's canonical absolute path of `path` (SSH_FXP_REALPATH)."""
        return self._call(f"realpath {path!r}", self.sftp.normalize, path)

    def mkdir(self, path: str, mode: int) -> bool:
        """Create a directory; False when it already existed as a directory."""
        return self.mkdir_many([(path, mode)])[0]

    def setstat_many(self, items: list[tuple[str, int | None, float | None]]) -> None:
        """Set (path, mode, mtime) of many paths in one round trip; the first refusal fails the job."""
        pipeline = Pipeline(self.sftp, "set directory attributes", BATCH_OUTSTANDING_REQUESTS)
        try:
            for path, mode, mtime in items:
                pipeline.send(CMD_SETSTAT, path, _attributes(mode, mtime), label=f"set mode/mtime of {path!r}")
            pipeline.drain()
        except ConnectionLost:
            raise
        except RemoteError as exc:
            raise RemoteError(f"{exc}{PERMISSION_REMEDY if exc.code == 3 else ''}", exc.code) from None
        except Exception as exc:
            raise self._lost_or_refused(exc, "set directory attributes") from None

    def rename_over(self, source: str, target: str) -> None:
        """Atomically replace target with source (posix-rename@openssh.com, else plain rename)."""
        try:
            self.sftp.posix_rename(source, target)
            return
        except IOError as exc:
            if not self.transport.is_active() or "unsupported" not in str(exc).lower():
                raise self._lost_or_refused(exc, f"rename {source!r} to {target!r}") from None
        self._call(f"rename {source!r} to {target!r}", self.sftp.rename, source, target)

    def remove(self, path: str) -> None:
        try:
            self.sftp.remove(path)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._lost_or_refused(exc, f"remove {path!r}") from None

    def symlink(self, target: str, path: str) -> None:
        self._call(f"create symlink {path!r}", self.sftp.symlink, target, path)

    # -- file data -----------------------------------------------------------------------------

    def open_for_write(self, path: str, truncate: bool) -> bytes:
        """Open (creating it owner-only if missing) and return the raw handle.

        Workers writing ranges pass truncate=False: one late or retried worker must never
        wipe what the others wrote (the prototype's silent-corruption bug). Temp files are
        created, exclusively where asked, by allocate_many.
        """
        flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | (SFTP_FLAG_TRUNC if truncate else 0)
        reply_type, msg = self._call(f"open {path!r} for writing", self.sftp._request, CMD_OPEN, path, flags,
                                     _attributes(OWNER_ONLY))
        if reply_type != CMD_HANDLE:
            raise RemoteError(f"open {path!r}: unexpected SFTP reply {reply_type}")
        return msg.get_binary()

    def allocate_many(self, files: list[dict]) -> None:
        """Create temp files owner-only at their full size, in two round trips for the lot: every
        open, then every size and close (the server runs one session's requests in order).

        files: dicts {temp, size, exclusive}; an exclusive open fails when the file exists. The first
        refusal is raised once all replies are in, after closing whatever did open.
        """
        opening = Pipeline(self.sftp, "create temp files", BATCH_OUTSTANDING_REQUESTS, tolerant=True)
        handles: dict[int, bytes] = {}
        try:
            owner_only = _attributes(OWNER_ONLY)
            nums = []
            for item in files:
                flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC
                flags |= SFTP_FLAG_EXCL if item.get("exclusive") else 0
                nums.append(opening.send(CMD_OPEN, item["temp"], flags, owner_only, label=f"open {item['temp']!r}"))
            opening.drain()
            refused = None
            for index, num in enumerate(nums):
                reply_type, msg = opening.replies.pop(num, (None, None))
                if reply_type == CMD_HANDLE:
                    handles[index] = msg.get_binary()
                elif refused is None:
                    refused = (files[index], msg if reply_type == CMD_STATUS else (None, f"SFTP reply {reply_type}"))
            if refused is not None:
                self._close_quietly(handles.values())
                handles.clear()
                self._refuse_create(*refused)
            sizing = Pipeline(self.sftp, "allocate temp files", BATCH_OUTSTANDING_REQUESTS)
            for index, item in enumerate(files):
                attrs = SFTPAttributes()
                attrs.st_size = item["size"]
                sizing.send(CMD_FSETSTAT, handles[index], attrs, label=f"allocate {item['temp']!r}")
                sizing.send(CMD_CLOSE, handles.pop(index), label=f"close {item['temp']!r}")
            sizing.drain()
        except (RemoteError, ConnectionLost):
            raise
        except Exception as exc:
            raise self._lost_or_refused(exc, "create temp files") from None

    def _refuse_create(self, item: dict, status: tuple[int | None, str]) -> None:
        code = status[0]
        if item.get("exclusive") and self.lstat(item["temp"]) is not None:
            raise RemoteError(f"another push is writing {item['temp']!r} right now (same source, same "
                              "destination); let it finish, or remove that file if no push is running", code)
        remedy = PERMISSION_REMEDY if code == 3 else ""
        raise RemoteError(f"open {item['temp']!r} for writing: {_status_text(status)}{remedy}", code)

    def write_range(self, handle: bytes, path: str, local_fd: int, start: int, end: int, hasher=None,
                    hash_from: int | None = None, progress=None, meta: dict | None = None,
                    source: str = "the source") -> dict:
        """Write local bytes [start, end) at the same offsets of the remote file, every reply checked,
        and close the handle, whatever happens.

        hash_from < start means the bytes [hash_from, start) were already acknowledged by an
        earlier connection: they are hashed from the local file but not sent again.
        With `meta`, an fsetstat (mode, mtime) and an fstat follow the writes in the same
        pipeline, so a small file costs no extra round trip for them.
        The close follows the last request in the same pipeline: the server runs a session's
        requests in order, so it closes after the writes whether they succeeded or not, and the
        close's reply comes with the last write's instead of a round trip later (one per range).
        Returns {'size': remote size after writing (when meta asked for it)}.
        """
        pipeline = Pipeline(self.sftp, f"write to {path!r}")
        close_sent = False
        offset = start
        reported = 0
        try:
            if hasher is not None and hash_from is not None and hash_from < start:
                self.hash_local(local_fd, hash_from, start, hasher)
            header = write_header_size(handle)
            while offset < end:
                nbytes = min(self.write_size, end - offset)
                request = bytearray(header + nbytes)
                data = memoryview(request)[header:]
                if os.preadv(local_fd, [data], offset) != nbytes:
                    raise RemoteError(f"source {source!r} shrank while it was being sent to {path!r}; "
                                      "run the push again once it is no longer being written")
                if hasher is not None:
                    hasher.update(data)
                data.release()
                pipeline.throttle()
                pipeline.send_write(handle, offset, request, label=f"write at offset {offset}")
                offset += nbytes
                if progress is not None and pipeline.acked_bytes - reported >= READ_BLOCK:
                    progress(pipeline.acked_bytes - reported)
                    reported = pipeline.acked_bytes
            result = {}
            fstat_num = None
            if meta is not None:
                pipeline.send(CMD_FSETSTAT, handle, _attributes(meta["mode"], meta["mtime"]), label="set mode/mtime")
                fstat_num = pipeline.send(CMD_FSTAT, handle, label="stat")
            pipeline.send(CMD_CLOSE, handle, label="close")
            close_sent = True
            pipeline.drain()
            if fstat_num is not None:
                reply_type, msg = pipeline.replies.get(fstat_num, (None, None))
                if reply_type != CMD_ATTRS:
                    raise RemoteError(f"stat of {path!r} after writing returned no attributes")
                result["size"] = SFTPAttributes._from_msg(msg).st_size
        except (RemoteError, ConnectionLost):
            raise
        except Exception as exc:
            raise self._lost_or_refused(exc, f"write to {path!r}", acked=pipeline.acked_bytes,
                                        sent=pipeline.sent_bytes) from None
        finally:
            if progress is not None and pipeline.acked_bytes > reported:
                progress(pipeline.acked_bytes - reported)
            if not close_sent:
                # Failed before the close went out: close now, quietly (the first error is the one
                # that says how far the range got).
                self._close_quietly([handle])
        return result

    # -- many files at once ----------------------------------------------------------------------
    #
    # Small files are round-trip bound, not byte bound: each costs an open, a write, a close and a
    # rename. The methods below send the same request for many files back to back and read all the
    # replies once, so a batch costs one round trip per step instead of one per file and step.

    def write_small_files(self, files: list[dict], hashers: list | None = None, progress=None,
                          read_back: list | None = None) -> list[dict]:
        """Write whole small files to their temp paths: all opens, then every file's writes, fsetstat,
        fstat and close in one pipeline. Every reply is checked; the first refusal is raised once all
        replies are in, after closing whatever was left open.

        read_back: one hasher per file, fed what the target returns when the file is read back
        through the same handle after its writes, in the same pipeline (the server runs one
        session's requests in order): the target's copy checked without another round trip.

        files: dicts {local, temp, size, mtime, mode (None: the temp file stays owner-only)}.
        Returns per file {'size': its size on the target after writing, 'read': bytes read back}.
        """
        opening = Pipeline(self.sftp, "open temp files for writing", BATCH_OUTSTANDING_REQUESTS)
        writing = Pipeline(self.sftp, "write small files", BATCH_OUTSTANDING_REQUESTS)
        handles: dict[int, bytes] = {}  # file index -> handle not yet closed
        read_counts = [0] * len(files)
        try:
            flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC | (SFTP_FLAG_READ if read_back else 0)
            owner_only = _attributes(OWNER_ONLY)
            opens = [opening.send(CMD_OPEN, item["temp"], flags, owner_only, label=f"open {item['temp']!r}")
                     for item in files]
            try:
                opening.drain()
            finally:  # the files that did open must be closed even when another one was refused
                for index, num in enumerate(opens):
                    reply_type, msg = opening.replies.pop(num, (None, None))
                    if reply_type == CMD_HANDLE:
                        handles[index] = msg.get_binary()
            if len(handles) != len(files):
                raise RemoteError(f"open temp files for writing: {len(files) - len(handles)} of {len(files)} "
                                  "opens returned no handle")
            stats = []
            for index, item in enumerate(files):
                data = self._read_small(item)
                if hashers is not None:
                    hashers[index].update(data)
                handle, view = handles[index], memoryview(data)
                for position in range(0, len(view), self.write_size):
                    piece = view[position:position + self.write_size]
                    writing.throttle()
                    writing.send(CMD_WRITE, handle, int64(position), piece.tobytes(), nbytes=len(piece),
                                 label=f"write to {item['temp']!r} at offset {position}")
                writing.send(CMD_FSETSTAT, handle, _attributes(item.get("mode"), item["mtime"]),
                             label=f"set mode/mtime of {item['temp']!r}")
                stats.append(writing.send(CMD_FSTAT, handle, label=f"stat {item['temp']!r}"))
                if read_back is not None:
                    self._send_reads(writing, handle, item, read_back[index], read_counts, index)
                writing.send(CMD_CLOSE, handle, label=f"close {item['temp']!r}")
                del handles[index]
            writing.drain()
            if progress is not None:
                progress(writing.acked_bytes)
            return [{"size": SFTPAttributes._from_msg(writing.reply(num, CMD_ATTRS, f"stat {item['temp']!r}")).st_size,
                     "read": read_counts[index]} for index, (item, num) in enumerate(zip(files, stats))]
        except (RemoteError, ConnectionLost):
            self._close_quietly(handles.values())
            raise
        except Exception as exc:
            error = self._lost_or_refused(exc, "write small files", sent=writing.sent_bytes)
            if isinstance(error, RemoteError):
                self._close_quietly(handles.values())
            raise error from None

    def _send_reads(self, pipeline: Pipeline, handle: bytes, item: dict, hasher, counts: list, index: int) -> None:
        """Read requests for a whole file just written; each reply's data goes to the hasher as it
        arrives (replies come in order), so nothing is kept."""
        def take(msg, hasher=hasher, index=index):
            data = msg.get_string()
            hasher.update(data)
            counts[index] += len(data)

        for offset in range(0, item["size"], self.read_size):
            length = min(self.read_size, item["size"] - offset)
            pipeline.throttle()
            pipeline.send(CMD_READ, handle, int64(offset), length, incoming=length, on_data=take,
                          label=f"read back {item['temp']!r} at offset {offset}")

    @staticmethod
    def _read_small(item: dict) -> bytes:
        with open(item["local"], "rb") as local:
            data = local.read(item["size"] + 1)
        if len(data) != item["size"]:
            raise RemoteError(f"source {item['local']!r} changed while it was being pushed ({len(data)} bytes, "
                              f"{item['size']} expected); nothing was put in place for it. Push again once it is "
                              "no longer being written")
        return data

    def _close_quietly(self, handles) -> None:
        """After a refusal: close what is still open (the refusal is the error that matters)."""
        if not handles or not self.transport.is_active():
            return
        closing = Pipeline(self.sftp, "close", BATCH_OUTSTANDING_REQUESTS)
        try:
            for handle in list(handles):
                closing.send(CMD_CLOSE, handle)
            while closing.outstanding:
                closing.wait_one()
        except Exception:
            pass

    def survey(self, stat_paths: list[str], directories: list[str],
               expected: dict[str, int] | None = None) -> tuple[dict[str, RemoteEntry | None], dict]:
        """lstat of `stat_paths` and the entries of `directories`, all read together.

        A round sends every lstat and opendir, then per directory as many readdirs as its expected
        entry count needs (a reply holds up to 100 names in OpenSSH) followed by its close: two
        round trips in all when the expectation holds. A directory that had more entries is read
        again with twice the readdirs. A directory that does not exist lists as None, and so does a
        path that is not a directory (OpenSSH says "no such file" for both; its entry tells them apart),
        whichever request says so: OpenSSH refuses the opendir, AsyncSSH hands out a handle and
        refuses its first readdir.
        Returns ({path: entry or None}, {directory: {name: entry} or None}).
        """
        entries: dict[str, RemoteEntry | None] = {}
        listing: dict[str, dict[str, RemoteEntry] | None] = {}
        expected = expected or {}
        readdirs = {path: 2 + (expected.get(path, 0) + 2) // NAMES_PER_READDIR for path in directories}
        pipeline = Pipeline(self.sftp, "list directories", BATCH_OUTSTANDING_REQUESTS, tolerant=True)
        try:
            stats = [(path, pipeline.send(CMD_LSTAT, path, label=f"stat {path!r}")) for path in stat_paths]
            while readdirs:
                opens = [(path, pipeline.send(CMD_OPENDIR, path, label=f"open directory {path!r}"))
                         for path in readdirs]
                pipeline.drain()
                for path, num in stats:
                    entries[path] = self._stat_reply(path, *pipeline.replies.pop(num))
                stats = []
                handles = {}
                for path, num in opens:
                    reply_type, msg = pipeline.replies.pop(num)
                    if reply_type == CMD_HANDLE:
                        handles[path] = msg.get_binary()
                    elif reply_type == CMD_STATUS and msg[0] == SFTP_NO_SUCH_FILE:
                        listing[path] = None
                    else:
                        self._refuse_many(f"list directory {path!r}", msg, handles.values())
                sent = [(path, [pipeline.send(CMD_READDIR, handle) for _count in range(readdirs[path])])
                        for path, handle in handles.items()]
                for handle in handles.values():
                    pipeline.send(CMD_CLOSE, handle)
                pipeline.drain()
                again = {}
                for path, nums in sent:
                    names, complete = self._read_names(path, [pipeline.replies.pop(num) for num in nums])
                    if complete:
                        listing[path] = names
                    else:  # more entries than expected: closed already, read it again
                        again[path] = readdirs[path] * 2
                readdirs = again
                pipeline.replies.clear()  # a refused close of a directory handle loses nothing
        except (RemoteError, ConnectionLost):
            raise
        except Exception as exc:
            raise self._lost_or_refused(exc, "list directories") from None
        return entries, listing

    def _stat_reply(self, path: str, reply_type, msg) -> RemoteEntry | None:
        if reply_type == CMD_ATTRS:
            return self._entry(SFTPAttributes._from_msg(msg))
        if reply_type == CMD_STATUS and msg[0] == SFTP_NO_SUCH_FILE:
            return None
        code = msg[0] if reply_type == CMD_STATUS else None
        remedy = PERMISSION_REMEDY if code == 3 else ""
        raise RemoteError(f"lstat {path!r}: {_status_text(msg) if code is not None else reply_type}{remedy}", code)

    def _read_names(self, path: str, replies: list) -> tuple[dict[str, RemoteEntry] | None, bool]:
        """The entries in readdir replies, and whether they reached the end of the directory.
        None: a readdir said "no such file" (the directory is missing, or not a directory)."""
        names: dict[str, RemoteEntry] = {}
        for reply_type, msg in replies:
            if reply_type == CMD_NAME:
                for _count in range(msg.get_int()):
                    name, longname = msg.get_text(), msg.get_text()
                    attrs = SFTPAttributes._from_msg(msg, name, longname)
                    if name not in (".", ".."):
                        names[name] = self._entry(attrs)
            elif reply_type == CMD_STATUS and msg[0] == SFTP_EOF:
                return names, True
            elif reply_type == CMD_STATUS and msg[0] == SFTP_NO_SUCH_FILE:
                return None, True
            else:
                raise RemoteError(f"list directory {path!r}: "
                                  f"{_status_text(msg) if reply_type == CMD_STATUS else reply_type}")
        return names, False

    def _refuse_many(self, context: str, status: tuple[int, str], handles) -> None:
        self._close_quietly(handles)
        raise RemoteError(f"{context}: {_status_text(status)}", status[0])

    def mkdir_many(self, dirs: list[tuple[str, int]]) -> list[bool]:
        """Create directories (path, mode), parents listed before children, in one round trip:
        the server runs requests in order. Per directory, whether it was created (False: it
        already existed as a directory)."""
        pipeline = Pipeline(self.sftp, "create directories", BATCH_OUTSTANDING_REQUESTS, tolerant=True)
        try:
            nums = []
            for path, mode in dirs:
                nums.append(pipeline.send(CMD_MKDIR, path, _attributes(mode), label=f"create directory {path!r}"))
            pipeline.drain()
        except (RemoteError, ConnectionLost):
            raise
        except Exception as exc:
            raise self._lost_or_refused(exc, "create directories") from None
        created = []
        for (path, _mode), num in zip(dirs, nums):
            reply_type, status = pipeline.replies.pop(num, (None, None))
            if reply_type != CMD_STATUS:
                created.append(True)
                continue
            existing = self.lstat(path)
            if existing is not None and existing.kind == "directory":
                created.append(False)
            elif existing is not None:
                raise RemoteError(f"cannot create directory {path!r}: a {existing.kind} with that name exists; "
                                  "remove it or choose another dest")
            else:
                code = status[0]
                remedy = PERMISSION_REMEDY if code == 3 else ""
                raise RemoteError(f"create directory {path!r}: {_status_text(status)}{remedy}", code)
        return created

    def finalize_many(self, files: list[dict]) -> None:
        """Final mode and mtime of temp files, a size check where asked, then the renames into place:
        two round trips for the lot. Nothing is renamed unless every file passed.

        files: dicts {temp, dest, mode, mtime, expect_size (None: no check)}.
        """
        pipeline = Pipeline(self.sftp, "set the final attributes", BATCH_OUTSTANDING_REQUESTS)
        try:
            checks = []
            for item in files:
                pipeline.send(CMD_SETSTAT, item["temp"], _attributes(item["mode"], item["mtime"]),
                              label=f"set mode/mtime of {item['temp']!r}")
                if item.get("expect_size") is not None:
                    checks.append((item, pipeline.send(CMD_LSTAT, item["temp"], label=f"stat {item['temp']!r}")))
            pipeline.drain()
            for item, num in checks:
                size = SFTPAttributes._from_msg(pipeline.reply(num, CMD_ATTRS, f"stat {item['temp']!r}")).st_size
                if size != item["expect_size"]:
                    raise RemoteError(f"{item['temp']!r} has {size} bytes on the target, expected "
                                      f"{item['expect_size']}; the file was not put in place")
        except (RemoteError, ConnectionLost):
            raise
        except Exception as exc:
            raise self._lost_or_refused(exc, "set the final attributes") from None
        self.rename_many([(item["temp"], item["dest"]) for item in files])

    def rename_many(self, pairs: list[tuple[str, str]]) -> None:
        """Atomically replace each target with its source (posix-rename@openssh.com, pipelined)."""
        pipeline = Pipeline(self.sftp, "rename into place", BATCH_OUTSTANDING_REQUESTS)
        try:
            for source, target in pairs:
                pipeline.send(CMD_EXTENDED, "posix-rename@openssh.com", source, target,
                              label=f"rename {source!r} to {target!r}")
            pipeline.drain()
        except RemoteError as exc:
            if exc.code != SFTP_OP_UNSUPPORTED:
                raise
            for source, target in pairs:  # a server without the extension: one by one
                self.rename_over(source, target)
        except ConnectionLost:
            raise
        except Exception as exc:
            raise self._lost_or_refused(exc, "rename into place") from None

    # -- reading back ----------------------------------------------------------------------------

    def read_digests(self, path: str, start: int, end: int, block: int, new_hasher) -> dict:
        """Digests of the remote file's bytes [start, end) in `block`-sized pieces, read over this SFTP
        session: how a target without a shell or Python is checked and resumed.

        The reads are pipelined; replies come in order, so each one feeds the hasher of the block it
        falls in as it arrives and nothing is kept. A server may answer a read with fewer bytes than
        asked before the end of the file (SFTP allows it); then the region is read again one request
        at a time, each continuing where the last one ended.
        Returns {'exists', 'size' (the file's, from fstat), 'digests'}: the file ends inside the region
        when size < end, and the digests then cover what is there.
        """
        try:
            reply_type, msg = self.sftp._request(CMD_OPEN, path, SFTP_FLAG_READ, SFTPAttributes())
        except FileNotFoundError:
            return {"exists": False, "size": None, "digests": []}
        except Exception as exc:
            raise self._lost_or_refused(exc, f"open {path!r} for reading back") from None
        if reply_type != CMD_HANDLE:
            raise RemoteError(f"open {path!r} for reading back: unexpected SFTP reply {reply_type}")
        handle = msg.get_binary()
        try:
            _reply_type, attrs = self._call(f"stat {path!r}", self.sftp._request, CMD_FSTAT, handle)
            size = SFTPAttributes._from_msg(attrs).st_size
            stop = min(end, size)
            digests = self._read_blocks(handle, path, start, stop, block, new_hasher, pipelined=True)
            if digests is None:
                digests = self._read_blocks(handle, path, start, stop, block, new_hasher, pipelined=False)
        finally:
            self._close_quietly([handle])
        return {"exists": True, "size": size, "digests": digests}

    def _read_blocks(self, handle: bytes, path: str, start: int, stop: int, block: int, new_hasher,
                     pipelined: bool) -> list | None:
        """Block digests of [start, stop). Pipelined: None when a reply came back short (the caller
        reads again one request at a time)."""
        digests: list = []
        state = {"hasher": new_hasher(), "filled": 0, "short": False}

        def take(data: bytes) -> None:
            view = memoryview(data)
            while len(view):
                room = min(len(view), block - state["filled"])
                state["hasher"].update(view[:room])
                state["filled"] += room
                view = view[room:]
                if state["filled"] == block:
                    digests.append(state["hasher"].hexdigest())
                    state["hasher"], state["filled"] = new_hasher(), 0

        def arrived(msg, length: int) -> None:
            data = msg.get_string()
            state["short"] |= len(data) < length
            if not state["short"]:  # after a short reply the offsets no longer line up
                take(data)

        pipeline = Pipeline(self.sftp, f"read back {path!r}")
        offset = start
        try:
            while offset < stop and not state["short"]:
                length = min(self.read_size, stop - offset)
                if pipelined:
                    pipeline.throttle()
                    pipeline.send(CMD_READ, handle, int64(offset), length, incoming=length,
                                  on_data=lambda msg, length=length: arrived(msg, length),
                                  label=f"read at offset {offset}")
                    offset += length
                    continue
                reply_type, msg = self.sftp._request(CMD_READ, handle, int64(offset), length)
                data = msg.get_string() if reply_type == CMD_DATA else b""
                if not data:
                    break
                take(data)
                offset += len(data)
            pipeline.drain()
        except EOFError:  # one-at-a-time reads: the file ends before its stat said
            pass
        except (RemoteError, ConnectionLost):
            raise
        except Exception as exc:
            raise self._lost_or_refused(exc, f"read back {path!r}") from None
        if state["short"]:
            return None
        if state["filled"]:
            digests.append(state["hasher"].hexdigest())
        return digests

    @staticmethod
    def hash_local(local_fd: int, start: int, end: int, hasher) -> None:
        offset = start
        while offset < end:
            block = os.pread(local_fd, min(READ_BLOCK, end - offset), offset)
            if not block:
                raise RemoteError("the local file shrank while it was being sent")
            hasher.update(block)
            offset += len(block)
