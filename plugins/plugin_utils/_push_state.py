# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the rooms of one push share: its settings, its engine, the files it pushes and the
counters its result reports. Owned by the conductor (_push.Push); the rooms read it and add to it,
all in the coordinator's thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ansible_collections.multipush.sftp.plugins.plugin_utils import _bandwidth, _plan
from ansible_collections.multipush.sftp.plugins.plugin_utils._engine import Engine, EngineError
from ansible_collections.multipush.sftp.plugins.plugin_utils._jobs import Job
from ansible_collections.multipush.sftp.plugins.plugin_utils._progress import Progress
from ansible_collections.multipush.sftp.plugins.plugin_utils._side_connection import SideConnection
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import ConnectionSpec


@dataclass
class FileState:
    """One file of the push, from its plan to its place on the target."""

    plan: _plan.FilePlan
    digests: dict = field(default_factory=dict)  # range index -> local digest
    whole_digest: str | None = None
    remaining: int = 0  # write jobs queued or running
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

    def check_source(self) -> None:
        """The source must still be what was planned (size and mtime) before its copy goes in place."""
        local = self.plan.local
        problem = _plan.source_changed(local.path, local.size, local.mtime)
        if problem:
            raise EngineError(problem)


class PushRun:
    """The shared state of one push. `options` is the push's PushOptions."""

    def __init__(self, options, spec: ConnectionSpec, warn: Callable[[str], None], progress: Progress,
                 observer: Callable | None = None):
        self.options = options
        self.spec = spec
        self.warn = warn
        self.progress = progress
        self.observer = observer  # handed to every engine of the push (tests, diagnostics)
        self.engine: Engine | None = None
        # The bandwidth limits' shared state (None: no limit), made here in the coordinator before
        # any engine forks its workers, which inherit it.
        self.budget = _bandwidth.for_push(options)
        progress.show_limits(options.bandwidth_limit, options.total_bandwidth_limit)
        self.files: dict[str, FileState] = {}
        self.changed = False
        self.dirs_created = 0
        self.links_changed = 0
        self.temps_removed = 0
        # Per symlink of the tree: {dest, target, status}; status created, changed or unchanged (in check
        # mode would_create, would_change or unchanged). The result's `links`.
        self.link_results: list[dict] = []
        self.absolute_dest: str | None = None  # dest as the target resolves it (the result's `dest`)

    @property
    def algorithm(self) -> str | None:
        """The digest the writers compute while sending: only when the target's copy is checked by it."""
        return self.options.checksum_algorithm if self.options.verify == "checksum" else None

    def call(self, job: Job) -> dict:
        """Run one job on the pool and wait for it (the few sequential steps of survey and directories)."""
        box: dict = {}
        self.engine.submit(job, lambda _job, result: box.update(result))
        self.engine.run()
        return box

    def side_connection(self, retries: int | None = None) -> SideConnection:
        """One fresh connection in this process, for work after the pool is closed or failed."""
        options = self.options
        return SideConnection(self.spec, options.retries if retries is None else retries, options.retry_delay,
                              observer=self.observer)
