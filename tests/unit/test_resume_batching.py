"""The resume's comparison puts the files it found whole in place together (pure coordination: the
target's answers and the placer are stand-ins; the files and their digests are real)."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

from ansible_collections.multipush.sftp.plugins.plugin_utils._fast_crc import digest_file
from ansible_collections.multipush.sftp.plugins.plugin_utils._plan import FilePlan, LocalFile
from ansible_collections.multipush.sftp.plugins.plugin_utils._push_state import FileState
from ansible_collections.multipush.sftp.plugins.plugin_utils._resume import Resumer, resume_block


class Placer:
    def __init__(self):
        self.finalize_calls, self.written_calls = [], []

    def finalize_many(self, items):
        self.finalize_calls.append([state for state, _size in items])

    def written_many(self, states):
        self.written_calls.append(list(states))


class Target:
    """Answers every comparison as the target would for a copy identical to the source."""

    def ask(self, requests, sizes, whole=False):
        future = Future()
        future.set_result([{"path": request["path"], "chunk_checksums": self.digests[request["path"]]}
                           for request in requests])
        return future


def states_for(tmp_path, count):
    states, digests = [], {}
    for index in range(count):
        path = tmp_path / f"conf{index:03}.cfg"
        path.write_bytes(os.urandom(100 + index))
        status = path.stat()
        local = LocalFile(rel=path.name, path=str(path), size=status.st_size, mtime=status.st_mtime, mode=0o644)
        plan = FilePlan(local=local, dest=f"/dest/{path.name}", action="send", reason="new",
                        chunk_size=status.st_size, ranges=[(0, status.st_size)])
        digests[plan.temp] = digest_file(str(path), "crc32", resume_block(status.st_size), whole=False)[1]
        states.append(FileState(plan))
    return states, digests


def test_hundreds_of_files_found_whole_go_in_place_in_one_call(tmp_path):
    for verify, calls in (("checksum", "finalize_calls"), ("size", "written_calls")):
        states, digests = states_for(tmp_path, 300)
        target, placer = Target(), Placer()
        target.digests = digests
        run = SimpleNamespace(options=SimpleNamespace(checksum_algorithm="crc32", verify=verify, whole_checksum=False),
                              progress=SimpleNamespace(grow=lambda nbytes: None), algorithm="crc32")
        with ThreadPoolExecutor(max_workers=1) as hasher:
            resumer = Resumer(run, target, hasher, sender=None, placer=placer,
                              fed=frozenset(state.plan.temp for state in states))
            resumer.start(states)
            while not resumer.idle():
                pass
        assert getattr(placer, calls) == [states], verify  # one call with every file, not one per file
        assert all(state.status == "sent" for state in states)  # a peer's copy: the files count as sent
