# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Sending: the write jobs of a push, queued in the order that keeps every connection busy, and
what their results mean for each file.

A big file becomes one temp created at full size (one job for all of them) and its ranges, queued
ahead of everything else; small files travel several to a job, with verify: checksum read back in
the same pipeline when they are at most _verifier.READ_BACK_LIMIT, hashed on the target otherwise;
links are made under a temp name and renamed over. A range or file the verifier finds wrong is
sent again from here (at most MAX_RESENDS times).
"""

from __future__ import annotations

import time
from concurrent.futures import Executor
from typing import Callable

from ansible_collections.multipush.sftp.plugins.plugin_utils._fast_crc import file_digest
from ansible_collections.multipush.sftp.plugins.plugin_utils import _plan
from ansible_collections.multipush.sftp.plugins.plugin_utils._engine import EngineError
from ansible_collections.multipush.sftp.plugins.plugin_utils._jobs import (
    CreateTemps, Remove, Symlink, WriteBatch, WriteRange, WriteWhole,
)
from ansible_collections.multipush.sftp.plugins.plugin_utils._placing import Placer
from ansible_collections.multipush.sftp.plugins.plugin_utils._push_state import FileState, PushRun
from ansible_collections.multipush.sftp.plugins.plugin_utils._verifier import READ_BACK_LIMIT

MAX_RESENDS = 2
# A temp file written to within this many seconds may belong to a push running right now.
ACTIVE_TEMP_SECONDS = 120


class Sender:
    """await_check(state, index): hand a written range to the verifier (verify: checksum)."""

    def __init__(self, run: PushRun, local_hasher: Executor, placer: Placer,
                 await_check: Callable[[FileState, int | None], None]):
        self.run = run
        self.local_hasher = local_hasher
        self.placer = placer
        self.await_check = await_check
        self.data_jobs = 0  # range and whole-file jobs queued or running
        self.mtime_warned = False

    # -- queueing ------------------------------------------------------------------------------

    def send(self, plans: list, links: list, temps_found: dict, fed: frozenset = frozenset()) -> list[FileState]:
        """Queue everything to send; returns the files whose leftover temp is to be compared first
        (the resume's), which are queued by the caller once compared: with them the temps a peer
        wrote (`fed`, fan-out), whatever their size."""
        resumable, small, creating = [], [], []  # creating: (state, exclusive)
        for file_plan in plans:
            state = FileState(plan=file_plan)
            self.run.files[file_plan.dest] = state
            if file_plan.action != "send":
                state.status = "skipped"
                continue
            self.run.changed = True
            leftover = temps_found.get(file_plan.temp)
            if file_plan.temp in fed:
                resumable.append(state)
            elif len(file_plan.ranges) <= 1 and file_plan.local.size <= _plan.SMALL_FILE_LIMIT:
                small.append(state)
            elif len(file_plan.ranges) <= 1:
                self.submit_whole(state)
            elif leftover is not None and leftover.kind == "file" and leftover.size == file_plan.local.size:
                resumable.append(state)
            else:
                # Exclusive unless a leftover of the wrong size is to be replaced: a temp that
                # appears between survey and now belongs to a concurrent push of the same source.
                creating.append((state, leftover is None))
        engine = self.run.engine
        batches = self._small_batches(small)
        if creating:
            job = CreateTemps(files=tuple({"temp": state.plan.temp, "size": state.plan.local.size,
                                           "exclusive": exclusive} for state, exclusive in creating))
            engine.submit(job, lambda _job, _result: self._created([state for state, _exclusive in creating], batches))
        else:
            self._created([], batches)
        for link, target in links:
            engine.submit(Symlink(path=target, target=link.target, temp=_plan.link_temp_path(target)), self._link_done)
        self._remove_stale_temps(plans, links, temps_found)
        return resumable

    def _small_batches(self, small: list) -> list:
        """Small files grouped for WriteBatch jobs; with verify: checksum, those read back in their
        batch apart from those the target hashes."""
        groups = [small]
        if self.run.options.verify == "checksum":
            groups = [[state for state in small if state.plan.local.size <= READ_BACK_LIMIT],
                      [state for state in small if state.plan.local.size > READ_BACK_LIMIT]]
        return [[group[index] for index in batch] for group in groups
                for batch in _plan.small_file_batches([state.plan.local.size for state in group], self.run.engine.size)]

    def _created(self, states: list, batches: list) -> None:
        """The chunked files' temps exist (or there are none): their ranges, the longest jobs, are queued
        ahead of the small files' batches, which then fill the connections that finish early instead of
        holding up the last ranges."""
        for state in states:
            self.submit_ranges(state, range(len(state.plan.ranges)))
        for batch in batches:
            self._submit_batch(batch)

    def submit_whole(self, state: FileState) -> None:
        file_plan = state.plan
        local = file_plan.local
        state.remaining = 1
        self.data_jobs += 1
        job = WriteWhole(local=local.path, temp=file_plan.temp, dest=file_plan.dest, size=local.size, mode=local.mode,
                         mtime=local.mtime, algorithm=self.run.algorithm,
                         # Without remote hashing nothing needs to happen between writing and renaming, so
                         # the worker puts the file in place itself (after checking the source did not change).
                         rename=self.run.options.verify != "checksum")
        self.run.engine.submit(job, lambda job, result, state=state: self._whole_done(state, job, result))

    def _submit_batch(self, states: list) -> None:
        for state in states:
            state.remaining = 1
        self.data_jobs += 1
        verify = self.run.options.verify
        job = WriteBatch(
            algorithm=self.run.algorithm, rename=verify != "checksum",
            # checked by reading each file back in the pipeline that wrote it: no hashing service,
            # no check job queued behind the ranges of big files, no separate finalize
            read_back=verify == "checksum" and all(state.plan.local.size <= READ_BACK_LIMIT for state in states),
            files=tuple({"local": state.plan.local.path, "temp": state.plan.temp, "dest": state.plan.dest,
                         "size": state.plan.local.size, "mode": state.plan.local.mode,
                         "mtime": state.plan.local.mtime} for state in states))
        self.run.engine.submit(job, lambda job, result, states=states: self._batch_done(states, job, result))

    def submit_ranges(self, state: FileState, indexes) -> None:
        file_plan = state.plan
        options = self.run.options
        if options.verify == "checksum" and options.whole_checksum and state.whole_future is None:
            # The standard digest of the whole file, for the result, read alongside the transfer;
            # verification itself compares the ranges.
            state.whole_future = self.local_hasher.submit(file_digest, file_plan.local.path, self.run.algorithm)
        jobs = []
        for index in indexes:
            start, length = file_plan.ranges[index]
            state.parts.pop(index, None)
            jobs.append(WriteRange(local=file_plan.local.path, temp=file_plan.temp, dest=file_plan.dest, start=start,
                                   end=start + length, index=index, algorithm=self.run.algorithm,
                                   size=file_plan.local.size))
        self.queue_ranges(state, jobs)

    def queue_ranges(self, state: FileState, jobs: list[WriteRange]) -> None:
        """Range jobs of one file (whole ranges, or pieces of them when resumed)."""
        state.remaining += len(jobs)
        self.data_jobs += len(jobs)
        for job in jobs:
            self.run.engine.submit(job, lambda job, result, state=state: self._range_done(state, job, result))

    def resend(self, state: FileState, bad: list) -> None:
        """The target's copy of these ranges (or of the whole file, [0]) differs: send them again."""
        local = state.plan.local
        if state.resends >= MAX_RESENDS:
            raise EngineError(
                f"{state.plan.dest!r}: the copy on the target still differs from {local.path!r} after "
                f"{MAX_RESENDS} re-sends (ranges {bad}); nothing was put in place. Check the target's disk "
                "and memory, or whether something else writes to that directory")
        state.resends += 1
        state.status = "resent"
        if state.chunked:
            self.run.progress.grow(sum(state.plan.ranges[index][1] for index in bad))
            self.submit_ranges(state, bad)
        else:
            self.run.progress.grow(local.size)
            self.submit_whole(state)

    # -- results -------------------------------------------------------------------------------

    def _whole_done(self, state: FileState, job: WriteWhole, result: dict) -> None:
        self.data_jobs -= 1
        self._check_mtime_kept(result)
        self._whole_file_written(state, job, result, result["bytes_sent"], result["digest"])

    def _batch_done(self, states: list, job: WriteBatch, result: dict) -> None:
        self.data_jobs -= 1
        self._check_mtime_kept(result)
        # A batch cut off by a lost connection went out in file order: its bytes belong to the first files.
        earlier = result["sent_earlier"]
        for state, digest in zip(states, result["digests"]):
            size = state.plan.local.size
            resent = min(earlier, size)
            earlier -= resent
            self._whole_file_written(state, job, result, size + resent, digest)
        if earlier:  # cut more than once: the rest goes to the last file, so the total stays true
            states[-1].bytes_sent += earlier

    def _check_mtime_kept(self, result: dict) -> None:
        """Once per push: a target that does not keep the mtimes set makes every later run send every
        file again (unchanged files are told by size and mtime), which the user should hear of."""
        lost = result.get("mtime_not_kept")
        if lost is None or self.mtime_warned:
            return
        self.mtime_warned = True
        dest, wanted, reported = lost
        self.run.warn(f"the target did not keep the modification time set on {dest!r} (set {wanted}, it reports "
                      f"{reported}; its SFTP server ignores or rounds setstat): later runs cannot tell unchanged "
                      "files by size and mtime and will send them again; push with `compare: checksum` to skip "
                      "unchanged files by their content")

    def _whole_file_written(self, state: FileState, job, result: dict, bytes_sent: int, digest: str | None) -> None:
        """A file sent whole (alone or in a batch) is in its temp file; in place already when the
        job renamed it."""
        state.remaining -= 1
        state.retries += job.attempt
        state.bytes_sent += bytes_sent
        state.whole_digest = digest
        state.note_times(result)
        if result.get("in_place") and getattr(job, "read_back", False):
            state.checksum = digest  # the digest of what the target returned
        if job.rename or result.get("in_place"):
            state.finalized = True
            self.placer.complete(state)
        else:
            self.placer.written(state)

    def _range_done(self, state: FileState, job: WriteRange, result: dict) -> None:
        index = job.index
        state.retries += job.attempt
        state.bytes_sent += result["bytes_sent"]
        if not job.part:  # a range's later pieces carry no digest of it
            state.digests[index] = result["digest"]
        state.note_times(result)
        state.remaining -= 1
        self.data_jobs -= 1
        if index in state.parts:
            state.parts[index] -= 1
            if state.parts[index]:
                return
            del state.parts[index]
        if self.run.options.verify == "checksum":
            # Checked on the target as soon as it is there, while later ranges still travel.
            self.await_check(state, index)
        elif state.remaining == 0:
            self.placer.written(state)

    def _link_done(self, job: Symlink, result: dict) -> None:
        status = ("created" if result.get("created") else "changed") if result["changed"] else "unchanged"
        self.run.link_results.append({"dest": job.path, "target": job.target, "status": status})
        if result["changed"]:
            self.run.links_changed += 1
            self.run.changed = True

    # -- temp files ----------------------------------------------------------------------------

    def _remove_stale_temps(self, plans: list, links: list, temps_found: dict) -> None:
        """Temps of older source versions, and any temp older than temp_max_age.

        A temp of another version written to within the last minutes may belong to a push
        that is running right now, so only quiet ones are removed.
        """
        in_use = {file_plan.temp for file_plan in plans} | {_plan.link_temp_path(target) for _link, target in links}
        our_files = {file_plan.dest for file_plan in plans}
        now = time.time()
        for path, entry in temps_found.items():
            if path in in_use:
                continue
            age = now - entry.mtime
            quiet_old_version = _plan.temp_owner(path) in our_files and age > ACTIVE_TEMP_SECONDS
            if age > self.run.options.temp_max_age or quiet_old_version:
                self.run.engine.submit(Remove(path=path), self._temp_removed)

    def _temp_removed(self, job, result) -> None:
        self.run.temps_removed += 1
        self.run.changed = True


def remove_temps_after_failure(run: PushRun) -> None:
    """After a refusal (no space, permission, mismatch), leave no temp file behind.

    Runs on a fresh single connection in this process (see _side_connection): the failed pool may be
    in any state.
    """
    temps = [state.plan.temp for state in run.files.values() if state.plan.action == "send" and not state.finalized]
    if not temps:
        return
    try:
        with run.side_connection() as cleaner:
            for temp in temps:
                cleaner.submit(Remove(path=temp), lambda job, result: None)
            cleaner.run()
    except EngineError as exc:
        run.warn(f"could not remove temporary files {temps[:5]} after the failure: {exc}")
