# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Resume: a temp file left by an interrupted push of the same source version is compared with
the source block by block, and only runs of differing blocks are sent.

The comparison runs on the target (TargetDigests: the hashing service, or read-back over SFTP) and
here at once, while the other files travel; the engine's idle hook collects the answers. A range
sent in pieces is still checked whole: its first piece hashes the rest of it from the local file.
"""

from __future__ import annotations

import math
from concurrent.futures import Executor

from ansible_collections.multipush.sftp.plugins.plugin_utils._fast_crc import digest_file
from ansible_collections.multipush.sftp.plugins.plugin_utils._engine import EngineError
from ansible_collections.multipush.sftp.plugins.plugin_utils._jobs import WriteRange
from ansible_collections.multipush.sftp.plugins.plugin_utils._placing import Placer
from ansible_collections.multipush.sftp.plugins.plugin_utils._push_state import FileState, PushRun
from ansible_collections.multipush.sftp.plugins.plugin_utils._sending import Sender

# A leftover temp file is compared with the source in blocks of at least this size (bigger for
# files of more than this many blocks): every differing block is sent again, and nothing else.
RESUME_BLOCK = 1024 * 1024
RESUME_MAX_BLOCKS = 16384


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


class Resumer:
    def __init__(self, run: PushRun, target, local_hasher: Executor, sender: Sender, placer: Placer,
                 fed: frozenset = frozenset()):
        self.run = run
        self.fed = fed  # temps a peer wrote (fan-out): compared the same way, but their files count as sent
        self.target = target
        self.local_hasher = local_hasher
        self.sender = sender
        self.placer = placer
        self.comparing: list[tuple] = []  # (states, blocks, local digests, target's digests)

    def start(self, states: list[FileState]) -> None:
        """Compare leftover temp files block by block with the source, on the target and here at once."""
        options = self.run.options
        algorithm = options.checksum_algorithm
        whole = options.verify == "checksum" and options.whole_checksum
        blocks = [resume_block(state.plan.local.size) for state in states]
        local = self.local_hasher.submit(
            lambda: [digest_file(state.plan.local.path, algorithm, block, whole=whole)
                     for state, block in zip(states, blocks)])
        requests = [{"path": state.plan.temp, "chunk_size": block} for state, block in zip(states, blocks)]
        remote = self.target.ask(requests, {state.plan.temp: state.plan.local.size for state in states}, whole=False)
        self.comparing.append((states, blocks, local, remote))

    def idle(self) -> bool:
        """Engine idle hook: send what differs in the leftovers compared so far. True when none is left.
        The files found whole go in place together (a peer's copy of a tree of many small files is
        hundreds of them: one Finalize batch per connection's share, not one job per file)."""
        waiting, whole, written = [], [], []
        for states, blocks, local, remote in self.comparing:
            if not (local.done() and remote.done()):
                waiting.append((states, blocks, local, remote))
                continue
            try:
                answers = {answer["path"]: answer for answer in remote.result()}
            except EngineError as exc:
                self.run.warn(f"cannot compare leftover temp files on the target, sending them again whole: {exc}")
                answers = {}
            for state, block, (local_whole, local_blocks) in zip(states, blocks, local.result()):
                remote_blocks = answers.get(state.plan.temp, {}).get("chunk_checksums") or []
                differing = [index for index, digest in enumerate(local_blocks)
                             if index >= len(remote_blocks) or remote_blocks[index] != digest]
                self._send_differing_blocks(state, block, differing, local_whole, whole, written)
        if whole:
            self.placer.finalize_many(whole)
        if written:
            self.placer.written_many(written)
        self.comparing = waiting
        return not waiting

    def _send_differing_blocks(self, state: FileState, block: int, differing: list, local_whole,
                               whole: list, written: list) -> None:
        """A leftover temp compared: each range's differing blocks travel (one job per run of them),
        ranges with none are verified already (compared by digest with the target's copy). A file
        with none at all joins `whole` (checked: to put in place) or `written` (to check)."""
        options = self.run.options
        checking = options.verify == "checksum"
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
        state.status = "sent" if state.plan.temp in self.fed else "resumed"
        self.run.progress.grow(-(size - sum(end - start for start, end in runs)))
        if checking and options.whole_checksum:
            state.whole_future = self.local_hasher.submit(lambda value=local_whole: value)
        if pieces:
            self._send_pieces(state, pieces)
        elif checking:
            state.check_source()
            whole.append((state, None))
        else:
            written.append(state)

    def _send_pieces(self, state: FileState, pieces: dict) -> None:
        """Pieces of ranges (index -> [(start, end)]): the first piece of a range also hashes the rest
        of that range from the local file, so the range's digest is checked on the target as usual."""
        file_plan = state.plan
        algorithm = self.run.algorithm
        jobs = []
        for index, spans in pieces.items():
            offset, length = file_plan.ranges[index]
            state.parts[index] = len(spans)
            for number, (start, end) in enumerate(spans):
                first = number == 0
                jobs.append(WriteRange(
                    local=file_plan.local.path, temp=file_plan.temp, dest=file_plan.dest, start=start, end=end,
                    index=index, size=file_plan.local.size, algorithm=algorithm if first else None, part=not first,
                    hash_from=offset if first and algorithm else None,
                    hash_to=offset + length if first and algorithm else None))
        self.sender.queue_ranges(state, jobs)
