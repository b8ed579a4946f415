# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Planning a push: what is on the controller, where it goes, and what has to travel.

Everything here is a pure function of its inputs except `scan_source`, which only reads the
local filesystem. Nothing here talks to the network; the engine executes what this decides.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import math
import os
import posixpath
import re
import secrets
import stat
from dataclasses import dataclass, field

from ansible_collections.multipush.sftp.plugins.module_utils._digest import split_ranges

MIB = 1024 * 1024
# mscp's rule: enough chunks to keep every connection busy while the tail finishes, but each
# chunk large enough that per-chunk costs (open, acknowledgements, digests) stay negligible.
AUTO_CHUNKS_PER_CONNECTION = 4
AUTO_CHUNK_FLOOR = 16 * MIB
AUTO_CHUNK_CEILING = 1024 * MIB
MIN_CHUNK_SIZE = 64 * 1024
# Files up to this size travel several to a job: a batch costs three round trips (opens; writes,
# attributes and closes; renames) whatever its size, where one file alone costs four.
SMALL_FILE_LIMIT = MIB
BATCH_MAX_FILES = 64
BATCH_MAX_BYTES = 8 * MIB

# Why a file was skipped (RETURN files[].reason in plugins/modules/push.py).
SAME_SIZE_MTIME = "same size and mtime"  # rsync's quick check; compare: checksum finds edits it cannot
SAME_CHECKSUM = "same checksum"
TEMP_SUFFIX = ".multipush.tmp"

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": MIB, "mb": 1000**2, "mib": MIB,
               "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class PlanError(ValueError):
    """Bad input found while planning; the message says what and how to fix it."""


@dataclass(frozen=True)
class LocalFile:
    rel: str  # path relative to the tree root, '/'-separated; the basename for a single-file src
    path: str  # absolute local path
    size: int
    mtime: float
    mode: int  # permission bits only


@dataclass(frozen=True)
class LocalDir:
    rel: str  # '' is the tree root itself
    path: str
    mtime: float
    mode: int


@dataclass(frozen=True)
class LocalLink:
    rel: str
    path: str
    target: str


@dataclass
class SourceTree:
    """What `scan_source` found. `is_dir` tells whether src itself is a directory."""

    root: str
    is_dir: bool
    contents_only: bool  # rsync's trailing slash: copy what is in src, not src itself
    files: list[LocalFile] = field(default_factory=list)
    dirs: list[LocalDir] = field(default_factory=list)
    links: list[LocalLink] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # warnings about special files

    @property
    def total_bytes(self) -> int:
        return sum(item.size for item in self.files)


# A path whose attributes carry no file type is "other": a device, FIFO or socket, or an entry of a
# server that did not say (SFTP's attributes may leave the permissions out).
KIND_NAMES = {"file": "a file", "directory": "a directory", "link": "a symlink",
              "other": "a special file (or one whose type the SFTP server did not report)"}


@dataclass(frozen=True)
class RemoteEntry:
    """What the target has at one path (from an SFTP lstat or directory listing)."""

    kind: str  # file, directory, link, other
    size: int = 0
    mtime: int = 0
    mode: int = 0
    # For a link: the kind of what it leads to once resolved ('directory', 'file', 'other', 'missing' for a
    # dangling link), None while not known.
    leads_to: str | None = None

    @property
    def described(self) -> str:
        """Its kind as messages name it ("a file", "a special file or one the server gave no type for")."""
        return KIND_NAMES.get(self.kind, f"a {self.kind}")

    @property
    def is_directory(self) -> bool:
        """A directory, or a symlink that leads to one (written through, like copy and rsync do)."""
        return self.kind == "directory" or (self.kind == "link" and self.leads_to == "directory")


@dataclass
class FilePlan:
    local: LocalFile
    dest: str  # final remote path
    action: str  # send, skip
    reason: str  # new, size, mtime, checksum, type; SAME_SIZE_MTIME, SAME_CHECKSUM, exists (force=false)
    chunk_size: int
    ranges: list[tuple[int, int]]

    @property
    def temp(self) -> str:
        return temp_path(self.dest, self.local)


def parse_size(value, option: str = "chunk_size") -> int:
    """'64M', '1.5GiB', '65536' or an int -> bytes. K/M/G/T alone are binary (1024-based)."""
    if isinstance(value, bool):
        raise PlanError(f"{option} must be a size like 64M or 1G, not a boolean")
    if isinstance(value, int):
        number = value
    else:
        match = _SIZE_RE.match(str(value))
        unit = match.group(2).lower() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise PlanError(
                f"{option}={value!r} is not a size: use a number of bytes or a number with a unit "
                "such as 512K, 64M or 1G (or 'auto' where allowed)"
            )
        number = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if number <= 0:
        raise PlanError(f"{option}={value!r} must be larger than zero")
    return number


def auto_chunk_size(size: int, connections: int) -> int:
    """Chunk size for one file when the user left chunk_size at 'auto'."""
    if size <= 0:
        return AUTO_CHUNK_FLOOR
    wanted = math.ceil(size / (max(connections, 1) * AUTO_CHUNKS_PER_CONNECTION))
    wanted = min(max(wanted, AUTO_CHUNK_FLOOR), AUTO_CHUNK_CEILING)
    return math.ceil(wanted / MIB) * MIB


def chunk_size_for(size: int, setting, connections: int) -> int:
    if setting in (None, "auto"):
        return auto_chunk_size(size, connections)
    chunk = parse_size(setting)
    if chunk < MIN_CHUNK_SIZE:
        raise PlanError(f"chunk_size={setting!r} is below the minimum of 64K; use 64K or more, or 'auto'")
    return chunk


def _excluded(rel: str, patterns: list[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, pattern) or fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _check_name(path: str) -> None:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise PlanError(
            f"{path.encode('utf-8', 'surrogateescape')!r} has a name that is not valid UTF-8; SFTP paths "
            "are UTF-8 by protocol. Rename it, or exclude it with `exclude`"
        ) from None


def scan_source(src: str, follow: bool = False, exclude: list[str] | None = None) -> SourceTree:
    """Walk src (a file or a directory) and return what is to be pushed.

    Symlinks are recreated as links unless `follow` is set, in which case they are walked
    through with loop detection. Sockets, FIFOs and devices are skipped with a warning.
    """
    patterns = list(exclude or [])
    contents_only = src.endswith("/")
    root = os.path.abspath(os.path.expanduser(src))
    try:
        top = os.stat(root) if follow or contents_only else os.lstat(root)
    except FileNotFoundError:
        raise PlanError(f"src {src!r} does not exist on the controller; check the path") from None
    except PermissionError:
        raise PlanError(f"src {src!r} cannot be read on the controller (permission denied)") from None
    _check_name(root)

    if stat.S_ISLNK(top.st_mode):
        # A top-level link is a "file" to copy as a link only when it is not followed.
        tree = SourceTree(root=root, is_dir=False, contents_only=False)
        tree.links.append(LocalLink(rel=os.path.basename(root), path=root, target=os.readlink(root)))
        return tree
    if stat.S_ISREG(top.st_mode):
        if contents_only:
            raise PlanError(f"src {src!r} ends with '/' but is a file; drop the trailing slash")
        _ensure_readable(root)
        tree = SourceTree(root=root, is_dir=False, contents_only=False)
        tree.files.append(_local_file(os.path.basename(root), root, top))
        return tree
    if not stat.S_ISDIR(top.st_mode):
        raise PlanError(f"src {src!r} is not a regular file or directory (socket, FIFO or device); nothing to push")

    tree = SourceTree(root=root, is_dir=True, contents_only=contents_only)
    tree.dirs.append(LocalDir(rel="", path=root, mtime=top.st_mtime, mode=stat.S_IMODE(top.st_mode)))
    visited = {(top.st_dev, top.st_ino)}
    _walk(tree, root, "", follow, patterns, visited)
    return tree


def _local_file(rel: str, path: str, info: os.stat_result) -> LocalFile:
    return LocalFile(rel=rel, path=path, size=info.st_size, mtime=info.st_mtime, mode=stat.S_IMODE(info.st_mode))


def _ensure_readable(path: str) -> None:
    if not os.access(path, os.R_OK):
        raise PlanError(f"{path!r} cannot be read on the controller (permission denied); fix its mode or exclude it")


def _walk(tree: SourceTree, directory: str, rel_dir: str, follow: bool, patterns: list[str], visited: set) -> None:
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except PermissionError:
        raise PlanError(f"directory {directory!r} cannot be listed on the controller (permission denied)") from None
    for entry in entries:
        rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
        if _excluded(rel, patterns):
            continue
        _check_name(entry.path)
        info = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            if not follow:
                tree.links.append(LocalLink(rel=rel, path=entry.path, target=os.readlink(entry.path)))
                continue
            try:
                info = os.stat(entry.path)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise PlanError(f"symlink loop: {entry.path!r} points back to itself through "
                                    f"{os.readlink(entry.path)!r}; exclude it or use follow: false") from None
                raise PlanError(
                    f"symlink {entry.path!r} points to {os.readlink(entry.path)!r}, which does not exist; "
                    "fix or exclude it, or push links as links (follow: false)"
                ) from None
        if stat.S_ISDIR(info.st_mode):
            key = (info.st_dev, info.st_ino)
            if key in visited:
                raise PlanError(
                    f"symlink loop: {entry.path!r} leads back to a directory already being pushed; "
                    "exclude it or use follow: false"
                )
            tree.dirs.append(LocalDir(rel=rel, path=entry.path, mtime=info.st_mtime, mode=stat.S_IMODE(info.st_mode)))
            _walk(tree, entry.path, rel, follow, patterns, visited | {key})
        elif stat.S_ISREG(info.st_mode):
            _ensure_readable(entry.path)
            tree.files.append(_local_file(rel, entry.path, info))
        else:
            tree.skipped.append(f"skipped {entry.path!r}: sockets, FIFOs and devices are not pushed")


def dest_root(tree: SourceTree, dest: str, dest_kind: str | None) -> str:
    """Where a directory src lands, following ansible.builtin.copy and rsync's trailing-slash rule.

    dest_kind is what the target has at `dest` now: 'directory', 'file', another kind, or None.
    """
    if dest_kind == "link":
        raise PlanError(f"dest {dest!r} is a symlink on the target that does not lead to a directory (it dangles or "
                        "points to a file), but src is a directory; point the link at a directory, remove it, or "
                        "choose another dest")
    if dest_kind not in (None, "directory"):
        raise PlanError(f"dest {dest!r} exists on the target as a {dest_kind}, but src is a directory; "
                        "choose a directory path for dest")
    base = dest.rstrip("/") or "/"
    if tree.contents_only:
        return base
    return posixpath.join(base, os.path.basename(tree.root))


def file_dest(tree: SourceTree, dest: str, dest_kind: str | None, rel: str) -> str:
    """Final remote path of one entry of the tree. dest_kind 'directory' includes a symlink to a directory
    (written through); 'link' is a symlink to anything else, which a single file replaces like any file
    (force permitting), as ansible.builtin.copy does."""
    if not tree.is_dir:
        if dest.endswith("/") or dest_kind == "directory":
            return posixpath.join(dest.rstrip("/") or "/", rel)
        if dest_kind not in (None, "file", "link"):
            raise PlanError(f"dest {dest!r} exists on the target as a {dest_kind}; remove it or choose another dest")
        return dest
    return posixpath.join(dest_root(tree, dest, dest_kind), rel) if rel else dest_root(tree, dest, dest_kind)


def temp_path(dest: str, local: LocalFile) -> str:
    """Temp name in the destination directory, stable for one source version.

    Stable so a later run can find and resume it; different for different sources or
    versions, so two pushes to the same directory never share a temp file.
    """

    identity = f"{local.path}\0{local.size}\0{int(local.mtime * 1e9)}".encode("utf-8", "surrogateescape")
    return _temp_name(dest, hashlib.sha1(identity, usedforsecurity=False).hexdigest()[:12])


def displaced_path(dest: str) -> str:
    """Where the file at dest moves aside while a new one takes its name, on a server that cannot
    rename over an existing file: a temp name of its own (a run cut short leaves it to the next
    run's stale-temp removal), random so that two pushes never pick the same."""
    return _temp_name(dest, secrets.token_hex(6))


def _temp_name(dest: str, token: str) -> str:
    directory, name = posixpath.split(dest)
    # Keep the whole name within NAME_MAX (255) even for long basenames.
    short = name if len(name.encode("utf-8")) <= 200 else name.encode("utf-8")[:200].decode("utf-8", "ignore")
    return posixpath.join(directory, f".{short}.{token}{TEMP_SUFFIX}")


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<token>[0-9a-f]{12}|link)" + re.escape(TEMP_SUFFIX) + "$")


def is_temp_name(name: str) -> bool:
    """Whether a directory entry is a temp file of this collection."""
    return _TEMP_NAME.match(name) is not None


def temp_owner(temp: str) -> str:
    """The final path a temp file was meant for."""
    directory, name = posixpath.split(temp)
    match = _TEMP_NAME.match(name)
    return posixpath.join(directory, match.group("name")) if match else temp


def link_temp_path(dest: str) -> str:
    directory, name = posixpath.split(dest)
    return posixpath.join(directory, f".{name}.link{TEMP_SUFFIX}")


def decide(local: LocalFile, remote: RemoteEntry | None, compare: str, force: bool,
           local_digest: str | None = None, remote_digest: str | None = None) -> tuple[str, str]:
    """('send' | 'skip', reason) for one file, rsync's quick check by default."""
    if remote is None:
        return "send", "new"
    if remote.kind == "directory":
        raise PlanError(f"the target has a directory where file {local.rel!r} should go; remove it or change dest")
    if not force:
        return "skip", "exists"
    if remote.kind != "file":
        return "send", "type"
    if remote.size != local.size:
        return "send", "size"
    if compare == "checksum":
        if local_digest is None or remote_digest is None:
            raise ValueError("compare=checksum needs both digests")
        return ("skip", SAME_CHECKSUM) if local_digest == remote_digest else ("send", "checksum")
    if remote.mtime != int(local.mtime):
        return "send", "mtime"
    # The content is not read: an edit that kept size and mtime is not seen (compare: checksum sees it).
    return "skip", SAME_SIZE_MTIME


def leading_to(entry: RemoteEntry, kind: str | None) -> RemoteEntry:
    """A symlink's entry, told what it leads to (a kind, or 'missing' when it dangles)."""
    return RemoteEntry(kind=entry.kind, size=entry.size, mtime=entry.mtime, mode=entry.mode, leads_to=kind or "missing")


def check_directory_place(path: str, rel: str, entry: RemoteEntry | None) -> None:
    """Refuse what stands where the directory `rel` of the tree is to be (or is written through)."""
    if entry is None or entry.is_directory:
        return
    if entry.kind == "link":
        leads = {"missing": "dangles (its target does not exist)", "file": "points to a file"}.get(
            entry.leads_to or "", "does not lead to a directory")
        raise PlanError(f"the target has a symlink at {path!r} that {leads}, where the directory {rel or '.'!r} of "
                        "src goes; point the link at a directory, remove it, or choose another dest")
    raise PlanError(f"the target has {entry.described} at {path!r} where a directory should go; "
                    "remove it or choose another dest")


def source_changed(path: str, size: int, mtime: float) -> str | None:
    """Why the source is no longer the version that was planned and sent, or None if it still is."""
    try:
        now = os.stat(path)
    except OSError as exc:
        return f"source {path!r} vanished during the push ({exc.strerror}); nothing was put in place for it"
    if now.st_size != size or now.st_mtime != mtime:
        return (f"source {path!r} changed while it was being pushed (size or mtime differ); nothing was put in "
                "place for it. Push again once it is no longer being written")
    return None


def plan_file(local: LocalFile, dest: str, action: str, reason: str, chunk_setting, connections: int) -> FilePlan:
    chunk = chunk_size_for(local.size, chunk_setting, connections)
    ranges = split_ranges(local.size, chunk) if action == "send" else []
    return FilePlan(local=local, dest=dest, action=action, reason=reason, chunk_size=chunk, ranges=ranges)


def small_file_batches(sizes: list[int], connections: int) -> list[list[int]]:
    """Group small files (by index into `sizes`) into batches for one job each.

    Every connection gets a share, since a batch's cost is mostly round trips, not bytes; no batch
    holds more than BATCH_MAX_FILES files (each an open handle on the server until the batch
    closes it) or more than BATCH_MAX_BYTES (a lost connection sends the whole batch again).
    """
    if not sizes:
        return []
    per_batch = max(1, min(BATCH_MAX_FILES, math.ceil(len(sizes) / max(1, connections))))
    batches: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for index, size in enumerate(sizes):
        if current and (len(current) >= per_batch or current_bytes + size > BATCH_MAX_BYTES):
            batches.append(current)
            current, current_bytes = [], 0
        current.append(index)
        current_bytes += size
    batches.append(current)
    return batches


def remote_dirs_to_create(tree: SourceTree, dest: str, dest_kind: str | None) -> list[tuple[str, LocalDir]]:
    """Remote directories of the tree, parents before children."""
    if not tree.is_dir:
        return []
    pairs = [(file_dest(tree, dest, dest_kind, item.rel), item) for item in tree.dirs]
    return sorted(pairs, key=lambda pair: (pair[0].count("/"), pair[0]))
