"""The push engine against the real sshd, driven from Python so faults can be placed exactly.

Still real: sshd, SFTP, files, forked workers. What is injected: a corrupted range on the
target's disk before verification, and a killed sshd session mid-transfer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pytest

from ansible_collections.multipush.sftp.plugins.plugin_utils import _engine, _paramiko_compat
from ansible_collections.multipush.sftp.plugins.plugin_utils._engine import Engine, EngineError
from ansible_collections.multipush.sftp.plugins.plugin_utils._jobs import CreateTemps, Remove, WriteBatch, WriteRange
from ansible_collections.multipush.sftp.plugins.plugin_utils._arguments import PushOptions
from ansible_collections.multipush.sftp.plugins.plugin_utils._push import Push
from ansible_collections.multipush.sftp.plugins.plugin_utils._remote_hash import HasherUnavailable, TargetHasher
from ansible_collections.multipush.sftp.plugins.plugin_utils._session import open_session
from ansible_collections.multipush.sftp.plugins.plugin_utils import _sftp, _wire
from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp import RemoteFiles
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import SessionError
from tests.support.files import MIB, random_file, crc32, sha256
from tests.support.sshd import SshServer
from tests.support.targets import local_verify, spec_for
from tests.support.waiting import wait_until


def test_verification_mismatch_resends_only_the_bad_range(sshd, tmp_path):
    source = random_file(tmp_path / "src.bin", 8 * MIB)
    dest = tmp_path / "dst.bin"
    calls = []

    def corrupting_verify(requests, algorithm, whole=True):
        for request in requests:
            if 3 in (request.get("chunk_indexes") or []):
                if not calls:  # a bad disk on the target flips bytes in range 3 before it is first checked
                    with open(request["path"], "r+b") as handle:
                        handle.seek(3 * MIB + 100)
                        handle.write(b"\x00\xff")
                calls.append(request["chunk_indexes"])
        return local_verify(requests, algorithm, whole)

    # The module path (the callback), whose answers this test can corrupt.
    result = Push(PushOptions(src=str(source), dest=str(dest), connections=2, chunk_size="1M", hash_over_ssh=False,
                              whole_checksum=True),
                  spec_for(sshd), corrupting_verify, print).run()
    (entry,) = result["files"]
    assert entry["status"] == "resent"
    assert entry["bytes_sent"] == 9 * MIB  # the file once, then only the corrupted 1 MiB range
    assert len(calls) == 2  # range 3 was checked, found bad, sent again and checked again
    assert sha256(dest) == sha256(source) and entry["checksum"] == crc32(source)


def test_persistent_mismatch_fails_naming_the_file_and_leaves_no_temp(sshd, tmp_path):
    source = random_file(tmp_path / "src.bin", 2 * MIB)
    dest = tmp_path / "dst.bin"

    def always_wrong(requests, algorithm, whole=True):
        return [dict(answer, checksum="0" * 64, chunk_checksums=["0" * 64] * 2)
                for answer in local_verify(requests, algorithm)]

    with pytest.raises(EngineError, match="still differs") as failure:
        Push(PushOptions(src=str(source), dest=str(dest), connections=2, chunk_size="1M", hash_over_ssh=False),
             spec_for(sshd), always_wrong, print).run()
    assert str(dest) in str(failure.value)
    assert not dest.exists()
    assert not list(tmp_path.glob("*.multipush.tmp"))


@pytest.fixture
def private_sshd(tmp_path):
    """An sshd of this test alone: its session processes are then all ours to kill."""
    server = SshServer(workdir=tmp_path / "private-sshd")
    server.start()
    yield server
    server.stop()


def test_remote_hashing_runs_over_the_push_connection_and_matches_the_source(sshd, tmp_path):
    tree = tmp_path / "tree"
    random_file(tree / "big.img", 6 * MIB)
    for index in range(5):
        random_file(tree / f"small{index}.cfg", 100 + index, seed=index)
    result = Push(PushOptions(src=f"{tree}/", dest=str(tmp_path / "out"), connections=2, chunk_size="1M",
                              whole_checksum=True), spec_for(sshd), None, print).run()
    assert result["remote_hashing"]["via"] == "ssh" and result["remote_hashing"]["calls"] >= 1
    for entry in result["files"]:
        assert entry["checksum"] == crc32(Path(entry["src"]))
        assert sha256(Path(entry["src"])) == sha256(Path(entry["dest"]))


def test_chunked_files_are_created_together_and_their_ranges_go_first(sshd, tmp_path):
    """One create job for every chunked file (two round trips for all of them), and the ranges, the
    longest jobs, queued before the small files' batches, which then fill the connections that finish
    early. Watched through the engine's observer; the push itself runs for real."""
    tree = tmp_path / "tree"
    random_file(tree / "a.img", 3 * MIB, seed=1)
    random_file(tree / "b.img", 3 * MIB, seed=2)
    for index in range(6):
        random_file(tree / f"small{index}.cfg", 100 + index, seed=10 + index)
    submitted = []

    def observer(event, job, result):
        if event == "submit":
            submitted.append(job)

    result = Push(PushOptions(src=f"{tree}/", dest=str(tmp_path / "out"), connections=2, chunk_size="1M"),
                  spec_for(sshd), local_verify, print, observer=observer).run()
    assert result["files_sent"] == 8
    for entry in result["files"]:
        assert sha256(Path(entry["src"])) == sha256(Path(entry["dest"]))
    kinds = [type(job) for job in submitted if isinstance(job, (CreateTemps, WriteRange, WriteBatch))]
    creates = [job for job in submitted if isinstance(job, CreateTemps)]
    assert len(creates) == 1
    assert sorted(Path(item["temp"]).name.split(".")[1] for item in creates[0].files) == ["a", "b"]
    assert kinds.count(WriteRange) == 6 and WriteBatch in kinds
    assert kinds.index(WriteBatch) > len(kinds) - 1 - kinds[::-1].index(WriteRange)  # every range before any batch


def test_small_files_are_checked_by_reading_them_back_without_the_hashing_service(sshd, tmp_path):
    tree = tmp_path / "tree"
    for index in range(20):
        random_file(tree / f"conf{index:02}.cfg", 300 + 997 * index, seed=index)
    result = Push(PushOptions(src=f"{tree}/", dest=str(tmp_path / "out"), connections=2), spec_for(sshd), None,
                  print).run()
    assert result["files_sent"] == 20 and result["remote_hashing"]["calls"] == 0, result["remote_hashing"]
    for entry in result["files"]:
        assert entry["checksum"] == crc32(Path(entry["src"]))  # the digest of what the target returned
        assert Path(entry["dest"]).read_bytes() == Path(entry["src"]).read_bytes()
        assert os.stat(entry["dest"]).st_mode & 0o777 == os.stat(entry["src"]).st_mode & 0o777


def test_a_small_file_that_reads_back_wrong_is_left_to_the_regular_check(sshd, tmp_path, monkeypatch):
    """A read-back that does not match keeps the batch out of place; the coordinator then has the
    target hash the files and puts in place those that match (here all: the copy was fine)."""
    tree = tmp_path / "tree"
    for index in range(6):
        random_file(tree / f"conf{index}.cfg", 2000 + index, seed=index)
    real_send_reads = RemoteFiles._send_reads

    def garbled(self, pipeline, handle, item, hasher, counts, index):
        if index == 0:
            hasher.update(b"not what the target holds")
        return real_send_reads(self, pipeline, handle, item, hasher, counts, index)

    monkeypatch.setattr(RemoteFiles, "_send_reads", garbled)  # the forked workers inherit it
    result = Push(PushOptions(src=f"{tree}/", dest=str(tmp_path / "out"), connections=1), spec_for(sshd), None,
                  print).run()
    assert result["files_sent"] == 6 and result["remote_hashing"]["calls"] >= 1, result["remote_hashing"]
    for entry in result["files"]:
        assert entry["checksum"] == crc32(Path(entry["src"]))
        assert Path(entry["dest"]).read_bytes() == Path(entry["src"]).read_bytes()


def test_one_hashing_service_per_push_on_a_connection_of_its_own(private_sshd, tmp_path):
    """Four data connections, one exec session for hashing: the target starts Python once, and the
    data connections run nothing but SFTP."""
    source = random_file(tmp_path / "big.img", 12 * MIB)
    before = len(private_sshd.log_file.read_text())
    result = Push(PushOptions(src=str(source), dest=str(tmp_path / "out.img"), connections=4, chunk_size="1M"),
                  spec_for(private_sshd), None, print).run()
    log = private_sshd.log_file.read_text()[before:]
    assert result["connections"] == 4 and result["remote_hashing"]["via"] == "ssh"
    assert log.count("Starting session: subsystem 'sftp'") == 4, log
    assert log.count("Starting session: command") == 1, log
    assert sha256(tmp_path / "out.img") == sha256(source)


def test_hashing_works_where_the_server_allows_one_session_per_connection(tmp_path):
    """MaxSessions 1: each data connection's only session is its SFTP; the hashing connection's is
    the service."""
    server = SshServer(workdir=tmp_path / "one-session-push", options={"MaxSessions": "1"})
    server.start()
    try:
        source = random_file(tmp_path / "big.img", 6 * MIB)
        result = Push(PushOptions(src=str(source), dest=str(tmp_path / "out.img"), connections=2, chunk_size="1M",
                                  whole_checksum=True), spec_for(server), None, print).run()
    finally:
        server.stop()
    assert result["remote_hashing"]["via"] == "ssh", result["remote_hashing"]
    assert result["files"][0]["checksum"] == crc32(source)


def test_directories_of_hundreds_of_entries_are_listed_completely(sshd, tmp_path):
    tree = tmp_path / "tree"
    for index in range(250):  # more than two READDIR replies' worth (OpenSSH sends up to 100 names each)
        random_file(tree / "many" / f"f{index:03}.txt", 10 + index % 7, seed=index)
    random_file(tree / "few" / "one.txt", 5)
    options = dict(src=f"{tree}/", dest=str(tmp_path / "out"), connections=2, verify="size")
    first = Push(PushOptions(**options), spec_for(sshd), None, print).run()
    assert first["files_sent"] == 251
    again = Push(PushOptions(**options), spec_for(sshd), None, print).run()
    assert again["files_skipped"] == 251 and again["changed"] is False, again["files_sent"]


def test_survey_reads_a_directory_with_more_entries_than_expected_and_tells_missing_from_files(sshd, tmp_path):
    crowded = tmp_path / "crowded"
    for index in range(350):  # the local tree said none: two READDIRs bring 198 names, so it is read again
        (crowded / f"n{index:03}").parent.mkdir(exist_ok=True)
        (crowded / f"n{index:03}").write_bytes(b"x" * (index % 5))
    plain = tmp_path / "plain.txt"
    plain.write_text("a file\n")
    missing = tmp_path / "missing"
    transport, sftp = open_session(spec_for(sshd))
    try:
        remote = RemoteFiles(transport, sftp)
        entries, listing = remote.survey([str(crowded), str(missing), str(plain)],
                                         [str(crowded), str(missing), str(plain)], {str(crowded): 0})
        # the reply to limits@openssh.com, asked at connect without waiting, came in along the way
        assert remote.write_size_known and remote.write_size > 32768
    finally:
        transport.close()
    assert entries[str(crowded)].kind == "directory" and entries[str(plain)].kind == "file"
    assert entries[str(missing)] is None
    assert sorted(listing[str(crowded)]) == [f"n{index:03}" for index in range(350)]
    assert listing[str(crowded)]["n004"].size == 4
    assert listing[str(missing)] is None and listing[str(plain)] is None


def test_a_session_start_held_back_finds_its_channel_open_already(tmp_path):
    """A channel costs the server no process: a pool connection opens it at login, so the session
    start it waits for (see _engine.SessionGate) is one round trip, the subsystem request with
    SFTP's init behind it. Seen in sshd's own log while the start is held back."""
    with SshServer(workdir=tmp_path / "sshd", options={"LogLevel": "DEBUG1"}) as server:
        log_while_held = []

        @contextlib.contextmanager
        def held_turn(throttle):
            log_while_held.append(wait_until(
                lambda: "server_input_channel_open: ctype session" in server.log_file.read_text()
                and server.log_file.read_text(), 10, what="the session channel opened before the start"))
            yield

        transport, sftp = open_session(spec_for(server), session_turn=held_turn)
        try:
            assert sftp.normalize(".")  # the session works on the channel opened before
        finally:
            transport.close()
    assert "Starting session: subsystem 'sftp'" not in log_while_held[0]
    assert server.log_file.read_text().count("server_input_channel_open: ctype session") == 1


def test_rerun_with_nothing_to_send_does_not_wait_for_every_handshake(sshd, tmp_path):
    tree = tmp_path / "tree"
    for index in range(8):  # work for a pool of 8
        random_file(tree / f"f{index}.cfg", 1000 + index, seed=index)
    options = dict(src=f"{tree}/", dest=str(tmp_path / "out"), connections=8, verify="size")
    first = Push(PushOptions(**options), spec_for(sshd), None, print).run()
    assert first["files_sent"] == 8 and first["connections"] == 8
    # One handshake at a time: the first connection has surveyed long before the eighth could log in.
    again = Push(PushOptions(**options, max_concurrent_handshakes=1), spec_for(sshd), None, print).run()
    assert again["files_skipped"] == 8 and again["changed"] is False
    assert 1 <= again["connections"] < 8


def _sftp_sessions_started(server: SshServer) -> int:
    return server.log_file.read_text().count("Starting session: subsystem 'sftp'")


@pytest.mark.parametrize("check_mode", [False, True])
def test_the_pools_sessions_start_only_when_there_is_something_to_send(tmp_path, check_mode):
    """Each SFTP session runs sftp-server through a login shell on the target: a re-run with
    nothing to send (or a check-mode run) starts the first connection's session alone; the
    others log in and wait until the survey says they are needed, and never start theirs."""
    tree = tmp_path / "tree"
    for index in range(8):  # work for a pool of 8
        random_file(tree / f"f{index}.cfg", 1000 + index, seed=index)
    options = dict(src=f"{tree}/", dest=str(tmp_path / "out"), connections=8, verify="size")
    with SshServer(workdir=tmp_path / "sshd") as server:  # its own log: no other test's sessions in it
        first = Push(PushOptions(**options), spec_for(server), None, print).run()
        assert first["files_sent"] == 8 and first["connections"] == 8
        assert _sftp_sessions_started(server) == 8
        if check_mode:
            (tree / "f0.cfg").write_bytes(b"changed")
        again = Push(PushOptions(**options, check_mode=check_mode), spec_for(server), None, print).run()
        assert again["changed"] is check_mode
        assert again["files_skipped"] == (7 if check_mode else 8)
        assert again["connections"] == 1
        assert _sftp_sessions_started(server) == 8 + 1


def _hashers_under(sshd) -> list[int]:
    """PIDs of hashing services running below this sshd."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"multipush_hasher" in (entry / "cmdline").read_bytes():
                pid = int(entry.name)
                while pid > 1 and pid != sshd.process.pid:
                    pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if pid == sshd.process.pid:
                    found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def test_hashing_service_starts_once_per_connection_and_ends_with_it(sshd, tmp_path):
    """Every check of a push goes to the same Python process on the target: one start-up per
    connection, not per batch; closing the hasher ends that process."""
    data = os.urandom(3 * MIB + 11)
    (tmp_path / "f.bin").write_bytes(data)
    transport, _sftp = open_session(spec_for(sshd))
    try:
        hasher = TargetHasher(transport)
        hasher.warm()  # starts the service ahead of the first request

        def check(index):
            return hasher.digests([{"path": str(tmp_path / "f.bin"), "chunk_size": MIB, "chunk_indexes": [index]}],
                                  "crc32", False, 60)

        answers = [check(0)]
        channel = hasher.channel
        answers += [check(index) for index in range(1, 4)]
        assert hasher.channel is channel and not channel.exit_status_ready()  # the same service answered all
        for index, (entry,) in enumerate(answers):
            assert entry["chunk_checksums"][index] == f"{zlib.crc32(data[index * MIB:(index + 1) * MIB]):08x}"
        assert len(_hashers_under(sshd)) == 1
        hasher.close()
        # its session closed: the service ended with it
        wait_until(lambda: _hashers_under(sshd) == [], 10, what="the hashing service gone")
    finally:
        transport.close()


def test_hashing_service_that_cannot_start_says_why(sshd, tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x")
    transport, _sftp = open_session(spec_for(sshd))
    try:
        hasher = TargetHasher(transport, "/nonexistent/python3")
        hasher.warm()
        with pytest.raises(HasherUnavailable, match="exit status 127: multipush: no Python 3 among /nonexistent"):
            hasher.digests([{"path": str(tmp_path / "f.bin")}], "crc32", True, 60)
        assert hasher.channel is None  # the next request starts afresh
        hasher.interpreter = None  # say the target got its python3 meanwhile: not remembered as broken
        (entry,) = hasher.digests([{"path": str(tmp_path / "f.bin")}], "crc32", True, 60)
        assert entry["checksum"] == f"{zlib.crc32(b'x'):08x}"
    finally:
        transport.close()


def test_hashing_service_refused_a_channel_is_asked_once_and_says_why(tmp_path):
    """MaxSessions 1: the SFTP session holds the connection's only slot. Warming up then records the
    refusal (no new channel request per data job) and the first check reports it."""
    server = SshServer(workdir=tmp_path / "one-session", options={"MaxSessions": "1"})
    server.start()
    try:
        transport, _sftp = open_session(spec_for(server))
        try:
            hasher = TargetHasher(transport)
            hasher.warm()
            wait_until(lambda: hasher.refused, 10, what="the refusal recorded")
            assert hasher.channel is None and "refused another session" in hasher.refused
            asked = []
            real_open = transport.open_session
            transport.open_session = lambda *args, **kwargs: asked.append(1) or real_open(*args, **kwargs)
            hasher.warm()
            with pytest.raises(HasherUnavailable, match="refused another session"):
                hasher.digests([{"path": str(tmp_path)}], "crc32", True, 60)
            assert asked == []  # remembered: the server was not asked again
            assert transport.is_active()  # the connection itself is fine for SFTP
        finally:
            transport.close()
    finally:
        server.stop()


def test_remote_hashing_falls_back_to_the_module_when_the_target_has_no_python(sshd, tmp_path):
    source = random_file(tmp_path / "src.bin", 3 * MIB)
    warnings = []
    modules = []

    def module(requests, algorithm, whole=True):
        modules.append(len(requests))
        return local_verify(requests, algorithm, whole)

    result = Push(PushOptions(src=str(source), dest=str(tmp_path / "dst.bin"), connections=2, chunk_size="1M",
                              python_interpreter="/nonexistent/python3", whole_checksum=True),
                  spec_for(sshd), module, warnings.append).run()
    assert result["remote_hashing"]["via"] == "module" and modules
    assert any("no Python 3" in warning and "multipush.sftp.verify" in warning for warning in warnings), warnings
    (entry,) = result["files"]
    assert entry["checksum"] == crc32(source) and sha256(source) == sha256(tmp_path / "dst.bin")


def test_killed_connection_is_retried_and_only_its_range_travels_again(private_sshd, tmp_path):
    sshd = private_sshd
    size = 256 * MIB
    source = random_file(tmp_path / "src.bin", size)
    dest = tmp_path / "dst.bin"
    push = Push(PushOptions(src=str(source), dest=str(dest), connections=2, chunk_size="16M", verify="checksum",
                            retry_delay=0.1, request_size=32768, whole_checksum=True),
                spec_for(sshd), local_verify, print)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=push.run()))
    runner.start()
    deadline = time.monotonic() + 60
    killed = None
    while time.monotonic() < deadline and runner.is_alive():
        if push.progress.done_bytes >= 32 * MIB:
            sessions = sshd.session_pids()
            if sessions:
                # Every connection at once: both are mid-range, so at least one range is cut.
                for pid in sessions:
                    os.kill(pid, signal.SIGKILL)
                killed = sessions
                break
        time.sleep(0.005)
    runner.join(120)
    assert not runner.is_alive()
    assert killed is not None, "the transfer finished before a connection could be cut; make the file larger"
    result = outcome["result"]
    (entry,) = result["files"]
    assert entry["retries"] >= 1
    # What travels again is the unacknowledged part of each cut range: at most a range each.
    assert size <= entry["bytes_sent"] <= size + 2 * 16 * MIB
    print(f"re-sent after cutting {len(killed)} connections: {entry['bytes_sent'] - size} bytes")
    assert sha256(dest) == sha256(source) and entry["checksum"] == crc32(source)


def test_refused_authentication_is_not_retried(sshd, tmp_path):
    stranger = tmp_path / "stranger_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", str(stranger)], capture_output=True, text=True,
                                 check=True).stdout.split()[1]
    source = random_file(tmp_path / "src.bin", MIB)
    with pytest.raises(EngineError, match="authentication .* failed"):
        Push(PushOptions(src=str(source), dest=str(tmp_path / "dst.bin"), connections=4, retries=5, retry_delay=0.1),
             spec_for(sshd, private_key_file=str(stranger)), local_verify, print).run()
    assert not (tmp_path / "dst.bin").exists()
    # Each of the 4 connections offered the key at most once: no retry loop against a refusal
    # (with retries=5 that would be up to 24 attempts, and sshd 9.8+ penalizes such sources).
    attempts = sshd.log_file.read_text().count(fingerprint)
    assert 1 <= attempts <= 4


def _strict_sshd(tmp_path, name: str) -> SshServer:
    """sshd that drops every unauthenticated connection beyond 2 (MaxStartups 2:100:2)."""
    return SshServer(workdir=tmp_path / name, options={"MaxStartups": "2:100:2"})


def test_handshake_throttle_keeps_under_max_startups(tmp_path):
    source = random_file(tmp_path / "src.bin", 16 * MIB)
    with _strict_sshd(tmp_path, "throttled") as server:
        result = Push(PushOptions(src=str(source), dest=str(tmp_path / "a.bin"), connections=8, chunk_size="1M",
                                  max_concurrent_handshakes=2, verify="size", retry_delay=0.05, retries=10),
                      spec_for(server), None, print).run()
    # More connections than MaxStartups' 2 came up, and none was ever dropped. (Not necessarily all
    # 8: the last ones may still wait for their turn when the work is done.)
    assert result["connections"] > 2
    assert result["handshake_retries"] == 0


def test_unthrottled_handshakes_are_dropped_and_retried(tmp_path):
    source = random_file(tmp_path / "src.bin", 16 * MIB)
    with _strict_sshd(tmp_path, "unthrottled") as server:
        result = Push(PushOptions(src=str(source), dest=str(tmp_path / "b.bin"), connections=8, chunk_size="1M",
                                  max_concurrent_handshakes=8, verify="size", retry_delay=0.05, retries=10),
                      spec_for(server), None, print).run()
    # The same push without the throttle runs into sshd's MaxStartups and survives by retrying.
    assert result["handshake_retries"] > 0
    assert result["connections"] == 8
    assert sha256(tmp_path / "b.bin") == sha256(source)


def test_one_connection_per_worker_not_per_file_or_range(tmp_path):
    tree = tmp_path / "tree"
    for index in range(40):
        random_file(tree / f"d{index % 4}" / f"f{index}.cfg", 1000 + index, seed=index)
    random_file(tree / "big.img", 12 * MIB)
    with SshServer(workdir=tmp_path / "counting") as server:
        result = Push(PushOptions(src=f"{tree}/", dest=str(tmp_path / "out"), connections=3, chunk_size="1M",
                                  verify="size"), spec_for(server), None, print).run()
        accepted = server.log_file.read_text().count("Accepted publickey")
    assert result["files_sent"] == 41
    assert result["connections"] == 3
    assert accepted == 3


def test_interrupted_push_resumes_and_sends_only_the_missing_ranges(sshd, tmp_path):
    size = 96 * MIB
    source = random_file(tmp_path / "src.bin", size)
    dest = tmp_path / "dst.bin"
    options = dict(src=str(source), dest=str(dest), connections=2, chunk_size="4M", retry_delay=0.1)
    child = os.fork()
    if child == 0:  # the first run, killed like a controller would be: coordinator and workers at once
        os.setsid()
        try:
            Push(PushOptions(**options, verify="size", request_size=32768), spec_for(sshd), None, print).run()
        finally:
            os._exit(0)
    deadline = time.monotonic() + 60
    temps = []
    while time.monotonic() < deadline:
        temps = list(tmp_path.glob(".dst.bin.*.multipush.tmp"))
        if temps and temps[0].stat().st_blocks * 512 >= 24 * MIB:
            break
        time.sleep(0.01)
    os.killpg(child, signal.SIGKILL)
    os.waitpid(child, 0)
    assert temps, "the first run never wrote its temp file"
    assert not dest.exists()

    result = Push(PushOptions(**options, whole_checksum=True), spec_for(sshd), local_verify, print).run()
    (entry,) = result["files"]
    assert entry["status"] == "resumed"
    assert 0 < entry["bytes_sent"] <= size - 20 * MIB
    assert sha256(dest) == sha256(source) and entry["checksum"] == crc32(source)
    assert not list(tmp_path.glob(".dst.bin.*.multipush.tmp"))


def test_temps_of_other_versions_and_old_temps_are_removed(sshd, tmp_path):
    source = random_file(tmp_path / "src" / "a.bin", 2 * MIB)
    dest_dir = tmp_path / "dst"
    dest_dir.mkdir()
    other_version = dest_dir / ".a.bin.0123456789ab.multipush.tmp"
    other_version.write_bytes(b"old version")
    old_unrelated = dest_dir / ".gone.bin.ba9876543210.multipush.tmp"
    old_unrelated.write_bytes(b"left by a push long ago")
    fresh_unrelated = dest_dir / ".other.bin.ffffffffffff.multipush.tmp"
    fresh_unrelated.write_bytes(b"maybe being written now")
    an_hour_ago = time.time() - 3600
    for path in (other_version, old_unrelated):
        os.utime(path, (an_hour_ago, an_hour_ago))
    result = Push(PushOptions(src=str(source), dest=f"{dest_dir}/", temp_max_age=1800), spec_for(sshd),
                  local_verify, print).run()
    assert result["temps_removed"] == 2
    assert not other_version.exists() and not old_unrelated.exists()
    assert fresh_unrelated.exists()  # unrelated and recent: possibly another push at work
    assert sha256(dest_dir / "a.bin") == sha256(source)


@pytest.mark.parametrize("direct, sealed", [(True, True), (True, False), (False, False)],
                         ids=["sealed-in-batches", "one-packet-at-a-time", "channel-sendall"])
def test_writes_in_flight_wait_through_key_reexchanges(sshd, tmp_path, monkeypatch, direct, sealed):
    """Paramiko renews a connection's keys after 512 MiB, and sshd may ask for it at any time: writes
    in flight must wait for the new keys and arrive intact, whether the write pipeline seals AES-GCM
    packets itself, hands them one by one to the transport, or (the door to Paramiko's private API
    switched off: a Paramiko without what it uses, or MULTIPUSH_PARAMIKO_PUBLIC=1) goes through
    Channel.sendall. Here the keys change every 2 MiB."""
    paramiko = pytest.importorskip("paramiko")
    if direct and _paramiko_compat.WHY_PUBLIC:
        pytest.skip(f"the private paths are off: {'; '.join(_paramiko_compat.WHY_PUBLIC)}")
    monkeypatch.setattr(_paramiko_compat, "USE_PRIVATE", direct)
    monkeypatch.setattr(_wire, "SEAL_IN_BATCHES", sealed)
    kex_log = tmp_path / "kex.log"
    sealed_log = tmp_path / "sealed.log"
    writers_log = tmp_path / "writers.log"
    start_kex = paramiko.Transport._send_kex_init
    send_sealed = _wire._send_sealed
    write_range = RemoteFiles.write_range

    def counted_kex(transport):
        with open(kex_log, "a", encoding="utf-8") as log:  # the workers are forked: one line per process and kex
            log.write(f"{os.getpid()}\n")
        return start_kex(transport)

    def counted_sealing(*args):
        with open(sealed_log, "a", encoding="utf-8") as log:
            log.write(f"{os.getpid()}\n")
        return send_sealed(*args)

    def logged_writer(*args, **kwargs):
        with open(writers_log, "a", encoding="utf-8") as log:
            log.write(f"{os.getpid()}\n")
        return write_range(*args, **kwargs)

    monkeypatch.setattr(paramiko.Transport, "_send_kex_init", counted_kex)
    monkeypatch.setattr(_wire, "_send_sealed", counted_sealing)
    monkeypatch.setattr(RemoteFiles, "write_range", logged_writer)
    monkeypatch.setattr(paramiko.Packetizer, "REKEY_BYTES", 2 * MIB)
    source = random_file(tmp_path / "src.bin", 24 * MIB)
    result = Push(PushOptions(src=str(source), dest=str(tmp_path / "dst.bin"), connections=2, chunk_size="4M",
                              verify="checksum"), spec_for(sshd), local_verify, print).run()
    assert sha256(tmp_path / "dst.bin") == sha256(source)
    assert result["retries"] == 0, result  # no connection was lost over it
    assert result["cipher"] == "aes128-gcm@openssh.com"
    kexes = kex_log.read_text().split()
    # Two data connections and the hashing connection log in once each (3); the 24 MiB brought more.
    assert len(kexes) >= 3 + 4, len(kexes)
    sealings = sealed_log.read_text().split() if sealed_log.exists() else []
    writers = set(writers_log.read_text().split())
    assert 1 <= len(writers) <= 2, writers
    if sealed:
        # every connection that wrote ranges sealed its writes (which carried how many of the six
        # ranges depends on how soon the second one was up): 24 MiB in requests of <= 255 KiB, >= 96 batches
        assert set(sealings) == writers and len(sealings) >= 96, (sealings, writers)
    else:
        assert sealings == []


def test_the_loop_wakes_when_work_in_the_coordinators_threads_ends(sshd, tmp_path, monkeypatch):
    """Remote hashing ends in a thread of the coordinator, not in a worker: its end must wake the
    loop that judges the answer and finalizes the file at once, not when the loop next polls, which
    at the end of a push (no worker busy) was up to 0.2 s later. Here the poll waits 60 s."""
    monkeypatch.setattr(_engine, "EVENT_POLL_SECONDS", 60.0)
    asked = threading.Event()  # the loop has looked at the outside work once and found it running
    outside_done = threading.Event()
    returned = threading.Event()

    def outside_work_done() -> bool:
        done = outside_done.is_set()
        if not done:
            asked.set()
        return done

    with Engine(spec_for(sshd), 1, 1, 0, 0.1) as engine:
        engine.submit(Remove(path=str(tmp_path / "absent")), lambda job, result: None)
        # until the worker's last event (the write size it learned) is in: nothing else will come
        engine.run(idle=lambda: engine.stats["write_size"] is not None)

        def hashing_elsewhere():
            # once the loop is waiting (or about to) for its next event: a wake-up put before its
            # get is taken by that get all the same
            if asked.wait(30):
                outside_done.set()
                engine.wake()

        threading.Thread(target=hashing_elsewhere, daemon=True).start()
        looping = threading.Thread(target=lambda: (engine.run(idle=outside_work_done), returned.set()), daemon=True)
        looping.start()
        looping.join(30)  # half the poll: only the wake-up can end it by then
        assert returned.is_set(), "the loop did not wake when the outside work ended"


@pytest.mark.parametrize("pipelined", [True, False], ids=["init-sent-with-the-request", "invoke_subsystem"])
def test_sftp_starts_with_its_init_behind_the_subsystem_request(sshd, tmp_path, monkeypatch, pipelined):
    """SFTP's init goes out right behind the subsystem request (one round trip less per connection);
    with the door to Paramiko's private API switched off (_paramiko_compat.USE_PRIVATE),
    invoke_subsystem waits for the answer first. Either way the session works, and a server without
    SFTP is reported, not waited for."""
    if pipelined and _paramiko_compat.WHY_PUBLIC:
        pytest.skip(f"the private paths are off: {'; '.join(_paramiko_compat.WHY_PUBLIC)}")
    monkeypatch.setattr(_paramiko_compat, "USE_PRIVATE", pipelined)
    transport, sftp = open_session(spec_for(sshd))
    try:
        assert getattr(sftp.sock, "multipush_init_sent", False) is pipelined
        (tmp_path / "seen").write_bytes(b"x")
        assert sftp.stat(str(tmp_path / "seen")).st_size == 1
    finally:
        transport.close()
    with SshServer(workdir=tmp_path / "no-sftp", options={"Subsystem": None}) as bare:
        with pytest.raises(SessionError, match="sftp subsystem"):
            open_session(spec_for(bare))


def _is_open(sftp, handle: bytes) -> bool:
    """Whether the server still knows the handle: an fstat of a closed one is refused."""
    try:
        _paramiko_compat.request(sftp, _sftp.CMD_FSTAT, handle)
    except IOError:
        return False
    return True


@pytest.mark.parametrize("failure", [None, "source shrank", "refused writes"])
def test_a_range_closes_its_handle_in_the_pipeline_of_its_writes(sshd, tmp_path, monkeypatch, failure):
    """The close goes out behind the last write instead of waiting for its reply: no request of
    its own (one round trip less per range). The handle is closed however the range ends: after
    writes the server refused (the close was already in the pipeline) and after a failure on our
    side before the close went out."""
    source = random_file(tmp_path / "src.bin", 3 * MIB)
    dest = tmp_path / "dst.bin"
    transport, sftp = open_session(spec_for(sshd))
    try:
        remote = RemoteFiles(transport, sftp)
        if failure == "refused writes":  # a handle opened for reading only: every write is refused
            handle = _paramiko_compat.request(sftp, _sftp.CMD_OPEN, str(source), _sftp.SFTP_FLAG_READ,
                                              _sftp.SFTPAttributes())[1].get_binary()
        else:
            handle = remote.open_for_write(str(dest), truncate=True)
        assert _is_open(sftp, handle)
        waits = []
        real_request = sftp._request
        monkeypatch.setattr(sftp, "_request", lambda *args: waits.append(args[0]) or real_request(*args))
        with open(source, "rb") as local:
            end = 4 * MIB if failure == "source shrank" else 3 * MIB
            if failure is None:
                remote.write_range(handle, str(dest), local.fileno(), 0, end)
            else:
                with pytest.raises(_sftp.RemoteError, match="shrank" if failure == "source shrank" else "write"):
                    remote.write_range(handle, str(dest), local.fileno(), 0, end)
        if failure is None:
            assert waits == []  # the close rode in the writes' pipeline
        monkeypatch.undo()
        assert not _is_open(sftp, handle)
    finally:
        transport.close()
    if failure is None:
        assert dest.read_bytes() == source.read_bytes()
