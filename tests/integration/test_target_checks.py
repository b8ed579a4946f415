"""How the push checks and resumes on targets that run no commands, and resumes below the range.

Issue 19, items 3, 6 and 7: with default options (verify: checksum) a push to an SFTP-only server
(OpenSSH `ForceCommand internal-sftp`, AsyncSSH) must give a verified copy, by reading the written
data back over SFTP; an interrupted push resumes there too; a resume keeps every block that landed,
on any server; every failed push writes its result_file with its warnings; the hashing deadline
follows the data to hash.
"""

from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path

import pytest

from ansible_collections.multipush.sftp.plugins.module_utils._digest import new_hasher
from ansible_collections.multipush.sftp.plugins.plugin_utils import _plan
from ansible_collections.multipush.sftp.plugins.plugin_utils._arguments import PushOptions
from ansible_collections.multipush.sftp.plugins.plugin_utils._push import Push
from ansible_collections.multipush.sftp.plugins.plugin_utils._resume import block_runs, resume_block
from ansible_collections.multipush.sftp.plugins.plugin_utils._target_digests import SERVICE, TargetDigests
from tests.support.faults import temp_files
from tests.support.waiting import wait_until
from tests.support.files import MIB, crc32, random_file, sha256, tree_snapshot
from tests.support.targets import spec_for
from tests.support import playenv

# Every push of this module has its result saved also when the host is unreachable.
push_task = functools.partial(playenv.push_task, ignore_unreachable=True)

SFTP_ONLY = ["sftp_only_sshd", "asyncssh_sftp"]
ALL_SERVERS = ["sshd", *SFTP_ONLY]


def run_on(request, run_play, tmp_path: Path, server_name: str, tasks: str, **kwargs):
    server = request.getfixturevalue(server_name)
    inventory = server.write_inventory(tmp_path / f"inventory-{server_name}.ini")
    return run_play(tasks, inventory=inventory, **kwargs)


def leftover_like_a_killed_push(source: Path, dest: Path, landed: list[tuple[int, int]]) -> Path:
    """The temp file an interrupted push leaves: full size (allocated sparse), the source's bytes in
    the spans that landed, zeros elsewhere; named as the push names it for this source version."""
    local = _plan.scan_source(str(source)).files[0]
    temp = Path(_plan.temp_path(str(dest), local))
    data = source.read_bytes()
    with open(temp, "wb") as handle:
        handle.truncate(len(data))
        for start, end in landed:
            handle.seek(start)
            handle.write(data[start:end])
    return temp


# --- default options on targets that run no commands (item 3) -----------------------------------


@pytest.mark.parametrize("server_name", SFTP_ONLY)
def test_default_push_is_verified_by_reading_back_over_sftp(request, run_play, tmp_path, server_name):
    source = tmp_path / "src"
    random_file(source / "disk.img", 24 * MIB + 5, seed=3)
    random_file(source / "small.cfg", 3000, seed=4)
    dest = tmp_path / "dest"
    run = run_on(request, run_play, tmp_path, server_name, push_task(f"{source}/", dest, chunk_size="4M"))
    result = run["pushed"]
    assert run.rc == 0 and not result.get("failed") and not result.get("unreachable"), run
    assert tree_snapshot(dest) == tree_snapshot(source)
    assert temp_files(dest) == []
    # checked, and how: the big file's ranges were read back, the small one in its batch
    assert result["remote_hashing"]["via"] == "sftp", result["remote_hashing"]
    assert result["remote_hashing"]["bytes_read"] >= 24 * MIB
    assert any("reading the written data back over SFTP" in warning for warning in result["warnings"]), result
    assert "reading the written data back over SFTP" in run.stdout + run.stderr  # shown, not only kept

    again = run_on(request, run_play, tmp_path, server_name, push_task(f"{source}/", dest, chunk_size="4M"))
    assert again["pushed"]["changed"] is False and again["pushed"]["files_skipped"] == 2, again


@pytest.mark.parametrize("server_name", SFTP_ONLY)
def test_compare_checksum_reads_back_over_sftp(request, run_play, tmp_path, server_name):
    source = random_file(tmp_path / "a.bin", 2 * MIB, seed=1)
    dest = tmp_path / "copy.bin"
    same = random_file(dest, 2 * MIB, seed=2)  # same size and mtime, other content: the quick check misses it
    os.utime(same, (os.stat(source).st_mtime, os.stat(source).st_mtime))
    run = run_on(request, run_play, tmp_path, server_name, push_task(source, dest, compare="checksum"))
    result = run["pushed"]
    assert run.rc == 0 and not result.get("failed"), run
    assert result["files_sent"] == 1 and sha256(dest) == sha256(source)
    assert result["remote_hashing"]["via"] == "sftp"


@pytest.mark.parametrize("server_name", SFTP_ONLY)
def test_interrupted_push_resumes_on_a_server_without_commands(request, run_play, tmp_path, server_name):
    """The leftover of an interrupted push is compared over SFTP, with verify: size as with the
    default: before, the comparison called the verify module and failed on every re-run."""
    size = 20 * MIB
    source = random_file(tmp_path / "src.bin", size, seed=9)
    dest = tmp_path / "dst.bin"
    leftover_like_a_killed_push(source, dest, [(0, 6 * MIB), (8 * MIB, 11 * MIB)])
    for verify in ("size", "checksum"):
        run = run_on(request, run_play, tmp_path, server_name,
                     push_task(source, dest, connections=2, chunk_size="4M", verify=verify, whole_checksum=True))
        result = run["pushed"]
        assert run.rc == 0 and not result.get("failed"), run
        (entry,) = result["files"]
        if verify == "size":
            assert entry["status"] == "resumed"
            assert entry["bytes_sent"] == size - 9 * MIB  # exactly the blocks that had not landed
            assert sha256(dest) == sha256(source)
            dest.unlink()
            leftover_like_a_killed_push(source, dest, [(0, 6 * MIB), (8 * MIB, 11 * MIB)])
        else:
            assert entry["status"] == "resumed" and entry["bytes_sent"] == size - 9 * MIB
            assert entry["checksum"] == crc32(source) and sha256(dest) == sha256(source)
    assert temp_files(tmp_path) == []


def test_a_module_that_cannot_run_hands_over_to_reading_back(sshd, tmp_path):
    """With become the checks go through the verify module; where Ansible's connection cannot run it,
    the push reads back over its own connections instead of failing a host it did reach."""

    source = random_file(tmp_path / "src.bin", 6 * MIB)
    warnings = []

    def module(requests, algorithm, whole=True):
        raise RuntimeError("Data could not be sent to remote host")

    result = Push(PushOptions(src=str(source), dest=str(tmp_path / "dst.bin"), connections=2, chunk_size="2M",
                              hash_over_ssh=False, whole_checksum=True),
                  spec_for(sshd), module, warnings.append).run()
    assert result["remote_hashing"]["via"] == "sftp" and result["remote_hashing"]["bytes_read"] == 6 * MIB
    assert any("Data could not be sent" in warning and "over SFTP" in warning for warning in warnings), warnings
    (entry,) = result["files"]
    assert entry["checksum"] == crc32(source) and sha256(tmp_path / "dst.bin") == sha256(source)


# --- every failure writes its result_file and keeps its warnings (items 3 and 7) -----------------


def test_failed_push_writes_result_file_with_its_warnings(request, run_play, tmp_path):
    source = tmp_path / "src"
    random_file(source / "a.bin", 1000)
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(source / "control.sock"))  # cannot be pushed: skipped with a warning
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the destination's parent should be")
    result_file = tmp_path / "out" / "result.json"
    try:
        run = run_on(request, run_play, tmp_path, "sshd",
                     push_task(f"{source}/", blocker / "dest", result_file=str(result_file)))
    finally:
        listening.close()
    result = run["pushed"]
    assert result.get("failed") and not result.get("unreachable"), run
    written = json.loads(result_file.read_text())
    assert written["failed"] and written["msg"] == result["msg"]
    assert any("control.sock" in warning for warning in written["warnings"]), written
    assert any("control.sock" in warning for warning in result["warnings"]), result


@pytest.mark.parametrize("src, options, named", [
    (".", {"connections": "many"}, "connections"),  # refused by Ansible's own argument validation
    ("no-such-source-dir/", {}, "no-such-source-dir"),  # a relative src that cannot be found
])
def test_push_refused_before_it_starts_writes_result_file(request, run_play, tmp_path, src, options, named):
    result_file = tmp_path / "early.json"
    task = push_task(src, tmp_path / "dest", result_file=str(result_file), **options)
    run = run_on(request, run_play, tmp_path, "sshd", task)
    result = run["pushed"]
    assert result.get("failed") and named in result["msg"], run
    written = json.loads(result_file.read_text())
    assert written["failed"] and written["msg"] == result["msg"]


# --- resume keeps every block that landed (item 6) -----------------------------------------------


@pytest.mark.parametrize("server_name", ALL_SERVERS)
def test_resume_sends_only_the_blocks_that_differ(request, run_play, tmp_path, server_name):
    """As 8 connections killed part-way leave it: each range written from its start up to some point
    (not on a block boundary), one range corrupted in its middle; default options otherwise."""
    size = 120 * MIB
    source = random_file(tmp_path / "src.bin", size, seed=11)
    dest = tmp_path / "dst.bin"
    chunk = _plan.chunk_size_for(size, "auto", 8)
    landed = [(start, min(size, start + int(chunk * 0.6) + 12345)) for start in range(0, size, chunk)]
    temp = leftover_like_a_killed_push(source, dest, landed)
    with open(temp, "r+b") as handle:  # one block in the middle of a range that had landed
        handle.seek(chunk // 4)
        handle.write(b"\0" * 100)
    block = resume_block(size)
    differing = [index for index in range(0, -(-size // block))
                 if not any(start <= index * block and min(size, (index + 1) * block) <= end for start, end in landed)]
    differing = sorted(set(differing) | {chunk // 4 // block})
    expected = sum(end - start for start, end in block_runs(differing, block, size))
    not_landed = size - sum(end - start for start, end in landed)

    run = run_on(request, run_play, tmp_path, server_name, push_task(source, dest, whole_checksum=True))
    result = run["pushed"]
    assert run.rc == 0 and not result.get("failed"), run
    (entry,) = result["files"]
    assert entry["status"] == "resumed"
    assert entry["bytes_sent"] == expected, (entry["bytes_sent"], expected)
    # the goal of the issue: what had not landed, plus at most one block per connection that was cut
    assert entry["bytes_sent"] <= not_landed + 100 + len(landed) * MIB
    assert entry["checksum"] == crc32(source) and sha256(dest) == sha256(source)
    assert temp_files(tmp_path) == []


def test_block_runs_and_resume_block():
    assert block_runs([], MIB, 10 * MIB) == []
    assert block_runs([0, 1, 3, 9], MIB, 9 * MIB + 5) == [(0, 2 * MIB), (3 * MIB, 4 * MIB), (9 * MIB, 9 * MIB + 5)]
    assert resume_block(1) == MIB and resume_block(16 * 1024 * MIB) == MIB
    assert resume_block(64 * 1024 * MIB) == 4 * MIB  # never more than RESUME_MAX_BLOCKS blocks


# --- the hashing deadline follows the data (item 7) ----------------------------------------------


class _Engine:
    def wake(self) -> None:
        pass


class _RecordingHashing:
    def __init__(self):
        self.deadlines = []

    def digests(self, requests, algorithm, get_checksum, deadline_seconds):
        self.deadlines.append(deadline_seconds)
        return [{"path": request["path"], "exists": True, "size": 0, "checksum": new_hasher(algorithm).hexdigest()}
                for request in requests]

    def close(self) -> None:
        pass


def test_hashing_deadline_grows_with_the_bytes_asked_for():
    hashing = _RecordingHashing()
    digests = TargetDigests("crc32", _Engine, hashing, None, SERVICE, print)
    try:
        for sizes in ({"/a": 0}, {"/a": 10 * 1024 * MIB, "/b": 10 * 1024 * MIB}):
            asked = digests.ask([{"path": path} for path in sizes], sizes)
            wait_until(asked.done, 30, interval=0.01, what="the digests asked for")
    finally:
        digests.close()
    small, large = hashing.deadlines
    assert small >= 120 and large >= small + 20 * 1024 * MIB / 10e6


def test_compare_checksum_gives_the_hashing_service_time_for_the_files_compared(sshd, tmp_path):
    """compare: checksum runs before the file list exists: its deadline was always the minimum."""

    source = random_file(tmp_path / "src.bin", 64 * MIB)
    dest = tmp_path / "dst.bin"
    dest.write_bytes(source.read_bytes())
    os.utime(dest, (1, 1))
    push = Push(PushOptions(src=str(source), dest=str(dest), compare="checksum"), spec_for(sshd), None, print)
    hashing = push.target.hashing
    real_digests = hashing.digests
    deadlines = []

    def digests(requests, algorithm, get_checksum, deadline_seconds):
        deadlines.append(deadline_seconds)
        return real_digests(requests, algorithm, get_checksum, deadline_seconds)

    hashing.digests = digests  # this instance only; it runs in the coordinator's process
    result = push.run()
    assert result["files_skipped"] == 1 and result["remote_hashing"]["via"] == "ssh"
    assert deadlines and deadlines[0] >= 120 + 64 * MIB / 10e6, deadlines


# --- small files: read back in their batch, or hashed on the target (issue 21) -----------------------


@pytest.mark.parametrize("server_name", ALL_SERVERS)
def test_small_files_above_the_read_back_limit_are_hashed_on_the_target(request, tmp_path, server_name):
    """Files up to READ_BACK_LIMIT come back in the pipeline that wrote them; bigger small files are
    not read back there (their bytes would travel twice) but checked like ranges: by the hashing
    service where the target runs one, by reading back over SFTP where it runs no commands."""
    from ansible_collections.multipush.sftp.plugins.plugin_utils._jobs import WriteBatch
    from ansible_collections.multipush.sftp.plugins.plugin_utils._verifier import READ_BACK_LIMIT

    server = request.getfixturevalue(server_name)
    tree = tmp_path / "tree"
    for index in range(4):
        random_file(tree / f"conf{index}.cfg", 1000 + index, seed=index)
        random_file(tree / f"blob{index}.bin", READ_BACK_LIMIT + 1 + 7919 * index, seed=10 + index)
    batches = []

    def observer(event, job, result):
        if event == "submit" and isinstance(job, WriteBatch):
            batches.append(job)

    result = Push(PushOptions(src=f"{tree}/", dest=str(tmp_path / "out"), connections=2), spec_for(server), None,
                  print, observer=observer).run()
    assert result["files_sent"] == 8 and tree_snapshot(tmp_path / "out") == tree_snapshot(tree)
    assert temp_files(tmp_path / "out") == []
    for job in batches:
        sizes = [item["size"] for item in job.files]
        assert job.read_back == (max(sizes) <= READ_BACK_LIMIT), (job.read_back, sizes)
    assert {job.read_back for job in batches} == {True, False}
    hashing = result["remote_hashing"]
    assert hashing["calls"] >= 1 and hashing["via"] == ("ssh" if server_name == "sshd" else "sftp"), hashing
    for entry in result["files"]:
        assert entry["checksum"] == crc32(Path(entry["src"])), entry
