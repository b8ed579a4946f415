# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One push, start to finish: survey the target, decide, send, verify, put in place.

This is the coordinator's logic. It turns the plan into jobs for the engine's workers and
reacts to their results: a big file becomes create -> ranges -> (verify) -> finalize; a small
file is one job; a verification mismatch sends the bad ranges again. Remote hashing goes
through a callback (the action runs the verify module on the target) in a background thread,
so files are verified while others are still travelling.
"""

from __future__ import annotations

import math
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from ansible_collections.multipush.sftp.plugins.module_utils._digest import digest_file, file_digest
from ansible_collections.multipush.sftp.plugins.plugin_utils import _plan
from ansible_collections.multipush.sftp.plugins.plugin_utils._engine import Engine, EngineError, connect_with_retries
from ansible_collections.multipush.sftp.plugins.plugin_utils._fast_crc import use_fastest_crc32
from ansible_collections.multipush.sftp.plugins.plugin_utils._progress import Progress, summary
from ansible_collections.multipush.sftp.plugins.plugin_utils._remote_hash import HasherUnavailable, HashingConnection
from ansible_collections.multipush.sftp.plugins.plugin_utils._session import open_connection
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import ConnectionSpec, SessionError
from ansible_collections.multipush.sftp.plugins.plugin_utils._target_digests import MODULE, SERVICE, SFTP, TargetDigests

MAX_RESENDS = 2
# Remote checks run once this much data awaits them (or when nothing is left to send): a run of
# the verify module costs seconds, hashing over the push's own connection a round trip or two.
VERIFY_BATCH_BYTES = 256 * 1024 * 1024
VERIFY_BATCH_BYTES_SSH = 32 * 1024 * 1024
# A leftover temp file is compared with the source in blocks of at least this size (bigger for
# files of more than this many blocks): every differing block is sent again, and nothing else.
RESUME_BLOCK = 1024 * 1024
RESUME_MAX_BLOCKS = 16384
# A temp file written to within this many seconds may belong to a push running right now.
ACTIVE_TEMP_SECONDS = 120
LOCAL_HASH_THREADS = 4
# Directories listed by one job (each holds a directory handle on the server while it is read).
LISTING_GROUP = 128


@dataclass
class PushOptions:
    src: str
    dest: str
    connections: int = 8
    chunk_size: object = "auto"
    max_concurrent_handshakes: int = 8
    exclude: list = field(default_factory=list)
    follow: bool = False
    compare: str = "size_mtime"
    force: bool = True
    verify: str = "checksum"
    checksum_algorithm: str = "crc32"
    whole_checksum: bool = False  # the standard digest of chunked files too (one more local pass)
    retries: int = 5
    retry_delay: float = 1.0
    request_size: int | None = None
    temp_max_age: int = 86400
    check_mode: bool = False
    # Hash on the target over a connection of the push's own (see _remote_hash); False: always the module.
    hash_over_ssh: bool = True
    python_interpreter: str | None = None


@dataclass
class _FileState:
    plan: _plan.FilePlan
    digests: dict = field(default_factory=dict)  # range index -> local digest
    whole_digest: str | None = None
    remaining: int = 0
    retries: int = 0
    resends: int = 0
    bytes_sent: int = 0
    started: float | None = None
    finished: float | None = None
    checksum: str | None = None
    status: str = "sent"
    finalized: bool = False
    verified: set = field(default_factory=set)  # ranges whose remote digest matched
    parts: dict = field(default_factory=dict)  # range index -> jobs still writing pieces of it (resume)
    whole_future: object = None  # local whole-file digest of a chunked file, hashed alongside

    @property
    def chunked(self) -> bool:
        return len(self.plan.ranges) > 1

    def note_times(self, result: dict) -> None:
        if "started" in result:
            self.started = min(self.started or result["started"], result["started"])
            self.finished = max(self.finished or result["finished"], result["finished"])


def resume_block(size: int) -> int:
    """The block in which a leftover temp of a `size`-byte file is compared with its source."""
    return max(RESUME_BLOCK, math.ceil(size / RESUME_MAX_BLOCKS / RESUME_BLOCK) * RESUME_BLOCK)


def block_runs(indexes: list, block: int, size: int) -> list[tuple[int, int]]:
    """Byte spans [start, end) of runs of consecutive block indexes (sorted), within size."""
    runs: list[list[int]] = []
    for index in indexes:
        start = index * block
        if runs and runs[-1][1] == start:
            runs[-1][1] = min(size, start + block)
        else:
            runs.append([start, min(size, start + block)])
    return [tuple(run) for run in runs]


class Push:
    """Runs one push. `remote_digests(requests, algorithm, whole=True)` hashes files on the target:
    requests are dicts {path, chunk_size}; it returns dicts {path, exists, size, checksum,
    chunk_checksums}; whole=False skips the whole-file digest."""

    def __init__(self, options: PushOptions, spec: ConnectionSpec,
                 remote_digests: Callable[..., list] | None, warn: Callable[[str], None],
                 progress: Progress | None = None):
        self.options = options
        self.progress = progress or Progress("push", 0, lambda text, verbosity: None)
        self.spec = spec
        self.remote_digests = remote_digests
        self.warn = warn
        self.engine: Engine | None = None
        self.files: dict[str, _FileState] = {}
        self.awaiting_verify: list[tuple] = []  # (state, range index, or None for a whole file)
        self.local_hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="multipush-hash")
        self.verify_future = None
        self.verify_batch: list[tuple] = []  # (state, range indexes or None) being checked now
        self.changed = False
        self.dirs_created = 0
        self.links_changed = 0
        self.temps_found: dict[str, _plan.RemoteEntry] = {}
        self.listings: dict[str, dict | None] = {}  # survey results until dest's kind says which count
        self.data_jobs = 0  # range and whole-file jobs queued or running
        self.temps_removed = 0
        self.phases: dict[str, float] = {}  # phase -> seconds, in the order they ran
        self.phase_mark = time.monotonic()
        self.resuming: list[tuple] = []  # leftover temps being compared: (states, blocks, local, remote)
        self.target = TargetDigests(options.checksum_algorithm, lambda: self.engine,
                                    HashingConnection(self._hashing_transport, options.python_interpreter),
                                    remote_digests, SERVICE if options.hash_over_ssh else MODULE, warn)
        self.hashing_handshake_retries = 0  # the pool's are in the engine's stats
        # Before the engine forks its workers, which hash what they send with it.
        self.crc32_library = use_fastest_crc32()

    # -- small helpers -------------------------------------------------------------------------

    def _call(self, job: dict):
        """Run one job and wait for it (used for the few sequential steps of the survey)."""
        box = {}
        self.engine.submit(job, lambda _job, result: box.update(result))
        self.engine.run()
        return box

    @property
    def algorithm(self) -> str | None:
        return self.options.checksum_algorithm if self.options.verify == "checksum" else None

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> dict:
        options = self.options
        started = time.monotonic()
        tree = _plan.scan_source(options.src, follow=options.follow, exclude=options.exclude)
        for message in tree.skipped:
            self.warn(message)
        workers = self._pool_size(tree)
        self.engine = Engine(self.spec, workers, options.max_concurrent_handshakes, options.retries,
                             options.retry_delay, options.request_size, on_progress=self.progress.add_bytes,
                             pool_on_demand=True)
        try:
            with self.engine:
                plans, dirs, links, remote = self._survey_and_plan(tree)
                if self.engine.first_ready is not None:
                    self.phases["connect"] = round(self.engine.first_ready - self.phase_mark, 3)
                    self.phase_mark = self.engine.first_ready
                self._phase("survey")
                self.engine.use_pool(not options.check_mode and any(plan.action == "send" for plan in plans))
                if not options.check_mode:
                    self._make_dirs(dirs, remote)
                    self._phase("directories")
                    try:
                        self._transfer(plans, links)
                    except EngineError as exc:
                        if not exc.keep_temps:
                            self._remove_temps()
                        self._settle_made_dirs(dirs)
                        raise
                    self._phase("transfer")
                    self._set_dir_meta(dirs, remote)
                    self._phase("directory_attributes")
                else:
                    self._preview(plans, dirs, links, remote)
        finally:
            self.target.close()
            self.local_hasher.shutdown(wait=True, cancel_futures=True)
        result = self._result(tree, time.monotonic() - started)
        if not options.check_mode:
            self.progress.finish(result)
        return result

    def _phase(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = round(now - self.phase_mark, 3)
        self.phase_mark = now

    def _ask_target(self, requests: list, sizes: dict, whole: bool = True):
        """Digests of files on the target (see _target_digests), as a future whose done() the
        engine's loop polls."""
        return self.target.ask(requests, sizes, whole)

    def _hashing_transport(self):
        """The connection for hashing: logged in like the pool's, under the same handshake
        throttle, retried like them, its retries counted with theirs. (In the verifier's thread.)"""
        try:
            return connect_with_retries(lambda: open_connection(self.spec, self.engine.handshakes),
                                        self.options.retries, self.options.retry_delay, self._hashing_handshake_retried)
        except SessionError as exc:
            raise HasherUnavailable(f"no connection for it: {exc}") from None

    def _hashing_handshake_retried(self, exc: SessionError) -> None:
        self.hashing_handshake_retries += 1

    def _remove_temps(self) -> None:
        """After a refusal (no space, permission, mismatch), leave no temp file behind.

        Runs on a fresh single connection: the failed pool may be in any state.
        """
        temps = [state.plan.temp for state in self.files.values()
                 if state.plan.action == "send" and not state.finalized]
        if not temps:
            return
        try:
            with Engine(self.spec, 1, 1, self.options.retries, self.options.retry_delay) as cleaner:
                for temp in temps:
                    cleaner.submit({"kind": "remove", "path": temp}, lambda job, result: None)
                cleaner.run()
        except EngineError as exc:
            self.warn(f"could not remove temporary files {temps[:5]} after the failure: {exc}")

    def _settle_made_dirs(self, dirs) -> None:
        """After a failure, give the directories this run created their final mode and mtime anyway:
        a re-run finds them existing and, as with every existing directory, leaves them alone. Best
        effort, once, on a fresh connection (a run killed outright leaves them owner-writable)."""
        items = [(path, local.mode, local.mtime) for path, local in reversed(dirs) if path in self.made_dirs]
        if not items:
            return
        try:
            with Engine(self.spec, 1, 1, 0, self.options.retry_delay) as settler:
                settler.submit({"kind": "setstats", "items": items}, lambda job, result: None)
                settler.run()
        except EngineError as exc:
            self.warn(f"could not set the mode and mtime of the {len(items)} directories this push created "
                      f"after the failure ({exc}); they stay owner-writable")

    def _pool_size(self, tree: _plan.SourceTree) -> int:
        work = len(tree.dirs) + len(tree.links)
        for item in tree.files:
            chunk = _plan.chunk_size_for(item.size, self.options.chunk_size, self.options.connections)
            work += max(1, math.ceil(item.size / chunk))
        return max(1, min(self.options.connections, work))

    # -- survey --------------------------------------------------------------------------------

    def _survey_and_plan(self, tree: _plan.SourceTree):
        options = self.options
        remote: dict[str, _plan.RemoteEntry | None] = {}
        # What dest is decides where files land, but waiting a round trip to learn it is not needed:
        # the survey lists the directories for each answer (a tree lands in the same place for every
        # answer that is allowed) and stats dest, its parent and the tree's root alongside.
        listed = self._receiving_dirs(tree, None) | self._receiving_dirs(tree, "directory")
        directories = sorted(listed, key=lambda path: (path.count("/"), path))
        dest_key = options.dest.rstrip("/") or "/"
        stat_paths = [options.dest] + [path for path in {posixpath.dirname(dest_key), *directories[:1]}
                                       if path and path not in (dest_key, "/", ".")]
        expected = self._expected_entries(tree)
        # Read together, a group per job: a few round trips for all of them, not a few per directory.
        # The first group carries the stats. More than one group: the pool's sessions read them.
        if len(directories) > LISTING_GROUP:
            self.engine.use_pool(True)
        for start in range(0, max(len(directories), 1), LISTING_GROUP):
            group = directories[start:start + LISTING_GROUP]
            self.engine.submit({"kind": "survey", "stat": stat_paths if start == 0 else [], "paths": group,
                                "expected": {path: expected.get(path, 0) for path in group}},
                               lambda job, result: self._record_survey(remote, job, result))
        self.engine.run()
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
            plans.append(_plan.plan_file(item, target, action, reason, options.chunk_size, options.connections))
        links = [(link, _plan.file_dest(tree, options.dest, dest_kind, link.rel)) for link in tree.links]
        return plans, dirs, links, remote

    def _receiving_dirs(self, tree: _plan.SourceTree, dest_kind: str | None) -> set[str]:
        """The remote directories that hold what the tree puts there, if dest is of that kind.
        The directory that receives a single file: its listing holds the target, a temp file left
        by an interrupted run (to resume) and stale temps of older versions."""
        if tree.is_dir:
            return {remote_dir for remote_dir, _local in _plan.remote_dirs_to_create(tree, self.options.dest, None)}
        return {posixpath.dirname(_plan.file_dest(tree, self.options.dest, dest_kind, item.rel)) or "."
                for item in tree.files + tree.links}

    def _expected_entries(self, tree: _plan.SourceTree) -> dict[str, int]:
        """How many entries each remote directory should have, from the local tree: the survey
        asks for enough readdirs to read them in one round trip."""
        if not tree.is_dir:
            return {}
        counts: dict[str, int] = {}
        for item in tree.files + tree.links + tree.dirs:
            if item.rel:
                parent = posixpath.dirname(_plan.file_dest(tree, self.options.dest, None, item.rel))
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
        target = self._call({"kind": "stat", "path": path}).get("entry")
        return _plan.leading_to(entry, target.kind if target is not None else None)

    def _record_survey(self, remote: dict, job: dict, result: dict) -> None:
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
        algorithm = self.options.checksum_algorithm
        with ThreadPoolExecutor(max_workers=LOCAL_HASH_THREADS) as pool:
            local = pool.map(lambda pair: file_digest(pair[0].path, algorithm), candidates)
            remote_future = self._ask_target([{"path": target} for _item, target in candidates],
                                             {target: item.size for item, target in candidates})
            self.engine.run(idle=remote_future.done)
            local = list(local)
        answers = {answer["path"]: answer for answer in remote_future.result()}
        return {target: (digest, answers.get(target, {}).get("checksum"))
                for (_item, target), digest in zip(candidates, local)}

    # -- check mode ----------------------------------------------------------------------------

    def _preview(self, plans, dirs, links, remote) -> None:
        for file_plan in plans:
            state = _FileState(plan=file_plan, status="would_send" if file_plan.action == "send" else "skipped")
            self.files[file_plan.dest] = state
            self.changed |= file_plan.action == "send"
        missing_dirs = [path for path, _local in dirs if remote.get(path) is None]
        self.dirs_created = len(missing_dirs)
        self.changed |= bool(missing_dirs)
        link_results = []
        for link, target in links:
            entry = remote.get(target)
            if entry is None:
                status = "would_create"
            elif entry.kind != "link":
                status = "would_change"
            else:
                current = self._call({"kind": "readlink", "path": target}).get("target")
                status = "unchanged" if current == link.target else "would_change"
            link_results.append({"dest": target, "target": link.target, "status": status})
            self.links_changed += int(status != "unchanged")
        self.link_results = tuple(link_results)
        self.changed |= bool(self.links_changed)

    # -- directories ---------------------------------------------------------------------------

    # The directories this run created (tree directories: their source's; parents above dest): the only
    # ones whose mode, mtime, owner and group it sets. Any that existed before keep theirs, dest included,
    # as with ansible.builtin.copy: a push into /tmp must never make /tmp 0755.
    made_dirs: tuple = ()
    made_parents: tuple = ()

    def _make_dirs(self, dirs, remote) -> None:
        self.made_dirs, self.made_parents = set(), []
        self._create_dirs(dirs, remote)
        self._own_made_dirs(dirs)

    def _own_made_dirs(self, dirs) -> None:
        """Owner and group of the directories just created, at once: a push interrupted before the end
        (where _set_dir_meta sets their modes and mtimes) must not leave them to the SSH user, since a
        re-run takes them for existing directories and leaves them alone. One round trip, only with
        owner or group."""
        if self.spec.owner is None and self.spec.group is None:
            return
        items = [(path, 0o755, None) for path in self.made_parents]
        items += [(path, local.mode | 0o700, None) for path, local in dirs if path in self.made_dirs]
        if items:
            self.engine.submit({"kind": "setstats", "items": items}, lambda job, result: None)
            self.engine.run()

    def _create_dirs(self, dirs, remote) -> None:
        if not dirs and not self.options.dest.endswith("/"):
            parent = posixpath.dirname(self.options.dest.rstrip("/"))
            self._make_parents(parent, remote)
            return
        if not dirs:
            self._make_parents(self.options.dest.rstrip("/"), remote)
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
        missing = [(path, local.mode | 0o700) for depth in sorted(by_depth) for path, local in by_depth[depth]]
        if missing:
            self.engine.submit({"kind": "mkdirs", "dirs": missing}, self._dirs_made)
            self.engine.run()

    def _dirs_made(self, job, result) -> None:
        created = sum(result["created"])
        # False: it appeared since the survey (another push made it): not ours to set
        self.made_dirs.update(path for (path, _mode), made in zip(job["dirs"], result["created"]) if made)
        self.dirs_created += created
        self.changed |= bool(created)

    def _make_parents(self, path: str, remote) -> None:
        """mkdir -p for the directories above dest, created only where missing."""
        if not path or path == "/":
            return
        # The survey stat'ed dest and its parent already; deeper parents are asked for here.
        entry = remote[path] if path in remote else self._call({"kind": "lstat", "path": path})["entry"]
        if entry is not None:
            if entry.kind not in ("directory", "link"):  # a link to a directory is a fine parent
                raise EngineError(f"{path!r} on the target is a {entry.kind}, not a directory; choose another dest")
            return
        self._make_parents(posixpath.dirname(path), remote)
        if self._call({"kind": "mkdir", "path": path, "mode": 0o755}).get("created"):
            self.made_parents.append(path)
            self.dirs_created += 1
            self.changed = True

    def _set_dir_meta(self, dirs, remote) -> None:
        """Mode and mtime of the directories this run created, deepest first and last of all: writing
        inside a directory changes its mtime. One pipelined job: a round trip for all of them. Owner and
        group (when given) ride on the same requests (_become._SFTPClient; the parents it created got
        theirs in _own_made_dirs). Directories that existed before are never touched: a re-run with
        nothing to send changes nothing."""
        items = [(path, local.mode, local.mtime) for path, local in reversed(dirs) if path in self.made_dirs]
        if items:
            self.engine.submit({"kind": "setstats", "items": items}, lambda job, result: None)
            self.engine.run()

    # -- files ---------------------------------------------------------------------------------

    def _transfer(self, plans, links) -> None:
        sending = [file_plan for file_plan in plans if file_plan.action == "send"]
        self.progress.start(sum(file_plan.local.size for file_plan in sending), len(sending))
        if sending and self.options.verify == "checksum" and self.target.way == MODULE:
            # An empty first call opens Ansible's connection to the target while the first files
            # are still travelling, so the first real verification does not pay for it.
            self.verify_batch = []
            self.verify_future = self._ask_target([], {})
        elif self.options.verify == "checksum" and any(
                file_plan.local.size > _plan.SMALL_FILE_LIMIT for file_plan in sending):
            # Files that are not read back in their batch are hashed on the target: its connection
            # logs in and starts the service while the first bytes travel (and a target that cannot
            # run it is found out before the first check).
            self.target.warm()
        resumable = []
        small = []
        creating = []  # (state, exclusive)
        for file_plan in plans:
            state = _FileState(plan=file_plan)
            self.files[file_plan.dest] = state
            if file_plan.action != "send":
                state.status = "skipped"
                continue
            self.changed = True
            leftover = self.temps_found.get(file_plan.temp)
            if len(file_plan.ranges) <= 1 and file_plan.local.size <= _plan.SMALL_FILE_LIMIT:
                small.append(state)
            elif len(file_plan.ranges) <= 1:
                self._submit_whole(state)
            elif leftover is not None and leftover.kind == "file" and leftover.size == file_plan.local.size:
                resumable.append(state)
            else:
                # Exclusive unless a leftover of the wrong size is to be replaced: a temp that
                # appears between survey and now belongs to a concurrent push of the same source.
                creating.append((state, leftover is None))
        batches = [[small[index] for index in batch]
                   for batch in _plan.small_file_batches([state.plan.local.size for state in small], self.engine.size)]
        if creating:
            self.engine.submit({"kind": "create", "files": [
                {"temp": state.plan.temp, "size": state.plan.local.size, "exclusive": exclusive}
                for state, exclusive in creating]},
                lambda job, result: self._created([state for state, _exclusive in creating], batches))
        else:
            self._created([], batches)
        for link, target in links:
            self.engine.submit({"kind": "symlink", "path": target, "target": link.target,
                                "temp": _plan.link_temp_path(target)}, self._link_done)
        self._remove_stale_temps(plans, links)
        if resumable:
            # Workers are already busy with everything else while the leftovers are compared.
            self._resume(resumable)
        self.engine.run(idle=self._transfer_idle)

    def _created(self, states: list, batches: list) -> None:
        """The chunked files' temps exist (or there are none): their ranges, the longest jobs, are queued
        ahead of the small files' batches, which then fill the connections that finish early instead of
        holding up the last ranges."""
        for state in states:
            self._submit_ranges(state, range(len(state.plan.ranges)))
        for batch in batches:
            self._submit_batch(batch)

    def _transfer_idle(self) -> bool:
        self.progress.tick()
        resumed = self._resume_idle()
        return self._verification_idle() and resumed

    def _remove_stale_temps(self, plans, links) -> None:
        """Temps of older source versions, and any temp older than temp_max_age.

        A temp of another version written to within the last minutes may belong to a push
        that is running right now, so only quiet ones are removed.
        """
        in_use = {file_plan.temp for file_plan in plans} | {_plan.link_temp_path(target) for _link, target in links}
        our_files = {file_plan.dest for file_plan in plans}
        now = time.time()
        for path, entry in self.temps_found.items():
            if path in in_use:
                continue
            age = now - entry.mtime
            if age > self.options.temp_max_age or (_plan.temp_owner(path) in our_files and age > ACTIVE_TEMP_SECONDS):
                self.engine.submit({"kind": "remove", "path": path}, self._temp_removed)

    def _temp_removed(self, job, result) -> None:
        self.temps_removed += 1
        self.changed = True

    def _resume(self, states: list) -> None:
        """Compare leftover temp files block by block with the source, on the target and here at
        once; the transfer's loop takes the answers (_resume_idle) while the other files travel."""
        algorithm = self.options.checksum_algorithm
        whole = self.options.verify == "checksum" and self.options.whole_checksum
        blocks = [resume_block(state.plan.local.size) for state in states]
        local = self.local_hasher.submit(
            lambda: [digest_file(state.plan.local.path, algorithm, block, whole=whole)
                     for state, block in zip(states, blocks)])
        requests = [{"path": state.plan.temp, "chunk_size": block} for state, block in zip(states, blocks)]
        remote = self._ask_target(requests, {state.plan.temp: state.plan.local.size for state in states}, whole=False)
        self.resuming.append((states, blocks, local, remote))

    def _resume_idle(self) -> bool:
        """Engine idle hook: send what differs in the leftovers compared so far. True when none is left."""
        waiting = []
        for states, blocks, local, remote in self.resuming:
            if not (local.done() and remote.done()):
                waiting.append((states, blocks, local, remote))
                continue
            try:
                answers = {answer["path"]: answer for answer in remote.result()}
            except EngineError as exc:
                self.warn(f"cannot compare leftover temp files on the target, sending them again whole: {exc}")
                answers = {}
            for state, block, (local_whole, local_blocks) in zip(states, blocks, local.result()):
                remote_blocks = answers.get(state.plan.temp, {}).get("chunk_checksums") or []
                differing = [index for index, digest in enumerate(local_blocks)
                             if index >= len(remote_blocks) or remote_blocks[index] != digest]
                self._send_differing_blocks(state, block, differing, local_whole)
        self.resuming = waiting
        return not waiting

    def _send_differing_blocks(self, state: _FileState, block: int, differing: list, local_whole) -> None:
        """A leftover temp compared: each range's differing blocks travel (one job per run of them),
        ranges with none are verified already (compared by digest with the target's copy)."""
        checking = self.options.verify == "checksum"
        size = state.plan.local.size
        runs = block_runs(differing, block, size)
        pieces = {}
        for index, (offset, length) in enumerate(state.plan.ranges):
            inside = [(max(start, offset), min(end, offset + length)) for start, end in runs
                      if start < offset + length and end > offset]
            if inside:
                pieces[index] = inside
            else:
                state.verified.add(index)
        state.status = "resumed"
        self.progress.grow(-(size - sum(end - start for start, end in runs)))
        if checking and self.options.whole_checksum:
            state.whole_future = self.local_hasher.submit(lambda value=local_whole: value)
        if pieces:
            self._submit_pieces(state, pieces)
        elif checking:
            self._check_source(state)
            self._finalize(state, expect_size=None)
        else:
            self._written(state)

    def _submit_pieces(self, state: _FileState, pieces: dict) -> None:
        """Pieces of ranges (index -> [(start, end)]): the first piece of a range also hashes the rest
        of that range from the local file, so the range's digest is checked on the target as usual."""
        file_plan = state.plan
        for index, spans in pieces.items():
            offset, length = file_plan.ranges[index]
            state.parts[index] = len(spans)
            state.remaining += len(spans)
            self.data_jobs += len(spans)
            for number, (start, end) in enumerate(spans):
                job = {"kind": "range", "local": file_plan.local.path, "temp": file_plan.temp,
                       "dest": file_plan.dest, "start": start, "end": end, "index": index,
                       "size": file_plan.local.size, "algorithm": self.algorithm if number == 0 else None,
                       "part": number > 0}
                if number == 0 and self.algorithm:
                    job.update(hash_from=offset, hash_to=offset + length)
                self.engine.submit(job, lambda job, result, state=state: self._range_done(state, job, result))

    # Per symlink of the tree: {dest, target, status}; status created, changed or unchanged (in check mode
    # would_create, would_change or unchanged). The result's `links`.
    link_results: tuple = ()

    def _link_done(self, job, result) -> None:
        status = ("created" if result.get("created") else "changed") if result["changed"] else "unchanged"
        self.link_results = (*self.link_results, {"dest": job["path"], "target": job["target"], "status": status})
        if result["changed"]:
            self.links_changed += 1
            self.changed = True

    def _submit_whole(self, state: _FileState) -> None:
        file_plan = state.plan
        local = file_plan.local
        state.remaining = 1
        self.data_jobs += 1
        self.engine.submit({
            "kind": "whole", "local": local.path, "temp": file_plan.temp, "dest": file_plan.dest,
            "size": local.size, "mode": local.mode, "mtime": local.mtime, "algorithm": self.algorithm,
            # Without remote hashing nothing needs to happen between writing and renaming, so the
            # worker puts the file in place itself (after checking the source did not change).
            "rename": self.options.verify != "checksum",
        }, lambda job, result, state=state: self._whole_done(state, job, result))

    def _whole_done(self, state: _FileState, job, result) -> None:
        self.data_jobs -= 1
        self._whole_file_written(state, job, result, result["bytes_sent"], result["digest"])

    def _whole_file_written(self, state: _FileState, job, result, bytes_sent: int, digest: str | None) -> None:
        """A file sent whole (alone or in a batch) is in its temp file; in place already when the
        job renamed it."""
        state.remaining -= 1
        state.retries += job["attempt"]
        state.bytes_sent += bytes_sent
        state.whole_digest = digest
        state.note_times(result)
        if result.get("in_place") and job.get("read_back"):
            state.checksum = digest  # the digest of what the target returned
        if job["rename"] or result.get("in_place"):
            state.finalized = True
            self._file_complete(state)
        else:
            self._written(state)

    def _submit_batch(self, states: list) -> None:
        for state in states:
            state.remaining = 1
        self.data_jobs += 1
        self.engine.submit({
            "kind": "batch", "algorithm": self.algorithm, "rename": self.options.verify != "checksum",
            # checked by reading each file back in the pipeline that wrote it: no hashing service,
            # no check job queued behind the ranges of big files, no separate finalize
            "read_back": self.options.verify == "checksum",
            "files": [{"local": state.plan.local.path, "temp": state.plan.temp, "dest": state.plan.dest,
                       "size": state.plan.local.size, "mode": state.plan.local.mode,
                       "mtime": state.plan.local.mtime} for state in states],
        }, lambda job, result, states=states: self._batch_done(states, job, result))

    def _batch_done(self, states: list, job, result) -> None:
        self.data_jobs -= 1
        # A batch cut off by a lost connection went out in file order: its bytes belong to the first files.
        earlier = result["sent_earlier"]
        for state, digest in zip(states, result["digests"]):
            size = state.plan.local.size
            resent = min(earlier, size)
            earlier -= resent
            self._whole_file_written(state, job, result, size + resent, digest)
        if earlier:  # cut more than once: the rest goes to the last file, so the total stays true
            states[-1].bytes_sent += earlier

    def _submit_ranges(self, state: _FileState, indexes) -> None:
        file_plan = state.plan
        state.remaining += len(indexes)
        self.data_jobs += len(indexes)
        if self.options.verify == "checksum" and self.options.whole_checksum and state.whole_future is None:
            # The standard digest of the whole file, for the result, read alongside the transfer;
            # verification itself compares the ranges.
            state.whole_future = self.local_hasher.submit(file_digest, file_plan.local.path, self.algorithm)
        for index in indexes:
            start, length = file_plan.ranges[index]
            state.parts.pop(index, None)
            self.engine.submit({
                "kind": "range", "local": file_plan.local.path, "temp": file_plan.temp, "dest": file_plan.dest,
                "start": start, "end": start + length, "index": index, "algorithm": self.algorithm,
                "size": file_plan.local.size,
            }, lambda job, result, state=state: self._range_done(state, job, result))

    def _range_done(self, state: _FileState, job, result) -> None:
        index = job["index"]
        state.retries += job["attempt"]
        state.bytes_sent += result["bytes_sent"]
        if not job.get("part"):  # a range's later pieces carry no digest of it
            state.digests[index] = result["digest"]
        state.note_times(result)
        state.remaining -= 1
        self.data_jobs -= 1
        if index in state.parts:
            state.parts[index] -= 1
            if state.parts[index]:
                return
            del state.parts[index]
        if self.options.verify == "checksum":
            # Checked on the target as soon as it is there, while later ranges still travel.
            self.awaiting_verify.append((state, job["index"]))
        elif state.remaining == 0:
            self._written(state)

    @staticmethod
    def _check_source(state: _FileState) -> None:
        local = state.plan.local
        problem = _plan.source_changed(local.path, local.size, local.mtime)
        if problem:
            raise EngineError(problem)

    def _written(self, state: _FileState) -> None:
        """All bytes of a file are acknowledged in its temp file (ranges not checked one by one)."""
        local = state.plan.local
        if state.chunked:  # a whole file was checked by its worker right after writing
            self._check_source(state)
        if self.options.verify == "checksum":
            self.awaiting_verify.append((state, None))
        else:
            self._finalize(state, expect_size=local.size if self.options.verify == "size" else None)

    def _finalize(self, state: _FileState, expect_size: int | None) -> None:
        self._finalize_many([(state, expect_size)])

    def _finalize_many(self, items: list) -> None:
        """(state, expected size or None) pairs: put in place in batches, every connection a share."""
        for group in _plan.small_file_batches([0] * len(items), self.engine.size):
            chosen = [items[index] for index in group]
            self.engine.submit({"kind": "finalize", "files": [
                {"temp": state.plan.temp, "dest": state.plan.dest, "mode": state.plan.local.mode,
                 "mtime": state.plan.local.mtime, "expect_size": None if not state.chunked else expect_size}
                for state, expect_size in chosen]},
                lambda job, result, states=[state for state, _size in chosen]: self._finalized_many(states, job))

    def _finalized_many(self, states: list, job) -> None:
        for state in states:
            self._finalized(state, job)

    def _finalized(self, state: _FileState, job) -> None:
        state.retries += job["attempt"]
        state.finished = time.time()
        state.finalized = True
        self._file_complete(state)

    def _file_complete(self, state: _FileState) -> None:
        elapsed = (state.finished - state.started) if state.started and state.finished else 0.0
        self.progress.file_done(state.plan.dest, state.plan.local.size, elapsed, state.status)

    # -- verification --------------------------------------------------------------------------

    def _verification_idle(self) -> bool:
        """Engine idle hook: start/collect remote hashing batches. True when nothing is left."""
        if self.verify_future is not None:
            if not self.verify_future.done():
                return False
            answers = self.verify_future.result()  # re-raises a failed module run
            batch, self.verify_future = self.verify_batch, None
            self._judge(batch, answers)
        if self.awaiting_verify and self._verification_due():
            self.verify_batch, self.awaiting_verify = self._group(self.awaiting_verify), []
            requests = []
            for state, indexes in self.verify_batch:
                if indexes is None:
                    requests.append({"path": state.plan.temp})
                else:
                    requests.append({"path": state.plan.temp, "chunk_size": state.plan.chunk_size,
                                     "chunk_indexes": indexes, "get_checksum": False})
            self.verify_future = self._ask_target(
                requests, {state.plan.temp: state.plan.local.size for state, _indexes in self.verify_batch})
            return False
        return True

    def _verification_due(self) -> bool:
        """Batch the checks: each call costs a Python start-up on the target (and, through the
        module, much more on the controller), which competes with the transfer for CPU. Check once
        enough has piled up, and at once when nothing is left to send."""
        if self.data_jobs == 0:
            return True
        if self.target.way == SFTP:  # read back by the pool: no start-up cost per check to spread
            return True
        threshold = VERIFY_BATCH_BYTES_SSH if self.target.way == SERVICE else VERIFY_BATCH_BYTES
        pending = 0
        for state, index in self.awaiting_verify:
            pending += state.plan.ranges[index][1] if index is not None else state.plan.local.size
            if pending >= threshold:
                return True
        return False

    @staticmethod
    def _group(items: list) -> list:
        """(state, range index or None for the whole file) items -> one request per file."""
        grouped: dict[int, tuple] = {}
        for state, index in items:
            _state, indexes = grouped.setdefault(id(state), (state, [] if index is not None else None))
            if index is not None and indexes is not None:
                indexes.append(index)
        return [(state, sorted(indexes) if indexes is not None else None) for state, indexes in grouped.values()]

    def _judge(self, batch: list, answers: list[dict]) -> None:
        by_path = {answer["path"]: answer for answer in answers}
        ready = []
        for state, indexes in batch:
            answer = by_path.get(state.plan.temp, {})
            local = state.plan.local
            if not answer.get("exists") or answer.get("size") != local.size:
                bad = indexes if indexes is not None else [0]
            elif indexes is not None:
                remote_chunks = answer.get("chunk_checksums") or []
                bad = [index for index in indexes
                       if index >= len(remote_chunks) or remote_chunks[index] != state.digests.get(index)]
                state.verified.update(index for index in indexes if index not in bad)
            else:
                bad = [] if answer.get("checksum") == state.whole_digest else [0]
                if not bad:
                    state.checksum = answer.get("checksum")
            if bad:
                self._resend(state, bad)
            elif indexes is None or len(state.verified) == len(state.plan.ranges):
                if indexes is not None:
                    self._check_source(state)
                ready.append((state, None))
        if ready:
            self._finalize_many(ready)

    def _resend(self, state: _FileState, bad: list) -> None:
        local = state.plan.local
        if state.resends >= MAX_RESENDS:
            raise EngineError(
                f"{state.plan.dest!r}: the copy on the target still differs from {local.path!r} after "
                f"{MAX_RESENDS} re-sends (ranges {bad}); nothing was put in place. Check the target's disk "
                "and memory, or whether something else writes to that directory")
        state.resends += 1
        state.status = "resent"
        if state.chunked:
            self.progress.grow(sum(state.plan.ranges[index][1] for index in bad))
            self._submit_ranges(state, bad)
        else:
            self.progress.grow(local.size)
            self._submit_whole(state)

    # -- result --------------------------------------------------------------------------------

    def _result(self, tree: _plan.SourceTree, seconds: float) -> dict:
        files = []
        for state in self.files.values():
            if state.checksum is None and state.whole_future is not None and state.finalized:
                # Every range matched on the target, so the file there has the source's digest.
                state.checksum = state.whole_future.result()
            local = state.plan.local
            elapsed = (state.finished - state.started) if state.started and state.finished else 0.0
            files.append({
                "src": local.path, "dest": state.plan.dest, "size": local.size, "status": state.status,
                "reason": state.plan.reason, "bytes_sent": state.bytes_sent, "seconds": round(elapsed, 3),
                "retries": state.retries, "checksum": state.checksum, "ranges": len(state.plan.ranges),
                "chunk_size": state.plan.chunk_size,
            })
        sent = [f for f in files if f["status"] in ("sent", "resent", "resumed")]
        stats = dict(self.engine.stats) if self.engine else {}
        stats["handshake_retries"] = stats.get("handshake_retries", 0) + self.hashing_handshake_retries
        if stats.get("handshake_retries") and stats.get("connections_opened", 0) < self.engine.size:
            self.warn(f"only {stats['connections_opened']} of {self.engine.size} connections could be opened; sshd "
                      f"dropped {stats['handshake_retries']} handshakes (MaxStartups?): lower "
                      "max_concurrent_handshakes or raise MaxStartups with the multipush.sftp.sshd_tuning role")
        bytes_sent = sum(f["bytes_sent"] for f in files)
        result = {
            "changed": self.changed,
            "dest": self._absolute_dest(),
            "files": files,
            "links": sorted(self.link_results, key=lambda link: link["dest"]),
            "files_sent": len(sent),
            "files_skipped": sum(1 for f in files if f["status"] == "skipped"),
            "files_total": len(files),
            "dirs_created": self.dirs_created,
            "temps_removed": self.temps_removed,
            "links_changed": self.links_changed,
            "bytes_sent": bytes_sent,
            "seconds": round(seconds, 3),
            "throughput_mb_s": round(bytes_sent / seconds / 1e6, 2) if seconds > 0 else 0.0,
            "connections": stats.get("connections_opened", 0),
            "handshake_retries": stats.get("handshake_retries", 0),
            "retries": sum(f["retries"] for f in files) + stats.get("handshake_retries", 0),
            "write_size": stats.get("write_size"),
            "cipher": stats.get("cipher"),
            "crc32_library": self.crc32_library,
            "phases": self.phases,
            "remote_hashing": self.target.report(),
        }
        result["summary"] = summary(result, self.options.check_mode)
        return result

    def _absolute_dest(self) -> str:
        """dest as an absolute path on the target. A relative dest is relative to the login directory of
        the SSH user (as with scp and sftp): asked of the server (realpath of '.') on a connection of its
        own, since the pool is closed by now; one login, only for a relative dest."""
        dest = self.options.dest
        if dest.startswith("/"):
            return dest
        answer = {}
        try:
            with Engine(self.spec, 1, 1, self.options.retries, self.options.retry_delay) as engine:
                engine.submit({"kind": "realpath", "path": "."}, lambda job, result: answer.update(result))
                engine.run()
        except EngineError as exc:
            self.warn(f"could not ask the target where the relative dest {dest!r} is: {exc}")
            return dest
        absolute = posixpath.normpath(posixpath.join(answer.get("path") or ".", dest))
        return absolute + "/" if dest.endswith("/") and absolute != "/" else absolute
