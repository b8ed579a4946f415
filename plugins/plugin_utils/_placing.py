# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The last step of every file: from its temp name to its place, once its bytes are checked.

A file whose bytes are all acknowledged is `written`: with verify: checksum it waits for the
verifier, otherwise it is put in place at once (with verify: size after a size check). Files go in
place in batches, every connection a share: their final mode and mtime, then an atomic rename.
"""

from __future__ import annotations

import time
from typing import Callable

from ansible_collections.multipush.sftp.plugins.plugin_utils import _plan
from ansible_collections.multipush.sftp.plugins.plugin_utils._jobs import Finalize
from ansible_collections.multipush.sftp.plugins.plugin_utils._push_state import FileState, PushRun


class Placer:
    """await_check(state, None): hand a whole file to the verifier (verify: checksum)."""

    def __init__(self, run: PushRun, await_check: Callable[[FileState, int | None], None]):
        self.run = run
        self.await_check = await_check

    def written(self, state: FileState) -> None:
        """All bytes of a file are acknowledged in its temp file (ranges not checked one by one)."""
        self.written_many([state])

    def written_many(self, states: list) -> None:
        """As written() for each of `states`; those that go in place now share Finalize batches."""
        verify = self.run.options.verify
        ready = []
        for state in states:
            if state.chunked:  # a whole file was checked by its worker right after writing
                state.check_source()
            if verify == "checksum":
                self.await_check(state, None)
            else:
                ready.append((state, state.plan.local.size if verify == "size" else None))
        if ready:
            self.finalize_many(ready)

    def finalize_many(self, items: list) -> None:
        """(state, expected size or None) pairs: put in place in batches, every connection a share."""
        engine = self.run.engine
        for group in _plan.small_file_batches([0] * len(items), engine.size):
            chosen = [items[index] for index in group]
            job = Finalize(files=tuple(
                {"temp": state.plan.temp, "dest": state.plan.dest, "mode": state.plan.local.mode,
                 "mtime": state.plan.local.mtime, "expect_size": None if not state.chunked else expect_size}
                for state, expect_size in chosen))
            engine.submit(job, lambda job, result, states=[state for state, _size in chosen]: self._placed(states, job))

    def _placed(self, states: list, job: Finalize) -> None:
        for state in states:
            state.retries += job.attempt
            state.finished = time.time()
            state.finalized = True
            self.complete(state)

    def complete(self, state: FileState) -> None:
        elapsed = (state.finished - state.started) if state.started and state.finished else 0.0
        self.run.progress.file_done(state.plan.dest, state.plan.local.size, elapsed, state.status)
