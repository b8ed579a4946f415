# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Chunked file hashing shared by the controller (push engine) and the target (verify module).

Standard library only: this file is shipped to targets with the verify module, and has to run on
the targets' Python (3.8 and later).

The one definition that both sides must agree on is `split_ranges`: the controller plans its
transfer ranges with it and hashes each range while sending; the target hashes the same ranges
with `digest_file`/`hash_many`, and the two lists of digests are compared index by index.

Reads are memory-bounded (one block of at most `DEFAULT_BLOCK_SIZE` per thread at a time, into
buffers kept for the next read) and use `os.preadv` (`os.pread` where it is missing), so any number
of threads can read one file descriptor at independent offsets. hashlib and zlib release the GIL
while hashing large buffers and the reads release it too, so threads do hash in parallel.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json
import os
import stat
import threading
import zlib

ALGORITHMS = ("crc32", "md5", "sha1", "sha224", "sha256", "sha384", "sha512", "blake2b")
DEFAULT_BLOCK_SIZE = 1024 * 1024
MAX_DEFAULT_THREADS = 8

# The CRC-32 function of a crc32 hasher made without one is zlib's (standard library only), which
# is what the targets use. The controller passes a faster implementation of the same CRC (same
# polynomial, same values) explicitly, as `crc32=` of the functions below: see
# plugin_utils/_fast_crc.py, which is never shipped to a target.


class DigestError(Exception):
    """Base class of the errors this module raises about a file (besides the OSError of a read)."""

    def __init__(self, path, message):
        super(DigestError, self).__init__("%s: %s" % (path, message))
        self.path = path


class ShortReadError(DigestError, EOFError):
    """The file ended before the bytes its size promised were read (it shrank while being hashed)."""


class FileChangedError(DigestError):
    """The file was modified, replaced or resized while it was being hashed: its digests mean nothing."""


def default_threads():
    """Default number of hashing threads: one per CPU, at most 8."""
    return min(MAX_DEFAULT_THREADS, os.cpu_count() or 1)


class Crc32(object):
    """CRC-32 (the one of zip, gzip and PNG) with hashlib's interface.

    An error-detecting code, not a cryptographic digest: it finds corrupted, missing, stale or
    misplaced bytes, which is what a transfer check is for (SSH already authenticates every byte
    in transit), at ~10x the speed of sha256 on CPUs without SHA instructions. It cannot stand
    against someone who alters a file on purpose. zlib releases the GIL on large buffers, so
    threads hash in parallel as with hashlib. `function` is the CRC-32 function (zlib.crc32's
    signature and values); None: zlib's.
    """

    name = "crc32"
    digest_size = 4

    def __init__(self, value=0, function=None):
        self._value = value
        self._crc32 = function or zlib.crc32

    def update(self, data):
        self._value = self._crc32(data, self._value)

    def digest(self):
        return (self._value & 0xFFFFFFFF).to_bytes(4, "big")

    def hexdigest(self):
        return "%08x" % (self._value & 0xFFFFFFFF)

    def copy(self):
        return Crc32(self._value, self._crc32)


def new_hasher(algorithm, crc32=None):
    """A fresh hasher (hashlib's interface) for `algorithm`, which must be one of ALGORITHMS.
    `crc32`: the CRC-32 function of a crc32 hasher (None: zlib's)."""
    if algorithm not in ALGORITHMS:
        raise ValueError("unsupported checksum algorithm %r; use one of: %s" % (algorithm, ", ".join(ALGORITHMS)))
    if algorithm == "crc32":
        return Crc32(function=crc32)
    try:
        # Integrity checks, not security: lets md5/sha1 work on FIPS-enabled hosts (Python 3.9+).
        return hashlib.new(algorithm, usedforsecurity=False)
    except TypeError:  # Python 3.8: no usedforsecurity keyword
        pass
    try:
        return hashlib.new(algorithm)
    except ValueError as exc:
        raise ValueError("checksum algorithm %r is not available on this Python (%s)" % (algorithm, exc)) from exc


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("%s must be an integer, not %r" % (name, value))


def split_ranges(size, chunk_size):
    """The (offset, length) ranges of a file of `size` bytes cut into `chunk_size` pieces.

    There are ceil(size / chunk_size) ranges, in file order; every range but the last has
    `chunk_size` bytes and the last one takes the remainder. A 0-byte file has no ranges.
    """
    _check_int("size", size)
    _check_int("chunk_size", chunk_size)
    if chunk_size <= 0:
        raise ValueError("chunk_size must be a positive number of bytes, not %d" % chunk_size)
    if size < 0:
        raise ValueError("size must not be negative, not %d" % size)
    return [(offset, min(chunk_size, size - offset)) for offset in range(0, size, chunk_size)]


def file_digest(path, algorithm, block_size=DEFAULT_BLOCK_SIZE, crc32=None):
    """Hex digest of the whole file, read sequentially in `block_size` blocks (until end of file)."""
    hasher = new_hasher(algorithm, crc32)
    buffer = bytearray(block_size)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as stream:
        while True:
            count = stream.readinto(buffer)
            if not count:
                break
            hasher.update(view[:count])
    return hasher.hexdigest()


# Read buffers kept between reads, requests and threads: a fresh buffer per read is memory the
# kernel maps and zeroes again and again in a long-lived process (the hashing service), which
# costs more CPU than the copy from the page cache itself.
_SPARE_BUFFERS = []
_SPARE_BUFFERS_LOCK = threading.Lock()


def _take_buffer(size):
    with _SPARE_BUFFERS_LOCK:
        while _SPARE_BUFFERS:
            buffer = _SPARE_BUFFERS.pop()
            if len(buffer) == size:
                return buffer
    return bytearray(size)


def _give_back(buffer):
    with _SPARE_BUFFERS_LOCK:
        if len(_SPARE_BUFFERS) < MAX_DEFAULT_THREADS:
            _SPARE_BUFFERS.append(buffer)


def _pread_into(fd, hashers, offset, length, block_size, path):
    """Read `length` bytes of `fd` from `offset` and feed them to every hasher in `hashers`."""
    end = offset + length
    if not hasattr(os, "preadv"):  # not every platform has it; pread allocates each block instead
        while offset < end:
            data = os.pread(fd, min(block_size, end - offset), offset)
            if not data:
                raise _short_read(path, offset, end)
            for hasher in hashers:
                hasher.update(data)
            offset += len(data)
        return
    buffer = _take_buffer(block_size)
    view = memoryview(buffer)
    try:
        while offset < end:
            count = os.preadv(fd, [view[:min(block_size, end - offset)]], offset)
            if not count:
                raise _short_read(path, offset, end)
            data = view[:count]
            for hasher in hashers:
                hasher.update(data)
            offset += count
    finally:
        _give_back(buffer)


def _short_read(path, offset, end):
    return ShortReadError(path, "the file ended at byte %d, before byte %d (did it shrink while being hashed?)"
                          % (offset, end))


def range_digest(fd_or_path, offset, length, algorithm, block_size=DEFAULT_BLOCK_SIZE, crc32=None):
    """Hex digest of `length` bytes from `offset` of an open file descriptor or of a path.

    A file descriptor is read with os.pread only, so its file position is left alone and other
    threads may read it at the same time. Raises ShortReadError when the file ends too soon.
    """
    hasher = new_hasher(algorithm, crc32)
    if offset < 0 or length < 0:
        raise ValueError("offset and length must not be negative (got %d, %d)" % (offset, length))
    if isinstance(fd_or_path, int) and not isinstance(fd_or_path, bool):
        _pread_into(fd_or_path, [hasher], offset, length, block_size, "file descriptor %d" % fd_or_path)
        return hasher.hexdigest()
    fd = os.open(fd_or_path, os.O_RDONLY)
    try:
        _pread_into(fd, [hasher], offset, length, block_size, fd_or_path)
    finally:
        os.close(fd)
    return hasher.hexdigest()


def _identity(st):
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _FileJob(object):
    """One file of a hash_many batch: its open descriptor, its ranges and the digests found so far."""

    def __init__(self, path, chunk_size, algorithm, whole, block_size, indexes=None, crc32=None):
        self.path = path
        self.algorithm = algorithm
        self.crc32 = crc32
        self.block_size = block_size
        self.fd = os.open(path, os.O_RDONLY)
        try:
            self.identity = _identity(os.fstat(self.fd))
            self.size = self.identity[2]
            self.ranges = split_ranges(self.size, chunk_size) if chunk_size is not None else []
        except BaseException:
            os.close(self.fd)
            raise
        self.want_whole = whole
        self.whole = None
        self.chunks = [None] * len(self.ranges)
        # Only these ranges get a digest (all when None): a caller checking ranges as they arrive.
        self.partial = indexes is not None
        self.selected = range(len(self.ranges)) if indexes is None else sorted(
            set(index for index in indexes if 0 <= index < len(self.ranges)))
        self.error = None
        self.lock = threading.Lock()
        self.pending = 0

    def tasks(self, split):
        """(length, callable) work items for this file. `split` allows hashing the whole file
        concurrently with its ranges; otherwise one sequential pass computes everything."""
        if not split or len(self.selected) + int(self.want_whole) <= 1:
            return [(self.size, self._hash_single_pass)]
        items = [(self.size, self._hash_whole)] if self.want_whole else []
        items.extend((self.ranges[index][1], _bind(self._hash_range, index)) for index in self.selected)
        return items

    def _hash_single_pass(self):
        whole = new_hasher(self.algorithm, self.crc32) if self.want_whole else None
        selected = set(self.selected)
        for index, (offset, length) in enumerate(self.ranges):
            if index not in selected and whole is None:
                continue
            chunk = new_hasher(self.algorithm, self.crc32) if index in selected else None
            hashers = ([chunk] if chunk else []) + ([whole] if whole else [])
            _pread_into(self.fd, hashers, offset, length, self.block_size, self.path)
            if chunk is not None:
                self.chunks[index] = chunk.hexdigest()
        if whole is not None and not self.ranges:
            _pread_into(self.fd, [whole], 0, self.size, self.block_size, self.path)
        if whole is not None:
            self.whole = whole.hexdigest()

    def _hash_whole(self):
        hasher = new_hasher(self.algorithm, self.crc32)
        _pread_into(self.fd, [hasher], 0, self.size, self.block_size, self.path)
        self.whole = hasher.hexdigest()

    def _hash_range(self, index):
        offset, length = self.ranges[index]
        hasher = new_hasher(self.algorithm, self.crc32)
        _pread_into(self.fd, [hasher], offset, length, self.block_size, self.path)
        self.chunks[index] = hasher.hexdigest()

    def run(self, work):
        """Run one work item of this file; the first failure is kept and later items are skipped."""
        if self.error is None:
            try:
                work()
            except (OSError, DigestError) as exc:
                with self.lock:
                    if self.error is None:
                        self.error = exc
        with self.lock:
            self.pending -= 1
            last = self.pending == 0
        if last:
            self.finish()

    def finish(self):
        try:
            # With selected ranges the caller checks a file while other parts of it are still being
            # written: those changes are expected, and the selected ranges are stable by contract.
            if self.error is None and self.partial is False:
                after = _identity(os.stat(self.path))
                if after != self.identity:
                    self.error = FileChangedError(self.path, "the file changed while it was being hashed")
        except OSError as exc:
            self.error = exc
        finally:
            os.close(self.fd)
            self.fd = -1

    def result(self):
        return (self.whole, list(self.chunks))


def _bind(function, argument):
    return lambda: function(argument)


def hash_many(specs, algorithm, threads=None, whole=True, return_exceptions=False, block_size=DEFAULT_BLOCK_SIZE,
              crc32=None):
    """Hash several files with one pool of `threads` threads shared by all of them.

    `specs` is a sequence of (path, chunk_size) pairs (chunk_size None for no per-range digests), or
    of (path, chunk_size, whole) triples where a file's own `whole` flag overrides the `whole` argument,
    or (path, chunk_size, whole, indexes) where only the ranges numbered in `indexes` get a digest
    (the others stay None in chunk_digests).
    Returns one (whole_digest, chunk_digests) tuple per spec, in the order given; whole_digest is
    None when the whole-file digest was not asked for, chunk_digests has one digest per range of
    split_ranges(size, chunk_size).

    Work items (the sequential whole-file pass of each file, and each range) from all files share
    one queue, longest first, so big and small files keep every thread busy until the end.

    A file that cannot be read, ends early, or changes while it is hashed gives an OSError or a
    DigestError: raised (the first one, in spec order) unless `return_exceptions` is true, which puts
    the exception in that file's place instead of the tuple.

    `crc32`: the CRC-32 function of crc32 hashers (None: zlib's), as for new_hasher.
    """
    new_hasher(algorithm)  # reject a bad algorithm before opening anything
    threads = default_threads() if threads is None else threads
    _check_int("threads", threads)
    if threads < 1:
        raise ValueError("threads must be at least 1, not %d" % threads)
    specs = [(tuple(spec) + (None,) * 4)[:4] if len(spec) >= 3 else (spec[0], spec[1], whole, None)
             for spec in specs]
    for _path, chunk_size, _whole, _indexes in specs:
        if chunk_size is not None:
            split_ranges(0, chunk_size)  # validate before any work starts

    results = [None] * len(specs)
    jobs = []  # (index, _FileJob)
    try:
        for index, (path, chunk_size, file_whole, indexes) in enumerate(specs):
            try:
                jobs.append((index, _FileJob(path, chunk_size, algorithm, bool(file_whole), block_size, indexes,
                                             crc32)))
            except OSError as exc:
                results[index] = exc
        _run_jobs([job for _index, job in jobs], threads)
    finally:
        for _index, job in jobs:  # only left open when the run itself blew up
            if job.fd >= 0:
                os.close(job.fd)
                job.fd = -1
    for index, job in jobs:
        results[index] = job.error if job.error is not None else job.result()
    if not return_exceptions:
        for outcome in results:
            if isinstance(outcome, BaseException):
                raise outcome
    return results


def _run_jobs(jobs, threads):
    split = threads > 1
    work = []
    for job in jobs:
        items = job.tasks(split)
        job.pending = len(items)
        work.extend((length, job, task) for length, task in items)
    # Longest first: the longest sequential pass bounds the wall time, so start it early.
    work.sort(key=lambda item: -item[0])
    if threads == 1 or len(work) <= 1:
        for _length, job, task in work:
            job.run(task)
        return
    # Imported here: the hashing service starts faster without it, and needs it only for batches of
    # several ranges.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(threads, len(work))) as pool:
        futures = [pool.submit(job.run, task) for _length, job, task in work]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def digest_file(path, algorithm, chunk_size=None, threads=None, whole=True, block_size=DEFAULT_BLOCK_SIZE,
                crc32=None):
    """(whole_digest, chunk_digests) of one file.

    The whole-file digest (the standard digest of the file, as `sha256sum` prints it) is computed
    by one thread reading sequentially, while the other threads hash the disjoint ranges of
    split_ranges(size, chunk_size) with os.pread. With one thread (or a single range) both come from
    one sequential pass. chunk_size None gives (whole_digest, []); whole=False gives (None, chunks).
    """
    return hash_many([(path, chunk_size)], algorithm, threads=threads, whole=whole, block_size=block_size,
                     crc32=crc32)[0]


# ---------------------------------------------------------------------------------------------
# Describing and hashing files for the controller: the verify module and the hashing service
# ---------------------------------------------------------------------------------------------


def _kind(mode):
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "link"
    return "other"


def os_error_text(exc):
    if isinstance(exc, OSError) and exc.errno:
        return "%s (errno %d)" % (exc.strerror or os.strerror(exc.errno), exc.errno)
    return str(exc)


def inspect(path):
    """Facts about `path` from lstat, in the shape of one returned file entry (checksums not yet set)."""
    entry = {"path": path, "exists": False, "type": "missing", "size": None, "mtime": None, "mode": None,
             "checksum": None, "chunk_checksums": [], "failed": False, "msg": None}
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return entry
    except OSError as exc:
        entry.update(failed=True, msg="%s: cannot be inspected: %s" % (path, os_error_text(exc)))
        return entry
    entry.update(exists=True, type=_kind(st.st_mode), size=st.st_size, mtime=st.st_mtime,
                 mode="%04o" % stat.S_IMODE(st.st_mode))
    return entry


def describe_files(requests, algorithm, get_checksum, threads, problem=None):
    """One entry per request (dicts with path, chunk_size, chunk_indexes, get_checksum), in order:
    lstat facts, then the digests asked for, all files hashed by one pool of `threads`.

    problem(entry, request) may name a reason not to hash a file (it then fails with that message).
    """
    entries = [inspect(request["path"]) for request in requests]
    to_hash = []  # (entry index, (path, chunk_size, whole, indexes))
    for index, (request, entry) in enumerate(zip(requests, entries)):
        if entry["failed"]:
            continue
        message = problem(entry, request) if problem is not None else None
        if message:
            entry.update(failed=True, msg=message)
            continue
        wanted = request.get("get_checksum")
        whole = (get_checksum if wanted is None else wanted) or request.get("checksum") is not None
        if entry["type"] == "file" and (whole or request.get("chunk_size") is not None):
            to_hash.append((index, (request["path"], request.get("chunk_size"), whole, request.get("chunk_indexes"))))

    outcomes = hash_many([spec for _index, spec in to_hash], algorithm, threads=threads, return_exceptions=True)
    for (index, _spec), outcome in zip(to_hash, outcomes):
        entry = entries[index]
        if isinstance(outcome, BaseException):
            if isinstance(outcome, DigestError):
                text = str(outcome)
            else:
                text = "%s: cannot be read: %s" % (entry["path"], os_error_text(outcome))
            entry.update(failed=True, msg=text)
            continue
        entry["checksum"], entry["chunk_checksums"] = outcome
    return entries


def serve(stdin, stdout):
    """The hashing service: JSON requests ({files, algorithm, get_checksum}), one per line on stdin,
    each answered by one line of JSON on stdout ({files: entries}), until stdin ends. The controller
    runs this file's source with it over an exec channel of a connection it already has and keeps
    it for the whole push, instead of a module run (or a Python start-up) per batch."""
    threads = default_threads()
    for line in iter(stdin.readline, b""):
        if not line.strip():
            continue
        request = json.loads(line.decode("utf-8"))
        entries = describe_files(request["files"], request["algorithm"], request["get_checksum"], threads)
        stdout.write(json.dumps({"files": entries}) + "\n")
        stdout.flush()
