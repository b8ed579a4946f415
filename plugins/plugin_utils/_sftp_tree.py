# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The tree side of a worker's SFTP session: what is there (survey, stat, lstat, readlink,
realpath, free space), and the names and attributes of what the push makes (directories, their
modes and mtimes, renames into place, removals, symlinks). Many paths are handled in one pipeline:
the server runs a session's requests in order, so a batch costs a round trip, not one per path.

`TreeOperations` is a part of `_sftp.RemoteFiles`, which provides `sftp`, `transport`,
`_classified`, `_close_quietly` and `_owned_attributes`.
"""

from __future__ import annotations

from ansible_collections.multipush.sftp.plugins.plugin_utils import _paramiko_compat
from ansible_collections.multipush.sftp.plugins.plugin_utils._plan import RemoteEntry, displaced_path
from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp_errors import (
    SFTP_BAD_MESSAGE, SFTP_EOF, SFTP_FAILURE, SFTP_NO_SUCH_FILE, SFTP_OP_UNSUPPORTED, RemoteError, remedy, status_text,
)
from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp_pipeline import (
    BATCH_OUTSTANDING_REQUESTS, Pipeline, attributes_in, entry_of, new_attributes,
)
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import paramiko

if paramiko is not None:
    from paramiko.sftp import (
        CMD_ATTRS, CMD_CLOSE, CMD_EXTENDED, CMD_EXTENDED_REPLY, CMD_HANDLE, CMD_LSTAT, CMD_MKDIR, CMD_NAME,
        CMD_OPENDIR, CMD_READDIR, CMD_REMOVE, CMD_RENAME, CMD_SETSTAT, CMD_STATUS, CMD_SYMLINK,
    )

NAMES_PER_READDIR = 100  # OpenSSH's sftp-server sends at most this many names per reply
STATVFS_READ_ONLY = 0x1  # SSH2_FXE_STATVFS_ST_RDONLY
# How servers answer an extended request they do not know: OpenSSH's and most others with "operation
# unsupported", some with "bad message".
EXTENSION_UNKNOWN = (SFTP_OP_UNSUPPORTED, SFTP_BAD_MESSAGE)


class TreeOperations:
    """Paths, directories and names on the target."""

    # -- one path ------------------------------------------------------------------------------

    def lstat(self, path: str) -> RemoteEntry | None:
        with self._classified(f"lstat {path!r}"):
            try:
                return entry_of(self.sftp.lstat(path))
            except FileNotFoundError:
                return None

    def stat(self, path: str) -> RemoteEntry | None:
        """What `path` leads to through symlinks; None when nothing does (missing, dangling, a loop)."""
        with self._classified(f"stat {path!r}"):
            try:
                return entry_of(self.sftp.stat(path))
            except FileNotFoundError:
                return None

    def readlink(self, path: str) -> str | None:
        with self._classified(f"readlink {path!r}"):
            try:
                return self.sftp.readlink(path)
            except FileNotFoundError:
                return None

    def realpath(self, path: str) -> str:
        """The server's canonical absolute path of `path` (SSH_FXP_REALPATH)."""
        with self._classified(f"realpath {path!r}"):
            return self.sftp.normalize(path)

    def fs_status(self, path: str) -> tuple[int | None, bool]:
        """(bytes available to the user, read-only?) at path (statvfs@openssh.com); (None, False) if unknown."""
        try:
            reply_type, msg = _paramiko_compat.request(self.sftp, CMD_EXTENDED, "statvfs@openssh.com", path)
        except Exception:
            return None, False
        if reply_type != CMD_EXTENDED_REPLY:
            return None, False
        fields = [msg.get_int64() for _field in range(11)]
        frsize, bavail, flags = fields[1], fields[4], fields[9]
        return frsize * bavail, bool(flags & STATVFS_READ_ONLY)

    def mkdir(self, path: str, mode: int) -> bool:
        """Create a directory; False when it already existed as a directory."""
        return self.mkdir_many([(path, mode)])[0]

    def rename_over(self, source: str, target: str) -> None:
        """Replace target with source: atomically with posix-rename@openssh.com; on a server without
        that extension, as _rename_without_posix_rename does."""
        what = f"rename {source!r} to {target!r}"
        if not getattr(self.sftp, "multipush_no_posix_rename", False):
            status = self._status_of(what, CMD_EXTENDED, "posix-rename@openssh.com", source, target)
            if status is None:
                return
            if status[0] not in EXTENSION_UNKNOWN:
                raise RemoteError(f"{what} failed: {status_text(status)}{remedy(status[0])}", status[0])
            self.sftp.multipush_no_posix_rename = True  # the rest of this session's renames go straight there
        self._rename_without_posix_rename(source, target)

    def _rename_without_posix_rename(self, source: str, target: str) -> None:
        """SFTP version 3's rename, which most servers other than OpenSSH's refuse when target exists.
        Then the file at target first moves aside to a temp name, the new file takes the name and the
        old one is removed: a reader may find no file at target for that moment, never a partial one.
        A push cut short between the two renames leaves the old file under its temp name, which the
        next run removes; a refused second rename puts the old file back."""
        what = f"rename {source!r} to {target!r}"
        status = self._status_of(what, CMD_RENAME, source, target)
        if status is None:
            return
        if self.lstat(target) is None:
            raise RemoteError(f"{what} failed: {status_text(status)}{remedy(status[0])}", status[0])
        aside = displaced_path(target)
        moved = self._status_of(f"move {target!r} aside", CMD_RENAME, target, aside)
        if moved is not None:
            raise RemoteError(f"{what}: the server has no posix-rename@openssh.com and refuses to rename over an "
                              f"existing file, and moving {target!r} aside to {aside!r} failed: "
                              f"{status_text(moved)}{remedy(moved[0])}", moved[0])
        placed = self._status_of(what, CMD_RENAME, source, target)
        if placed is not None:
            self._status_of(f"move {aside!r} back", CMD_RENAME, aside, target)
            raise RemoteError(f"{what} failed: {status_text(placed)}{remedy(placed[0])}; the old file stays",
                              placed[0])
        # Not removed (refused, or the connection went): the next run's stale-temp removal finds it.
        self._status_of(f"remove {aside!r}", CMD_REMOVE, aside)

    def _status_of(self, what: str, command: int, *args) -> tuple[int, str] | None:
        """Send one request: None when it succeeded, else the server's (code, text)."""
        pipeline = Pipeline(self.sftp, what, tolerant=True)
        with self._classified(what):
            num = pipeline.send(command, *args, label=what)
            pipeline.drain()
        reply_type, status = pipeline.replies.pop(num, (None, None))
        return status if reply_type == CMD_STATUS else None

    def remove(self, path: str) -> None:
        """`path` is gone afterwards; one that never was is no error. A server that refuses every
        removal (read-only) may refuse it before it looks: then whether the file is there decides."""
        with self._classified(f"remove {path!r}"):
            try:
                self.sftp.remove(path)
            except FileNotFoundError:
                pass
            except PermissionError:
                if self.lstat(path) is not None:
                    raise

    def symlink(self, target: str, path: str) -> None:
        what = f"create symlink {path!r}"
        # The arguments in Paramiko's order, which is OpenSSH's (the link's target first).
        status = self._status_of(what, CMD_SYMLINK, target, path)
        if status is None:
            return
        hint = remedy(status[0])
        if status[0] in (SFTP_OP_UNSUPPORTED, SFTP_FAILURE) and not hint:
            hint = (" — if this SFTP server cannot make symbolic links (Windows servers and object-storage gateways "
                    "often cannot), push with `follow: true` to copy what each link points to, or leave the links "
                    "out with `exclude`")
        raise RemoteError(f"{what}: {status_text(status)}{hint}", status[0])

    # -- many paths at once --------------------------------------------------------------------

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
        with self._classified("list directories"):
            stats = [(path, pipeline.send(CMD_LSTAT, path, label=f"stat {path!r}")) for path in stat_paths]
            while readdirs:
                opens = [(path, pipeline.send(CMD_OPENDIR, path, label=f"open directory {path!r}"))
                         for path in readdirs]
                pipeline.drain()
                for path, num in stats:
                    entries[path] = self._stat_reply(path, *pipeline.replies.pop(num))
                stats = []
                handles = self._directory_handles(pipeline, opens, listing)
                readdirs = self._list_round(pipeline, handles, readdirs, listing)
        return entries, listing

    def _directory_handles(self, pipeline: Pipeline, opens: list, listing: dict) -> dict[str, bytes]:
        """The handles of the directories that opened; a missing one lists as None."""
        handles = {}
        for path, num in opens:
            reply_type, msg = pipeline.replies.pop(num)
            if reply_type == CMD_HANDLE:
                handles[path] = msg.get_binary()
            elif reply_type == CMD_STATUS and msg[0] == SFTP_NO_SUCH_FILE:
                listing[path] = None
            else:
                self._refuse_many(f"list directory {path!r}", msg, handles.values())
        return handles

    def _list_round(self, pipeline: Pipeline, handles: dict, readdirs: dict, listing: dict) -> dict:
        """Read the open directories (readdirs, then their close); the directories to read again."""
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
        pipeline.replies.clear()  # a refused close of a directory handle loses nothing
        return again

    def _stat_reply(self, path: str, reply_type, msg) -> RemoteEntry | None:
        if reply_type == CMD_ATTRS:
            return entry_of(attributes_in(msg))
        if reply_type == CMD_STATUS and msg[0] == SFTP_NO_SUCH_FILE:
            return None
        code = msg[0] if reply_type == CMD_STATUS else None
        raise RemoteError(f"lstat {path!r}: {status_text(msg) if code is not None else reply_type}{remedy(code)}",
                          code)

    def _read_names(self, path: str, replies: list) -> tuple[dict[str, RemoteEntry] | None, bool]:
        """The entries in readdir replies, and whether they reached the end of the directory.
        None: a readdir said "no such file" (the directory is missing, or not a directory)."""
        names: dict[str, RemoteEntry] = {}
        for reply_type, msg in replies:
            if reply_type == CMD_NAME:
                for _count in range(msg.get_int()):
                    name, longname = msg.get_text(), msg.get_text()
                    attrs = attributes_in(msg, name, longname)
                    if name not in (".", ".."):
                        names[name] = entry_of(attrs)
            elif reply_type == CMD_STATUS and msg[0] == SFTP_EOF:
                return names, True
            elif reply_type == CMD_STATUS and msg[0] == SFTP_NO_SUCH_FILE:
                return None, True
            else:
                raise RemoteError(f"list directory {path!r}: "
                                  f"{status_text(msg) if reply_type == CMD_STATUS else reply_type}")
        return names, False

    def _refuse_many(self, context: str, status: tuple[int, str], handles) -> None:
        self._close_quietly(handles)
        raise RemoteError(f"{context}: {status_text(status)}", status[0])

    def mkdir_many(self, dirs: list[tuple[str, int]]) -> list[bool]:
        """Create directories (path, mode), parents listed before children, in one round trip:
        the server runs requests in order. Per directory, whether it was created (False: it
        already existed as a directory)."""
        pipeline = Pipeline(self.sftp, "create directories", BATCH_OUTSTANDING_REQUESTS, tolerant=True)
        with self._classified("create directories"):
            nums = []
            for path, mode in dirs:
                nums.append(pipeline.send(CMD_MKDIR, path, new_attributes(mode), label=f"create directory {path!r}"))
            pipeline.drain()
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
                raise RemoteError(f"cannot create directory {path!r}: {existing.described} with that name exists; "
                                  "remove it or choose another dest")
            else:
                raise RemoteError(f"create directory {path!r}: {status_text(status)}{remedy(status[0])}", status[0])
        return created

    def setstat_many(self, items: list[tuple[str, int | None, float | None]]) -> None:
        """Set (path, mode, mtime) of many paths in one round trip; the first refusal fails the job."""
        pipeline = Pipeline(self.sftp, "set directory attributes", BATCH_OUTSTANDING_REQUESTS)
        with self._classified("set directory attributes"):
            try:
                for path, mode, mtime in items:
                    pipeline.send(CMD_SETSTAT, path, self._owned_attributes(mode, mtime),
                                  label=f"set mode/mtime of {path!r}")
                pipeline.drain()
            except RemoteError as exc:
                raise RemoteError(f"{exc}{remedy(exc.code)}", exc.code) from None

    def finalize_many(self, files: list[dict]) -> None:
        """Final mode and mtime of temp files, a size check where asked, then the renames into place.
        Nothing is renamed unless every file passed its size check, and no file reaches its name
        without its owner and group: those cases take two round trips for the lot. Otherwise the
        renames follow each file's setstat in the same pipeline: the server runs a session's
        requests in order, so every file has its mode and mtime before its name, in one round trip.

        files: dicts {temp, dest, mode, mtime, expect_size (None: no check)}.
        """
        checked = any(item.get("expect_size") is not None for item in files)
        owned = (getattr(self.sftp, "multipush_uid", None), getattr(self.sftp, "multipush_gid", None)) != (None, None)
        if not checked and not owned:
            self._set_and_rename(files)
            return
        pipeline = Pipeline(self.sftp, "set the final attributes", BATCH_OUTSTANDING_REQUESTS)
        with self._classified("set the final attributes"):
            checks = []
            for item in files:
                pipeline.send(CMD_SETSTAT, item["temp"], self._owned_attributes(item["mode"], item["mtime"]),
                              label=f"set mode/mtime of {item['temp']!r}")
                if item.get("expect_size") is not None:
                    checks.append((item, pipeline.send(CMD_LSTAT, item["temp"], label=f"stat {item['temp']!r}")))
            pipeline.drain()
            for item, num in checks:
                size = attributes_in(pipeline.reply(num, CMD_ATTRS, f"stat {item['temp']!r}")).st_size
                if size != item["expect_size"]:
                    raise RemoteError(f"{item['temp']!r} has {size} bytes on the target, expected "
                                      f"{item['expect_size']}; the file was not put in place")
        self.rename_many([(item["temp"], item["dest"]) for item in files])

    def _set_and_rename(self, files: list[dict]) -> None:
        """Each file's final mode and mtime, then its rename, all in one pipeline (see finalize_many).
        A refused setstat fails the job, naming the file; a server without posix-rename gets the
        renames that it refused again, one by one."""
        pipeline = Pipeline(self.sftp, "put files in place", BATCH_OUTSTANDING_REQUESTS, tolerant=True)
        with self._classified("put files in place"):
            sent = []
            for item in files:
                attrs = self._owned_attributes(item["mode"], item["mtime"])
                attributes = pipeline.send(CMD_SETSTAT, item["temp"], attrs)
                renamed = pipeline.send(CMD_EXTENDED, "posix-rename@openssh.com", item["temp"], item["dest"])
                sent.append((item, attributes, renamed))
            pipeline.drain()
        unsupported = []
        for item, attributes, renamed in sent:
            for num, what in ((attributes, f"set mode/mtime of {item['temp']!r}"),
                              (renamed, f"rename {item['temp']!r} to {item['dest']!r}")):
                reply_type, status = pipeline.replies.pop(num, (None, None))
                if reply_type != CMD_STATUS:
                    continue
                if num == renamed and status[0] in EXTENSION_UNKNOWN:
                    unsupported.append((item["temp"], item["dest"]))
                    continue
                raise RemoteError(f"put files in place: {what} failed: {status_text(status)}{remedy(status[0])}",
                                  status[0])
        for source, target in unsupported:  # a server without the extension: one by one
            self.rename_over(source, target)

    def rename_many(self, pairs: list[tuple[str, str]]) -> None:
        """Atomically replace each target with its source (posix-rename@openssh.com, pipelined)."""
        if getattr(self.sftp, "multipush_no_posix_rename", False):
            for source, target in pairs:
                self.rename_over(source, target)
            return
        pipeline = Pipeline(self.sftp, "rename into place", BATCH_OUTSTANDING_REQUESTS)
        with self._classified("rename into place"):
            try:
                for source, target in pairs:
                    pipeline.send(CMD_EXTENDED, "posix-rename@openssh.com", source, target,
                                  label=f"rename {source!r} to {target!r}")
                pipeline.drain()
            except RemoteError as exc:
                if exc.code not in EXTENSION_UNKNOWN:
                    raise
                for source, target in pairs:  # a server without the extension: one by one
                    self.rename_over(source, target)
