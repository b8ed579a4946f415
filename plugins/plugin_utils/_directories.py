# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The tree's directories on the target: created where missing, their attributes set last.

Only the directories this run creates get the source's mode and mtime (and owner/group): any that
existed before keep theirs, dest included, as with ansible.builtin.copy; a push into /tmp must never
make /tmp 0755.
"""

from __future__ import annotations

import posixpath

from ansible_collections.multipush.sftp.plugins.plugin_utils import _plan
from ansible_collections.multipush.sftp.plugins.plugin_utils._engine import EngineError
from ansible_collections.multipush.sftp.plugins.plugin_utils._jobs import Lstat, MakeDir, MakeDirs, SetStats
from ansible_collections.multipush.sftp.plugins.plugin_utils._push_state import PushRun

PARENT_MODE = 0o755
OWNER_RWX = 0o700


class Directories:
    def __init__(self, run: PushRun):
        self.run = run
        self.made_dirs: set[str] = set()  # tree directories this run created
        self.made_parents: list[str] = []  # directories above dest this run created

    def make(self, dirs: list, remote: dict) -> None:
        """Create the missing directories of the tree (and above dest), parents first."""
        self._create_dirs(dirs, remote)
        self._own_made_dirs(dirs)

    def set_attributes(self, dirs: list) -> None:
        """Mode and mtime of the directories this run created, deepest first and last of all: writing
        inside a directory changes its mtime. One pipelined job: a round trip for all of them. Owner and
        group (when given) ride on the same requests (RemoteFiles adds them to every setstat; the parents
        it created got theirs in _own_made_dirs). Directories that existed before are never touched: a
        re-run with nothing to send changes nothing."""
        items = self._attributes(dirs)
        if items:
            self.run.call(SetStats(items=items))

    def settle_after_failure(self, dirs: list) -> None:
        """After a failure, give the directories this run created their final mode and mtime anyway:
        a re-run finds them existing and, as with every existing directory, leaves them alone. Best
        effort, once, on a fresh connection (a run killed outright leaves them owner-writable)."""
        items = self._attributes(dirs)
        if not items:
            return
        try:
            with self.run.side_connection(retries=0) as settler:
                settler.submit(SetStats(items=items), lambda job, result: None)
                settler.run()
        except EngineError as exc:
            self.run.warn(f"could not set the mode and mtime of the {len(items)} directories this push created "
                          f"after the failure ({exc}); they stay owner-writable")

    def _attributes(self, dirs: list) -> tuple:
        return tuple((path, local.mode, local.mtime) for path, local in reversed(dirs) if path in self.made_dirs)

    def _own_made_dirs(self, dirs: list) -> None:
        """Owner and group of the directories just created, at once: a push interrupted before the end
        (where set_attributes sets their modes and mtimes) must not leave them to the SSH user, since a
        re-run takes them for existing directories and leaves them alone. One round trip, only with
        owner or group."""
        spec = self.run.spec
        if spec.owner is None and spec.group is None:
            return
        items = [(path, PARENT_MODE, None) for path in self.made_parents]
        items += [(path, local.mode | OWNER_RWX, None) for path, local in dirs if path in self.made_dirs]
        if items:
            self.run.call(SetStats(items=tuple(items)))

    def _create_dirs(self, dirs: list, remote: dict) -> None:
        dest = self.run.options.dest
        if not dirs:
            # a file src: its directory (dest's parent, or dest itself when it ends in '/')
            self._make_parents(dest.rstrip("/") if dest.endswith("/") else posixpath.dirname(dest.rstrip("/")),
                               remote)
            return
        root = dirs[0][0]
        self._make_parents(posixpath.dirname(root), remote)
        by_depth: dict[int, list] = {}
        for path, local in dirs:
            if remote.get(path) is None:
                by_depth.setdefault(path.count("/"), []).append((path, local))
            else:  # a directory, or a symlink to one (written through); anything else was refused by the survey
                _plan.check_directory_place(path, local.rel, remote[path])
        # Parents before children in one job: the server runs one session's requests in order.
        # Owner-writable while we fill them; the real modes are applied at the end.
        missing = tuple((path, local.mode | OWNER_RWX) for depth in sorted(by_depth) for path, local in by_depth[depth])
        if missing:
            result = self.run.call(MakeDirs(dirs=missing))
            self._dirs_made(missing, result["created"])

    def _dirs_made(self, missing: tuple, created: list) -> None:
        # False: it appeared since the survey (another push made it): not ours to set
        self.made_dirs.update(path for (path, _mode), made in zip(missing, created) if made)
        self.run.dirs_created += sum(created)
        self.run.changed |= any(created)

    def _make_parents(self, path: str, remote: dict) -> None:
        """mkdir -p for the directories above dest, created only where missing."""
        if not path or path == "/":
            return
        # The survey stat'ed dest and its parent already; deeper parents are asked for here.
        entry = remote[path] if path in remote else self.run.call(Lstat(path=path))["entry"]
        if entry is not None:
            if entry.kind not in ("directory", "link"):  # a link to a directory is a fine parent
                raise EngineError(f"{path!r} on the target is {entry.described}, not a directory; choose another dest")
            return
        self._make_parents(posixpath.dirname(path), remote)
        if self.run.call(MakeDir(path=path, mode=PARENT_MODE)).get("created"):
            self.made_parents.append(path)
            self.run.dirs_created += 1
            self.run.changed = True
