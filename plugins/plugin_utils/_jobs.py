# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The jobs the engine's workers run: one frozen dataclass per kind, each with its own execute().

A job says what to do on the target and carries everything needed for it; `execute(remote,
progress)` does it on one worker's RemoteFiles and returns a plain dict for the coordinator (a
job crosses a process boundary both ways, so jobs and results are picklable data). A job never
changes: the engine asks it for the job to run after its connection was lost
(`after_loss(acked, sent)`), which for a range skips what the server already acknowledged.

Adding a job kind is adding a class here; the engine needs no change.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from ansible_collections.multipush.sftp.plugins.plugin_utils._fast_crc import new_hasher
from ansible_collections.multipush.sftp.plugins.plugin_utils._plan import source_changed
from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp import RemoteError, RemoteFiles

Progress = Callable[[int], None]


@dataclass(frozen=True, kw_only=True)
class Job:
    """What every job has: how many times it was tried, and the bytes earlier tries sent."""

    attempt: int = 0
    sent_earlier: int = 0

    def execute(self, remote: RemoteFiles, progress: Progress) -> dict:
        raise NotImplementedError

    def describe(self) -> str:
        """For messages: what the job does, to which path."""
        return type(self).__name__

    def writes(self) -> tuple[str, int] | None:
        """(remote directory, bytes) a writing job needs there; None for jobs that write no data.
        Lets the engine say, when the server refuses, whether the disk is full or read-only."""
        return None

    def after_loss(self, acked: int, sent: int) -> "Job":
        """The job to run again after its connection was lost, `acked` bytes acknowledged and `sent`
        bytes sent (which count as sent, acknowledged or not)."""
        return replace(self, attempt=self.attempt + 1, sent_earlier=self.sent_earlier + sent)

    def hint_when_refused(self) -> str:
        """What else may explain a refusal the server gave no reason for (nor a full or read-only disk)."""
        return ""


# Servers backed by object storage take a file's bytes in order only: a temp file sized in advance, or
# ranges written side by side at their offsets, are refused with a bare "failure".
SEQUENTIAL_ONLY_HINT = (" — if this SFTP server writes files only front to back (object-storage gateways do), push "
                        "with a `chunk_size` above the largest file's size: every file then travels whole, in order")


# -- reading the target's tree -----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Lstat(Job):
    path: str

    def execute(self, remote, progress):
        return {"entry": remote.lstat(self.path)}


@dataclass(frozen=True, kw_only=True)
class Stat(Job):
    """Through symlinks: what a link leads to."""

    path: str

    def execute(self, remote, progress):
        return {"entry": remote.stat(self.path)}


@dataclass(frozen=True, kw_only=True)
class Readlink(Job):
    path: str

    def execute(self, remote, progress):
        return {"target": remote.readlink(self.path)}


@dataclass(frozen=True, kw_only=True)
class Realpath(Job):
    """The absolute path the server makes of a path (a relative one: from the login directory)."""

    path: str

    def execute(self, remote, progress):
        return {"path": remote.realpath(self.path)}


@dataclass(frozen=True, kw_only=True)
class Survey(Job):
    """lstat of `stat` and the listings of `paths`, read together (see RemoteFiles.survey)."""

    stat: tuple = ()
    paths: tuple = ()
    expected: dict = field(default_factory=dict)  # directory -> entries expected there

    def execute(self, remote, progress):
        entries, listing = remote.survey(list(self.stat), list(self.paths), self.expected)
        return {"entries": entries, "listing": listing}

    def describe(self) -> str:
        return f"survey of {len(self.paths)} directories"


# -- directories, links, clean-up --------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MakeDirs(Job):
    """(path, mode) pairs, parents before children: one round trip (see RemoteFiles.mkdir_many)."""

    dirs: tuple

    def execute(self, remote, progress):
        return {"created": remote.mkdir_many(list(self.dirs))}


@dataclass(frozen=True, kw_only=True)
class MakeDir(Job):
    path: str
    mode: int

    def execute(self, remote, progress):
        return {"created": remote.mkdir(self.path, self.mode)}


@dataclass(frozen=True, kw_only=True)
class SetStats(Job):
    """(path, mode, mtime) triples, in one round trip."""

    items: tuple

    def execute(self, remote, progress):
        remote.setstat_many(list(self.items))
        return {}


@dataclass(frozen=True, kw_only=True)
class Remove(Job):
    path: str

    def execute(self, remote, progress):
        remote.remove(self.path)
        return {}

    def describe(self) -> str:
        return f"remove {self.path!r}"


@dataclass(frozen=True, kw_only=True)
class Symlink(Job):
    """The link at `path` points to `target` afterwards: made under `temp`, renamed over `path`."""

    path: str
    target: str
    temp: str

    def execute(self, remote, progress):
        current = remote.readlink(self.path)
        if current == self.target:
            return {"changed": False}
        remote.remove(self.temp)
        remote.symlink(self.target, self.temp)
        remote.rename_over(self.temp, self.path)
        return {"changed": True, "created": current is None}

    def describe(self) -> str:
        return f"symlink {self.path!r}"


# -- file data ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CreateTemps(Job):
    """The temp files of the chunked files, once, at full size: workers then only ever open them
    without truncation. One job for all of them: two round trips instead of three per file.
    files: dicts {temp, size, exclusive}."""

    files: tuple

    def execute(self, remote, progress):
        # A retried create may find the files its lost first attempt made: only the first is exclusive.
        first = self.attempt == 0
        remote.allocate_many([dict(item, exclusive=first and item.get("exclusive", False)) for item in self.files])
        return {}

    def writes(self):
        return os.path.dirname(self.files[0]["temp"]) or "/", sum(item["size"] for item in self.files)

    def hint_when_refused(self) -> str:
        return SEQUENTIAL_ONLY_HINT


@dataclass(frozen=True, kw_only=True)
class WriteRange(Job):
    """Local bytes [start, end) at the same offsets of `temp`. hash_from < start: [hash_from, start)
    was acknowledged before and is only hashed; hash_to > end: [end, hash_to) already matches on the
    target (a resumed range sent in pieces) and is only hashed. `part`: a later piece of range
    `index`, whose digest its first piece computes."""

    local: str
    temp: str
    dest: str
    start: int
    end: int
    index: int
    size: int
    algorithm: str | None = None
    hash_from: int | None = None
    hash_to: int | None = None
    part: bool = False

    def execute(self, remote, progress):
        hasher = new_hasher(self.algorithm) if self.algorithm else None
        started = time.time()
        with open(self.local, "rb") as local:
            handle = remote.open_for_write(self.temp, truncate=False)
            remote.write_range(handle, self.temp, local.fileno(), self.start, self.end, hasher,
                               hash_from=self.hash_from, progress=progress, source=self.local)
            if hasher is not None and (self.hash_to or self.end) > self.end:
                remote.hash_local(local.fileno(), self.end, self.hash_to, hasher)
        return {"digest": hasher.hexdigest() if hasher else None,
                "bytes_sent": self.end - self.start + self.sent_earlier,
                "started": started, "finished": time.time()}

    def describe(self) -> str:
        return f"write {self.dest!r} [{self.start}, {self.end})"

    def writes(self):
        return os.path.dirname(self.temp) or "/", self.size

    def hint_when_refused(self) -> str:
        return SEQUENTIAL_ONLY_HINT

    def after_loss(self, acked: int, sent: int) -> "Job":
        """Only the unacknowledged part travels again; the acknowledged prefix is re-hashed locally."""
        again = super().after_loss(acked, sent)
        if not acked:
            return again
        return replace(again, start=self.start + acked,
                       hash_from=self.start if self.hash_from is None else self.hash_from)


def mtime_not_kept(items, outcomes) -> tuple | None:
    """(dest, mtime set, mtime the target reports) of the first file whose mtime the target did not
    keep (some servers ignore setstat), or None."""
    for item, outcome in zip(items, outcomes):
        reported = outcome.get("mtime")
        if reported is not None and reported != int(item["mtime"]):
            return item["dest"], int(item["mtime"]), reported
    return None


def check_written(item: dict, remote_size: int | None) -> None:
    """A whole file just written to its temp path: the source must not have changed meanwhile, and
    the target must hold exactly its size, before anything puts it in place."""
    problem = source_changed(item["local"], item["size"], item["mtime"])
    if problem:
        raise RemoteError(problem)
    if remote_size != item["size"]:
        raise RemoteError(f"{item['temp']!r} has {remote_size} bytes on the target after writing "
                          f"{item['size']}; the file was not put in place")


@dataclass(frozen=True, kw_only=True)
class WriteWhole(Job):
    """A file in one go: write, set mtime (and mode) and check size in one pipeline, then rename
    when `rename` (nothing has to happen between writing and renaming). The final mode is set here
    only then: a temp that waits for verification stays owner-only until Finalize."""

    local: str
    temp: str
    dest: str
    size: int
    mode: int
    mtime: float
    algorithm: str | None = None
    rename: bool = False

    def execute(self, remote, progress):
        hasher = new_hasher(self.algorithm) if self.algorithm else None
        started = time.time()
        meta = {"mode": self.mode if self.rename else None, "mtime": self.mtime}
        with open(self.local, "rb") as local:
            handle = remote.open_for_write(self.temp, truncate=True)
            written = remote.write_range(handle, self.temp, local.fileno(), 0, self.size, hasher,
                                         progress=progress, meta=meta, source=self.local)
        check_written({"local": self.local, "size": self.size, "mtime": self.mtime, "temp": self.temp},
                      written.get("size"))
        if self.rename:
            remote.rename_over(self.temp, self.dest)
        return {"digest": hasher.hexdigest() if hasher else None, "bytes_sent": self.size + self.sent_earlier,
                "started": started, "finished": time.time(),
                "mtime_not_kept": mtime_not_kept([{"dest": self.dest, "mtime": self.mtime}], [written])}

    def describe(self) -> str:
        return f"write {self.dest!r}"

    def writes(self):
        return os.path.dirname(self.temp) or "/", self.size


@dataclass(frozen=True, kw_only=True)
class WriteBatch(Job):
    """Small files, several to a job, in three round trips: opens; writes, attributes and closes;
    renames. With read_back (verify: checksum) every file is also read back in the second round
    trip and renamed only when what the target returned has the digest of the source; otherwise,
    as when the job does not rename, the coordinator checks and puts them in place.
    files: dicts {local, temp, dest, size, mode, mtime}."""

    files: tuple
    algorithm: str | None = None
    rename: bool = False
    read_back: bool = False

    def execute(self, remote, progress):
        files = self.files
        hashers = [new_hasher(self.algorithm) for _item in files] if self.algorithm else None
        read_back = [new_hasher(self.algorithm) for _item in files] if self.read_back else None
        started = time.time()
        written = remote.write_small_files([dict(item, mode=item["mode"] if self.rename else None) for item in files],
                                           hashers, progress, read_back)
        for item, outcome in zip(files, written):
            check_written(item, outcome["size"])
        digests = [hasher.hexdigest() for hasher in hashers] if hashers else [None] * len(files)
        in_place = bool(self.rename)
        if self.rename:
            remote.rename_many([(item["temp"], item["dest"]) for item in files])
        elif read_back is not None and all(outcome["read"] == item["size"] and back.hexdigest() == digest
                                           for item, outcome, back, digest in zip(files, written, read_back, digests)):
            # verified: now the final mode and mtime, then the renames (owner-only until then)
            remote.finalize_many([{"temp": item["temp"], "dest": item["dest"], "mode": item["mode"],
                                   "mtime": item["mtime"], "expect_size": None} for item in files])
            in_place = True
        return {"digests": digests, "in_place": in_place, "sent_earlier": self.sent_earlier,
                "started": started, "finished": time.time(), "mtime_not_kept": mtime_not_kept(files, written)}

    def describe(self) -> str:
        return f"write {len(self.files)} small files"

    def writes(self):
        return os.path.dirname(self.files[0]["temp"]) or "/", sum(item["size"] for item in self.files)


@dataclass(frozen=True, kw_only=True)
class Finalize(Job):
    """Final mode and mtime, a size check where asked, then the renames into place.
    files: dicts {temp, dest, mode, mtime, expect_size}."""

    files: tuple

    def execute(self, remote, progress):
        remote.finalize_many(list(self.files))
        return {}

    def describe(self) -> str:
        return f"put {len(self.files)} files in place"


@dataclass(frozen=True, kw_only=True)
class ReadDigests(Job):
    """Digests of [start, end) of a remote file in `block` pieces, read back over SFTP: the check
    for targets that run no commands (see _target_digests)."""

    path: str
    start: int
    end: int
    block: int
    algorithm: str

    def execute(self, remote, progress):
        return remote.read_digests(self.path, self.start, self.end, self.block, lambda: new_hasher(self.algorithm))

    def describe(self) -> str:
        return f"read back {self.path!r} [{self.start}, {self.end})"
