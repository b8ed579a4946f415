# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The data side of a worker's SFTP session: temp files opened and allocated, ranges and small
files written with every reply checked, and remote bytes read back into digests.

Small files are round-trip bound, not byte bound: each costs an open, a write, a close and a
rename. The batch methods send the same request for many files back to back and read all the
replies once, so a batch costs one round trip per step instead of one per file and step.

`DataOperations` (writing) and `ReadBack` (reading back, hashing) are parts of `_sftp.RemoteFiles`,
which provides `sftp`, `transport`, `write_size`, `read_size`, `lstat`, `_classified`,
`_close_quietly` and `_owned_attributes`.
"""

from __future__ import annotations

import os

from ansible_collections.multipush.sftp.plugins.plugin_utils import _paramiko_compat
from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp_errors import (
    RemoteError, remedy, status_text,
)
from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp_pipeline import (
    BATCH_OUTSTANDING_REQUESTS, Pipeline, attributes_in, new_attributes, write_header_size,
)
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import paramiko

if paramiko is not None:
    from paramiko.sftp import (
        CMD_ATTRS, CMD_CLOSE, CMD_DATA, CMD_HANDLE, CMD_LSTAT, CMD_OPEN, CMD_READ, CMD_SETSTAT, CMD_STAT, CMD_STATUS,
        CMD_WRITE, SFTP_FLAG_CREATE, SFTP_FLAG_EXCL, SFTP_FLAG_READ, SFTP_FLAG_TRUNC, SFTP_FLAG_WRITE, int64,
    )
    from paramiko.sftp_attr import SFTPAttributes

READ_BLOCK = 4 * 1024 * 1024
OWNER_ONLY = 0o600  # temp files until they are verified and put in place


class DataOperations:
    """File contents on the target: temp files opened and allocated, ranges and small files written."""

    # -- opening -------------------------------------------------------------------------------

    def open_for_write(self, path: str, truncate: bool) -> bytes:
        """Open (creating it owner-only if missing) and return the raw handle.

        Workers writing ranges pass truncate=False: one late or retried worker must never wipe
        what the others wrote (a truncating open there corrupts the file silently). Temp files are
        created, exclusively where asked, by allocate_many.
        """
        flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | (SFTP_FLAG_TRUNC if truncate else 0)
        with self._classified(f"open {path!r} for writing"):
            reply_type, msg = _paramiko_compat.request(self.sftp, CMD_OPEN, path, flags, new_attributes(OWNER_ONLY))
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
        with self._classified("create temp files"):
            owner_only = new_attributes(OWNER_ONLY)
            nums = []
            for item in files:
                flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC
                flags |= SFTP_FLAG_EXCL if item.get("exclusive") else 0
                nums.append(opening.send(CMD_OPEN, item["temp"], flags, owner_only, label=f"open {item['temp']!r}"))
            opening.drain()
            handles: dict[int, bytes] = {}
            refused = None
            for index, num in enumerate(nums):
                reply_type, msg = opening.replies.pop(num, (None, None))
                if reply_type == CMD_HANDLE:
                    handles[index] = msg.get_binary()
                elif refused is None:
                    refused = (files[index], msg if reply_type == CMD_STATUS else (None, f"SFTP reply {reply_type}"))
            if refused is not None:
                self._close_quietly(handles.values())
                self._refuse_create(*refused)
            sizing = Pipeline(self.sftp, "allocate temp files", BATCH_OUTSTANDING_REQUESTS)
            for index, item in enumerate(files):
                attrs = SFTPAttributes()
                attrs.st_size = item["size"]
                sizing.send(CMD_SETSTAT, item["temp"], attrs, label=f"allocate {item['temp']!r}")
                sizing.send(CMD_CLOSE, handles.pop(index), label=f"close {item['temp']!r}")
            sizing.drain()

    def _refuse_create(self, item: dict, status: tuple[int | None, str]) -> None:
        code = status[0]
        if item.get("exclusive") and self.lstat(item["temp"]) is not None:
            raise RemoteError(f"another push is writing {item['temp']!r} right now (same source, same "
                              "destination); let it finish, or remove that file if no push is running", code)
        raise RemoteError(f"open {item['temp']!r} for writing: {status_text(status)}{remedy(code)}", code)

    # -- one range -----------------------------------------------------------------------------

    def write_range(self, handle: bytes, path: str, local_fd: int, start: int, end: int, hasher=None,
                    hash_from: int | None = None, progress=None, meta: dict | None = None,
                    source: str = "the source") -> dict:
        """Write local bytes [start, end) at the same offsets of the remote file, every reply checked,
        and close the handle, whatever happens.

        hash_from < start means the bytes [hash_from, start) were already acknowledged by an
        earlier connection: they are hashed from the local file but not sent again.
        With `meta`, a setstat (mode, mtime) and an lstat of the path follow the writes in the same
        pipeline, so a small file costs no extra round trip for them.
        The close follows the last request in the same pipeline: the server runs a session's
        requests in order, so it closes after the writes whether they succeeded or not, and the
        close's reply comes with the last write's instead of a round trip later (one per range).
        Returns {'size', 'mtime': the remote file's after writing (when meta asked for them)}.
        """
        pipeline = Pipeline(self.sftp, f"write to {path!r}")
        reported = [0]  # acknowledged bytes already handed to progress
        close_sent = False
        try:
            with self._classified(f"write to {path!r}", acked_by=pipeline, sent_by=pipeline):
                if hasher is not None and hash_from is not None and hash_from < start:
                    self.hash_local(local_fd, hash_from, start, hasher)
                self._send_range(pipeline, handle, path, local_fd, start, end, hasher, progress, reported, source)
                stat_num = None
                if meta is not None:
                    pipeline.send(CMD_SETSTAT, path, self._owned_attributes(meta["mode"], meta["mtime"]),
                                  label="set mode/mtime")
                    stat_num = pipeline.send(CMD_LSTAT, path, label="stat")
                pipeline.send(CMD_CLOSE, handle, label="close")
                close_sent = True
                pipeline.drain()
                result = {}
                if stat_num is not None:
                    reply_type, msg = pipeline.replies.get(stat_num, (None, None))
                    if reply_type != CMD_ATTRS:
                        raise RemoteError(f"stat of {path!r} after writing returned no attributes")
                    attrs = attributes_in(msg)
                    result["size"], result["mtime"] = attrs.st_size, attrs.st_mtime
        finally:
            if progress is not None and pipeline.acked_bytes > reported[0]:
                progress(pipeline.acked_bytes - reported[0])
            if not close_sent:
                # Failed before the close went out: close now, quietly (the first error is the one
                # that says how far the range got).
                self._close_quietly([handle])
        return result

    def _send_range(self, pipeline: Pipeline, handle: bytes, path: str, local_fd: int, start: int, end: int,
                    hasher, progress, reported: list, source: str) -> None:
        """The write requests of [start, end), each read from the local file behind room for its header."""
        header = write_header_size(handle)
        offset = start
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
            if progress is not None and pipeline.acked_bytes - reported[0] >= READ_BLOCK:
                progress(pipeline.acked_bytes - reported[0])
                reported[0] = pipeline.acked_bytes

    # -- many small files ----------------------------------------------------------------------

    def write_small_files(self, files: list[dict], hashers: list | None = None, progress=None,
                          read_back: list | None = None) -> list[dict]:
        """Write whole small files to their temp paths: all opens, then every file's writes, setstat,
        lstat and close in one pipeline. Every reply is checked; the first refusal is raised once all
        replies are in, after closing whatever was left open.

        read_back: one hasher per file, fed what the target returns when the file is read back
        through the same handle after its writes, in the same pipeline (the server runs one
        session's requests in order): the target's copy checked without another round trip.

        files: dicts {local, temp, size, mtime, mode (None: the temp file stays owner-only)}.
        Returns per file {'size' and 'mtime': on the target after writing, 'read': bytes read back}.
        """
        writing = Pipeline(self.sftp, "write small files", BATCH_OUTSTANDING_REQUESTS)
        handles: dict[int, bytes] = {}  # file index -> handle not yet closed
        read_counts = [0] * len(files)
        try:
            with self._classified("write small files", sent_by=writing):
                self._open_small(files, handles, read_back is not None)
                stats = []
                for index, item in enumerate(files):
                    stats.append(self._send_small(writing, handles, index, item, hashers, read_back, read_counts))
                writing.drain()
                if progress is not None:
                    progress(writing.acked_bytes)
                written = []
                for index, (item, num) in enumerate(zip(files, stats)):
                    attrs = attributes_in(writing.reply(num, CMD_ATTRS, f"stat {item['temp']!r}"))
                    written.append({"size": attrs.st_size, "mtime": attrs.st_mtime, "read": read_counts[index]})
                return written
        except RemoteError:
            self._close_quietly(handles.values())
            raise

    def _open_small(self, files: list[dict], handles: dict, reading: bool) -> None:
        """Open every temp file (owner-only, truncated); their handles into `handles` by index."""
        opening = Pipeline(self.sftp, "open temp files for writing", BATCH_OUTSTANDING_REQUESTS)
        flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC | (SFTP_FLAG_READ if reading else 0)
        owner_only = new_attributes(OWNER_ONLY)
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

    def _send_small(self, writing: Pipeline, handles: dict, index: int, item: dict, hashers, read_back,
                    read_counts: list) -> int:
        """One small file's writes, attributes, lstat, read-back and close; the lstat's request number."""
        data = self._read_small(item)
        if hashers is not None:
            hashers[index].update(data)
        handle, view = handles[index], memoryview(data)
        for position in range(0, len(view), self.write_size):
            piece = view[position:position + self.write_size]
            writing.throttle()
            writing.send(CMD_WRITE, handle, int64(position), piece.tobytes(), nbytes=len(piece),
                         label=f"write to {item['temp']!r} at offset {position}")
        writing.send(CMD_SETSTAT, item["temp"], self._owned_attributes(item.get("mode"), item["mtime"]),
                     label=f"set mode/mtime of {item['temp']!r}")
        stat_num = writing.send(CMD_LSTAT, item["temp"], label=f"stat {item['temp']!r}")
        if read_back is not None:
            self._send_reads(writing, handle, item, read_back[index], read_counts, index)
        writing.send(CMD_CLOSE, handle, label=f"close {item['temp']!r}")
        del handles[index]
        return stat_num

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


class ReadBack:
    """Remote and local bytes hashed: the target's copy read back over SFTP, the local file's ranges."""

    def read_digests(self, path: str, start: int, end: int, block: int, new_hasher) -> dict:
        """Digests of the remote file's bytes [start, end) in `block`-sized pieces, read over this SFTP
        session: how a target without a shell or Python is checked and resumed.

        The reads are pipelined; replies come in order, so each one feeds the hasher of the block it
        falls in as it arrives and nothing is kept. A server may answer a read with fewer bytes than
        asked before the end of the file (SFTP allows it); then the region is read again one request
        at a time, each continuing where the last one ended.
        Returns {'exists', 'size' (the file's, from a stat), 'digests'}: the file ends inside the region
        when size < end, and the digests then cover what is there.
        """
        with self._classified(f"open {path!r} for reading back"):
            try:
                reply_type, msg = _paramiko_compat.request(self.sftp, CMD_OPEN, path, SFTP_FLAG_READ, SFTPAttributes())
            except FileNotFoundError:
                return {"exists": False, "size": None, "digests": []}
        if reply_type != CMD_HANDLE:
            raise RemoteError(f"open {path!r} for reading back: unexpected SFTP reply {reply_type}")
        handle = msg.get_binary()
        try:
            with self._classified(f"stat {path!r}"):
                _reply_type, attrs = _paramiko_compat.request(self.sftp, CMD_STAT, path)
            size = attributes_in(attrs).st_size
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
        blocks = _BlockDigests(block, new_hasher)
        pipeline = Pipeline(self.sftp, f"read back {path!r}")
        offset = start
        with self._classified(f"read back {path!r}"):
            try:
                while offset < stop and not blocks.short:
                    length = min(self.read_size, stop - offset)
                    if pipelined:
                        pipeline.throttle()
                        pipeline.send(CMD_READ, handle, int64(offset), length, incoming=length,
                                      on_data=lambda msg, length=length: blocks.arrived(msg, length),
                                      label=f"read at offset {offset}")
                        offset += length
                        continue
                    reply_type, msg = _paramiko_compat.request(self.sftp, CMD_READ, handle, int64(offset), length)
                    data = msg.get_string() if reply_type == CMD_DATA else b""
                    if not data:
                        break
                    blocks.take(data)
                    offset += len(data)
                pipeline.drain()
            except EOFError:  # one-at-a-time reads: the file ends before its stat said
                pass
        return None if blocks.short else blocks.finish()

    @staticmethod
    def hash_local(local_fd: int, start: int, end: int, hasher) -> None:
        offset = start
        while offset < end:
            block = os.pread(local_fd, min(READ_BLOCK, end - offset), offset)
            if not block:
                raise RemoteError("the local file shrank while it was being sent")
            hasher.update(block)
            offset += len(block)


class _BlockDigests:
    """Bytes in order, hashed block by block."""

    def __init__(self, block: int, new_hasher):
        self.block = block
        self.new_hasher = new_hasher
        self.hasher = new_hasher()
        self.filled = 0
        self.short = False  # a pipelined reply came back short: the offsets no longer line up
        self.digests: list = []

    def take(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            room = min(len(view), self.block - self.filled)
            self.hasher.update(view[:room])
            self.filled += room
            view = view[room:]
            if self.filled == self.block:
                self.digests.append(self.hasher.hexdigest())
                self.hasher, self.filled = self.new_hasher(), 0

    def arrived(self, msg, length: int) -> None:
        data = msg.get_string()
        self.short |= len(data) < length
        if not self.short:
            self.take(data)

    def finish(self) -> list:
        if self.filled:
            self.digests.append(self.hasher.hexdigest())
        return self.digests
