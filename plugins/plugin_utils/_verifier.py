# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""verify: checksum for what is not read back in its own batch: written ranges and whole files
are checked on the target (through TargetDigests) while later ones still travel, in batches, and
judged: a match goes in place, a mismatch is sent again.

Runs as part of the engine's idle hook, in the coordinator's thread; the digests themselves are
computed elsewhere (the hashing service's thread, the verify module, or read-back jobs).
"""

from __future__ import annotations

from typing import Callable

from ansible_collections.multipush.sftp.plugins.plugin_utils._placing import Placer
from ansible_collections.multipush.sftp.plugins.plugin_utils._push_state import FileState, PushRun
from ansible_collections.multipush.sftp.plugins.plugin_utils._target_digests import MODULE, SERVICE, SFTP

# Remote checks run once this much data awaits them (or when nothing is left to send): a run of
# the verify module costs seconds, hashing over the push's own connection a round trip or two.
VERIFY_BATCH_BYTES = 256 * 1024 * 1024
VERIFY_BATCH_BYTES_SSH = 32 * 1024 * 1024
# Small files up to this size are checked by reading them back in the pipeline that wrote them: no
# round trip, no check and no finalize job of their own. Larger ones would travel back through the
# SSH crypto of both ends, many times the CPU of hashing them where they are, so the target hashes
# them as it hashes ranges.
READ_BACK_LIMIT = 64 * 1024


class Verifier:
    """target: the push's TargetDigests. resend(state, bad indexes): send again what differs.
    sending_done(): whether no write job is queued or running."""

    def __init__(self, run: PushRun, target, placer: Placer, resend: Callable[[FileState, list], None],
                 sending_done: Callable[[], bool]):
        self.run = run
        self.target = target
        self.placer = placer
        self.resend = resend
        self.sending_done = sending_done
        self.awaiting: list[tuple] = []  # (state, range index, or None for a whole file)
        self.batch: list[tuple] = []  # (state, range indexes or None) being checked now
        self.future = None

    def prepare(self, sending: list) -> None:
        """Before the first byte: have the way of checking ready by the first check."""
        if self.run.options.verify != "checksum":
            return
        if sending and self.target.way == MODULE:
            # An empty first call opens Ansible's connection to the target while the first files
            # are still travelling, so the first real verification does not pay for it.
            self.batch = []
            self.future = self.target.ask([], {})
        elif any(file_plan.local.size > READ_BACK_LIMIT for file_plan in sending):
            # Files that are not read back in their batch are hashed on the target: its connection
            # logs in and starts the service while the first bytes travel (and a target that cannot
            # run it is found out before the first check).
            self.target.warm()

    def expect(self, state: FileState, index: int | None) -> None:
        """A range (or, None, a whole file) is written and waits for its check."""
        self.awaiting.append((state, index))

    def idle(self) -> bool:
        """Engine idle hook: start/collect remote hashing batches. True when nothing is left."""
        if self.future is not None:
            if not self.future.done():
                return False
            answers = self.future.result()  # re-raises a failed module run
            batch, self.future = self.batch, None
            self._judge(batch, answers)
        if self.awaiting and self._due():
            self.batch, self.awaiting = self._group(self.awaiting), []
            requests = []
            for state, indexes in self.batch:
                if indexes is None:
                    requests.append({"path": state.plan.temp})
                else:
                    requests.append({"path": state.plan.temp, "chunk_size": state.plan.chunk_size,
                                     "chunk_indexes": indexes, "get_checksum": False})
            self.future = self.target.ask(requests, {state.plan.temp: state.plan.local.size
                                                     for state, _indexes in self.batch})
            return False
        return True

    def _due(self) -> bool:
        """Batch the checks: each call costs a Python start-up on the target (and, through the
        module, much more on the controller), which competes with the transfer for CPU. Check once
        enough has piled up, and at once when nothing is left to send."""
        if self.sending_done():
            return True
        if self.target.way == SFTP:  # read back by the pool: no start-up cost per check to spread
            return True
        threshold = VERIFY_BATCH_BYTES_SSH if self.target.way == SERVICE else VERIFY_BATCH_BYTES
        pending = 0
        for state, index in self.awaiting:
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
            bad = self._differing(state, indexes, by_path.get(state.plan.temp, {}))
            if bad:
                self.resend(state, bad)
            elif indexes is None or len(state.verified) == len(state.plan.ranges):
                if indexes is not None:
                    state.check_source()
                ready.append((state, None))
        if ready:
            self.placer.finalize_many(ready)

    @staticmethod
    def _differing(state: FileState, indexes: list | None, answer: dict) -> list:
        """The ranges (or [0] for a whole file) whose copy on the target differs from the source."""
        if not answer.get("exists") or answer.get("size") != state.plan.local.size:
            return indexes if indexes is not None else [0]
        if indexes is not None:
            remote_chunks = answer.get("chunk_checksums") or []
            bad = [index for index in indexes
                   if index >= len(remote_chunks) or remote_chunks[index] != state.digests.get(index)]
            state.verified.update(index for index in indexes if index not in bad)
            return bad
        if answer.get("checksum") != state.whole_digest:
            return [0]
        state.checksum = answer.get("checksum")
        return []
