# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The survey: what the target already has where the tree goes, and the plan made from it.

Lists every directory that may receive files (for each kind dest may turn out to be, so no round
trip waits to learn it), stats dest and its parent alongside, follows symlinked directories, asks
for digests where compare: checksum needs them, and decides per file: send or skip, and why.
"""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ansible_collections.multipush.sftp.plugins.plugin_utils._fast_crc import file_digest
from ansible_collections.multipush.sftp.plugins.plugin_utils import _plan
from ansible_collections.multipush.sftp.plugins.plugin_utils._arguments import connection_ceiling
from ansible_collections.multipush.sftp.plugins.plugin_utils._jobs import Stat, Survey as SurveyJob
from ansible_collections.multipush.sftp.plugins.plugin_utils._push_state import PushRun

# Directories listed by one job (each holds a directory handle on the server while it is read).
LISTING_GROUP = 128
LOCAL_HASH_THREADS = 4


@dataclass
class Planned:
    """The survey's outcome: per file a plan, the tree's directories (remote path, local dir), its
    links (local link, remote path), what the target has (path -> entry or None) and the temp
    files found in the receiving directories."""

    plans: list
    dirs: list
    links: list
    remote: dict
    temps_found: dict


class Survey:
    """Surveys the target for one tree. `target`: the push's TargetDigests (compare: checksum)."""

    def __init__(self, run: PushRun, target):
        self.run = run
        self.target = target
        self.listings: dict[str, dict | None] = {}  # survey results until dest's kind says which count
        self.temps_found: dict[str, _plan.RemoteEntry] = {}

    def plan(self, tree: _plan.SourceTree) -> Planned:
        options = self.run.options
        remote = self._read(tree)
        dest_key = options.dest.rstrip("/") or "/"
        # dest a symlink to a directory (current -> releases/42): written through, as copy and rsync do
        dest_entry = self._through_link(dest_key, remote.pop(options.dest))
        remote[dest_key] = dest_entry
        dest_kind = ("directory" if dest_entry.is_directory else dest_entry.kind) if dest_entry else None
        dirs = _plan.remote_dirs_to_create(tree, options.dest, dest_kind)
        # Only the listings of the directories that do receive files count (temps found there are
        # resumed or removed); the other guess's listing is dropped.
        for directory in sorted(self._receiving_dirs(tree, dest_kind)):
            self._record_listing(remote, directory, self.listings.get(directory))
        for path, local in dirs:  # a directory of the tree may be a symlink on the target, too
            remote[path] = self._through_link(path, remote.get(path))
            _plan.check_directory_place(path, local.rel, remote[path])
        self.listings = {}

        destinations = [(item, _plan.file_dest(tree, options.dest, dest_kind, item.rel)) for item in tree.files]
        digests = self._checksums_for_compare(destinations, remote) if options.compare == "checksum" else {}
        plans = []
        for item, target in destinations:
            local_digest, remote_digest = digests.get(target, (None, None))
            action, reason = _plan.decide(item, remote.get(target), options.compare, options.force,
                                          local_digest, remote_digest)
            plans.append(_plan.plan_file(item, target, action, reason, options.chunk_size, connection_ceiling(options)))
        links = [(link, _plan.file_dest(tree, options.dest, dest_kind, link.rel)) for link in tree.links]
        return Planned(plans, dirs, links, remote, self.temps_found)

    def _read(self, tree: _plan.SourceTree) -> dict:
        """What dest is decides where files land, but waiting a round trip to learn it is not needed:
        the survey lists the directories for each answer (a tree lands in the same place for every
        answer that is allowed) and stats dest, its parent and the tree's root alongside."""
        options, engine = self.run.options, self.run.engine
        remote: dict[str, _plan.RemoteEntry | None] = {}
        listed = self._receiving_dirs(tree, None) | self._receiving_dirs(tree, "directory")
        directories = sorted(listed, key=lambda path: (path.count("/"), path))
        dest_key = options.dest.rstrip("/") or "/"
        stat_paths = [options.dest] + [path for path in {posixpath.dirname(dest_key), *directories[:1]}
                                       if path and path not in (dest_key, "/", ".")]
        expected = self._expected_entries(tree)
        # Read together, a group per job: a few round trips for all of them, not a few per directory.
        # The first group carries the stats. More than one group: the pool's sessions read them.
        if len(directories) > LISTING_GROUP:
            engine.use_pool(True)
        for start in range(0, max(len(directories), 1), LISTING_GROUP):
            group = tuple(directories[start:start + LISTING_GROUP])
            job = SurveyJob(stat=tuple(stat_paths) if start == 0 else (), paths=group,
                            expected={path: expected.get(path, 0) for path in group})
            engine.submit(job, lambda _job, result: self._record_survey(remote, result))
        engine.run()
        return remote

    def _receiving_dirs(self, tree: _plan.SourceTree, dest_kind: str | None) -> set[str]:
        """The remote directories that hold what the tree puts there, if dest is of that kind.
        The directory that receives a single file: its listing holds the target, a temp file left
        by an interrupted run (to resume) and stale temps of older versions."""
        dest = self.run.options.dest
        if tree.is_dir:
            return {remote_dir for remote_dir, _local in _plan.remote_dirs_to_create(tree, dest, None)}
        return {posixpath.dirname(_plan.file_dest(tree, dest, dest_kind, item.rel)) or "."
                for item in tree.files + tree.links}

    def _expected_entries(self, tree: _plan.SourceTree) -> dict[str, int]:
        """How many entries each remote directory should have, from the local tree: the survey
        asks for enough readdirs to read them in one round trip."""
        if not tree.is_dir:
            return {}
        counts: dict[str, int] = {}
        for item in tree.files + tree.links + tree.dirs:
            if item.rel:
                parent = posixpath.dirname(_plan.file_dest(tree, self.run.options.dest, None, item.rel))
                counts[parent] = counts.get(parent, 0) + 1
        return counts

    def _through_link(self, path: str, entry):
        """A symlink's entry, told what it leads to. The survey listed every directory it may write
        into, and opendir follows links: a link that listed leads to a directory, at no extra round trip.
        Only a link the survey did not list (dest, for a directory src without a trailing slash) or could
        not (then an error follows) costs a stat."""
        if entry is None or entry.kind != "link" or entry.leads_to is not None:
            return entry
        if isinstance(self.listings.get(path), dict):
            return _plan.leading_to(entry, "directory")
        target = self.run.call(Stat(path=path)).get("entry")
        return _plan.leading_to(entry, target.kind if target is not None else None)

    def _record_survey(self, remote: dict, result: dict) -> None:
        remote.update(result["entries"])
        self.listings.update(result["listing"])

    def _record_listing(self, remote: dict, directory: str, entries) -> None:
        # A directory's own entry comes from its parent's listing (the root's from lstat).
        for name, entry in (entries or {}).items():
            path = name if directory in ("", ".") else posixpath.join(directory, name)
            remote[path] = entry
            if _plan.is_temp_name(name):
                self.temps_found[path] = entry

    def _checksums_for_compare(self, destinations, remote) -> dict:
        """Digests of files whose size matches: only those can be identical."""
        candidates = [(item, target) for item, target in destinations
                      if (entry := remote.get(target)) is not None and entry.kind == "file" and entry.size == item.size]
        if not candidates:
            return {}
        algorithm = self.run.options.checksum_algorithm
        with ThreadPoolExecutor(max_workers=LOCAL_HASH_THREADS) as pool:
            local = pool.map(lambda pair: file_digest(pair[0].path, algorithm), candidates)
            remote_future = self.target.ask([{"path": target} for _item, target in candidates],
                                            {target: item.size for item, target in candidates})
            self.run.engine.run(idle=remote_future.done)
            local = list(local)
        answers = {answer["path"]: answer for answer in remote_future.result()}
        return {target: (digest, answers.get(target, {}).get("checksum"))
                for (_item, target), digest in zip(candidates, local)}
