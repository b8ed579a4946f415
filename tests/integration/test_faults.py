"""Faults on the wire, on the controller and on the source, injected on loopback and bounded in time.

The fault-injecting relay (tests/support/relay.py) sits between the push and a private sshd: it
cuts connections after N bytes, refuses every k-th new connection as an overloaded MaxStartups does,
and stalls connections without closing them. Its byte counters measure what really went over the
wire, so the tests can say how much a fault cost. Where exact fault placement matters the push is
driven from Python (Push(...).run(), still real sshd, SFTP and forked workers); the controller kill,
the refusals and the concurrent pushes go through ansible-playbook.

Covered elsewhere: a full target disk (tests/integration/test_push.py::
test_failed_remote_write_fails_the_task_and_leaves_nothing_half_written), one killed sshd session
and a corrupted range (tests/integration/test_engine.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ansible_collections.multipush.sftp.plugins.plugin_utils import _engine
from ansible_collections.multipush.sftp.plugins.plugin_utils._engine import Engine, EngineError
from ansible_collections.multipush.sftp.plugins.plugin_utils._jobs import CreateTemps, WriteRange
from ansible_collections.multipush.sftp.plugins.plugin_utils._arguments import PushOptions
from ansible_collections.multipush.sftp.plugins.plugin_utils._push import Push
from ansible_collections.multipush.sftp.plugins.plugin_utils._session import open_session
from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp import MAX_OUTSTANDING_BYTES
from tests.support.faults import (
    PlayRunner, ansible_env, inventory_line, kill_group, processes_mentioning,
    stop_ssh_control_masters, temp_files,
)
from tests.support.files import MIB, random_file, crc32, sha256
from tests.support.relay import Relay
from tests.support.sshd import SshServer
from tests.support.targets import local_verify, spec_via
from tests.support.waiting import wait_until

FIGURES: dict = {}  # what the tests measured, printed at the end of the module (pytest -s shows it)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An sshd of this module alone: its session processes can be counted."""
    sshd = SshServer(workdir=tmp_path_factory.mktemp("faults-sshd"))
    sshd.start()
    yield sshd
    sshd.stop()


@pytest.fixture(scope="module", autouse=True)
def report_figures():
    yield
    if FIGURES:
        print("\nreliability figures:")
        for name, value in FIGURES.items():
            print(f"  {name}: {value}")


def relay_to(server: SshServer, tmp_path: Path, **settings) -> tuple[Relay, Path]:
    """A started relay in front of `server`, and a known_hosts file naming the relay's port."""
    relay = Relay(target=(server.host, server.port), **settings).start()
    known_hosts = tmp_path / f"known_hosts_{relay.port}"
    known_hosts.write_text(relay.known_hosts_line(server.known_hosts_line()))
    return relay, known_hosts


def runner_via(tmp_path: Path, server: SshServer, relay: Relay, known_hosts: Path, collections_root: Path,
               name: str = "plays") -> PlayRunner:
    line = inventory_line(server.host, relay.port, server.user, known_hosts, server.client_key)
    return PlayRunner(tmp_path / name, ansible_env(tmp_path, collections_root), line)


def present_bytes(temp: Path, source: Path, block: int = 64 * 1024) -> int:
    """How many bytes of the temp file already equal the source (compared in 64 KiB blocks)."""
    same = 0
    with open(temp, "rb") as remote, open(source, "rb") as local:
        while True:
            expected = local.read(block)
            if not expected:
                return same
            if remote.read(len(expected)) == expected:
                same += len(expected)


# --- connection cuts -------------------------------------------------------------------------------


def _push_through(server, relay, known_hosts, source, dest, **options) -> dict:
    settings = dict(src=str(source), dest=str(dest), connections=3, chunk_size="8M", retry_delay=0.05, retries=8)
    settings.update(options)
    return Push(PushOptions(**settings), spec_via(server, relay, known_hosts), local_verify, print).run()


@pytest.mark.slow
def test_a_dozen_connection_cuts_during_one_large_file_push(server, tmp_path):
    size = 256 * MIB + 4321
    chunk = 32 * MIB  # larger than the pipeline window, so a cut that restarted its range would show
    cut_after = 12 * MIB
    source = random_file(tmp_path / "big.img", size)
    # Checks through the in-process stand-in for the verify module: the push's own connection for
    # hashing would be one of the connections the relay counts and cuts.
    options = dict(connections=3, chunk_size=chunk, whole_checksum=True, hash_over_ssh=False)

    # The same push on a clean link first: what the wire carries without faults (data plus SSH/SFTP framing).
    relay, known_hosts = relay_to(server, tmp_path, rtt_ms=10)
    with relay:
        clean = _push_through(server, relay, known_hosts, source, tmp_path / "clean.img", **options)
        clean_up = relay.bytes_up
    assert clean["files"][0]["retries"] == 0
    (tmp_path / "clean.img").unlink()

    relay, known_hosts = relay_to(server, tmp_path, rtt_ms=10)
    cuts = 12
    with relay:
        relay.cut_next(cut_after, connections=cuts)  # each of the next 12 connections dies after 12 MiB
        result = _push_through(server, relay, known_hosts, source, tmp_path / "cut.img", **options)
        stats = relay.stats()
    (entry,) = result["files"]
    assert stats["cut"] == cuts
    assert sha256(tmp_path / "cut.img") == sha256(source) and entry["checksum"] == crc32(source)
    assert entry["status"] == "sent"
    assert result["connections"] == 3 + cuts  # every cut connection was replaced
    assert entry["retries"] >= cuts  # every cut put a job back on the queue
    assert temp_files(tmp_path) == []
    # What the cuts cost: the wire carried the clean run's bytes plus what was sent again. A cut loses at
    # most what was unacknowledged: the pipeline's window of writes in flight (plus one write request),
    # never the acknowledged start of its range.
    resent = stats["bytes_up"] - clean_up
    per_cut_bound = MAX_OUTSTANDING_BYTES + MIB
    FIGURES["cuts survived in one push"] = cuts
    FIGURES["bytes re-sent per cut (mean, wire)"] = (
        f"{resent / cuts / MIB:.2f} MiB after {cut_after // MIB} MiB on each cut connection "
        f"(bound {per_cut_bound / MIB:.0f} MiB)")
    assert 0 <= resent <= cuts * per_cut_bound, (resent / MIB, cuts)


# --- refused and dropped handshakes ----------------------------------------------------------------------


def test_refused_and_dropped_handshakes_are_retried_with_backoff(server, tmp_path, collections_root):
    source = random_file(tmp_path / "data.bin", 24 * MIB)
    relay, known_hosts = relay_to(server, tmp_path, rtt_ms=0)
    with relay:
        relay.faults.update(refuse_every=2)  # as sshd's MaxStartups does when overloaded
        relay.cut_next(400, connections=2)  # two more die in the middle of the key exchange
        outcome = runner_via(tmp_path, server, relay, known_hosts, collections_root).run(
            {"src": str(source), "dest": str(tmp_path / "out.bin"), "connections": 4, "chunk_size": "2M",
             "verify": "size", "retries": 6, "retry_delay": 0.05})
        stats = relay.stats()
    assert outcome.rc == 0, outcome
    result = outcome.result
    assert stats["refused"] >= 2 and stats["cut"] == 2, stats
    assert result["handshake_retries"] == stats["refused"] + stats["cut"], (result, stats)
    assert result["retries"] >= result["handshake_retries"]
    assert result["connections"] == 4
    assert sha256(tmp_path / "out.bin") == sha256(source)
    FIGURES["handshakes refused/dropped and retried"] = result["handshake_retries"]


def test_a_refused_hashing_connection_is_retried_and_counted(server, tmp_path):
    """The coordinator's connection for hashing goes through the same retries as the pool's, and
    its refused handshakes count in the result like theirs."""
    source = random_file(tmp_path / "data.bin", 8 * MIB)
    relay, known_hosts = relay_to(server, tmp_path, rtt_ms=0)
    with relay:
        # The one data connection (the survey needs it) is the first; the hashing connection opens
        # when the transfer starts, as the second, and is refused.
        relay.faults.update(refuse_every=2)
        result = Push(PushOptions(src=str(source), dest=str(tmp_path / "out.bin"), connections=1, chunk_size="2M",
                                  verify="checksum", retries=3, retry_delay=0.05),
                      spec_via(server, relay, known_hosts), local_verify, print).run()
        stats = relay.stats()
    assert stats["refused"] == 1 and stats["accepted"] == 2, stats
    assert result["remote_hashing"]["via"] == "ssh", result["remote_hashing"]
    assert result["connections"] == 1
    assert result["handshake_retries"] == 1
    assert sha256(tmp_path / "out.bin") == sha256(source)


def test_a_connection_lost_while_the_pool_waits_logs_in_again_at_once(server, tmp_path, monkeypatch):
    """On a re-run the first connection surveys alone: the others wait to start their SFTP sessions
    until the survey says something must be sent. When that connection drops, its next login must
    not wait for that word too (it would come from the survey the lost connection was carrying)."""
    monkeypatch.setattr(_engine, "SESSION_WAIT_SECONDS", 600)  # where a missing release would hang
    tree = tmp_path / "tree"
    for index in range(4):
        random_file(tree / f"f{index}.cfg", 1000 + index, seed=index)
    relay, known_hosts = relay_to(server, tmp_path, rtt_ms=0)
    with relay:
        spec = spec_via(server, relay, known_hosts)
        options = PushOptions(src=f"{tree}/", dest=str(tmp_path / "out"), connections=1, verify="size",
                              retries=3, retry_delay=0.05)
        assert Push(options, spec, None, print).run()["files_sent"] == 4
        # What one login up to its started session sends (the same bytes for every login with this
        # key and these algorithms); the re-run's connection is reset right after them.
        sent_before = relay.bytes_up
        transport, _sftp = open_session(spec)
        login_bytes = relay.bytes_up - sent_before
        transport.close()
        relay.cut_next(login_bytes + 1)
        outcome = {}
        rerun = threading.Thread(target=lambda: outcome.update(Push(options, spec, None, print).run()), daemon=True)
        rerun.start()
        rerun.join(120)
        stats = relay.stats()
    assert not rerun.is_alive(), "the re-run hung: its new login waited for the pool's turn"
    assert stats["cut"] == 1
    assert outcome["files_skipped"] == 4 and outcome["changed"] is False
    assert outcome["connections"] == 2  # the first, and the one that replaced it


# --- stalled connection ----------------------------------------------------------------------------------


def test_a_stalled_connection_is_detected_and_its_work_moves_on(server, tmp_path):
    source = random_file(tmp_path / "data.bin", 48 * MIB)
    relay, known_hosts = relay_to(server, tmp_path, rtt_ms=0)
    outcome = {}
    with relay:
        push = Push(PushOptions(src=str(source), dest=str(tmp_path / "out.bin"), connections=3, chunk_size="4M",
                                retry_delay=0.05, whole_checksum=True),
                    spec_via(server, relay, known_hosts, timeout=3), local_verify, print)
        runner = threading.Thread(target=lambda: outcome.update(result=push.run()), daemon=True)
        started = time.monotonic()
        runner.start()
        # One connection that is carrying data turns into a black hole: nothing passes, sockets stay open.
        busy = wait_until(lambda: [c for c in relay.connections() if c.up_bytes >= 2 * MIB], 60,
                          what="a connection carrying data")
        busy[0].stall()
        runner.join(120)
        took = time.monotonic() - started
        stats = relay.stats()
    assert not runner.is_alive(), "the push hung on the stalled connection"
    result = outcome["result"]
    (entry,) = result["files"]
    assert stats["stalled"] == 1
    assert entry["retries"] >= 1  # the stalled connection's range went back on the queue
    assert result["connections"] == 4  # ...and a new connection replaced the stalled one
    assert sha256(tmp_path / "out.bin") == sha256(source) and entry["checksum"] == crc32(source)
    FIGURES["stall detected and worked around in (s, timeout 3 s)"] = round(took, 1)


# --- controller killed, then resumed ---------------------------------------------------------------------


def _start_play(runner: PlayRunner, args: dict) -> subprocess.Popen:
    playbook, _result = runner.write(args)
    log = open(playbook.parent / "output.log", "w")  # noqa: SIM115 - closed by the child's end
    try:
        return subprocess.Popen(runner.command(playbook), env=runner.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        log.close()


def _kill_play(process: subprocess.Popen, runner: PlayRunner, everything: bool) -> None:
    """SIGKILL ansible-playbook's process group; with everything=True also every other process of the
    play (Ansible's task worker runs in a session of its own, and the push's workers are its children):
    frozen first, then killed, as a crash of the controller machine would end them."""
    if everything:
        pids = list(processes_mentioning(str(runner.workdir)))
        for signal_number in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, signal_number)
                except ProcessLookupError:
                    pass
    kill_group(process.pid)
    process.wait(30)


def _kill_during_push(server, tmp_path, collections_root, args: dict, wire_bytes: float, everything: bool,
                      rate_bytes_per_s: float) -> None:
    """Run the push of `args` through a capped relay and SIGKILL it once `wire_bytes` went up (with
    everything=True every process of the play, else ansible-playbook's process group); returns when no
    process, connection or sshd session of the play is left."""
    relay, known_hosts = relay_to(server, tmp_path, rtt_ms=2, rate_bytes_per_s=rate_bytes_per_s, max_inflight=MIB)
    control_dir = tmp_path / "cp"
    with relay:
        runner = runner_via(tmp_path, server, relay, known_hosts, collections_root, "first")
        process = _start_play(runner, args)
        try:
            wait_until(lambda: relay.bytes_up >= wire_bytes or process.poll() is not None, 120,
                       what=f"{wire_bytes / MIB:.0f} MiB on the wire")
            assert process.poll() is None, "the push finished before it could be killed; slow the relay down"
            _kill_play(process, runner, everything)
            # No process of the play lingers (the push's workers check their parent, the coordinator its own).
            wait_until(lambda: not processes_mentioning(str(runner.workdir)), 30, what="every process of the play gone")
            # Ansible's own ssh connection (opened early for the verify module, in a session of its own; it turns
            # into a ControlPersist master) may outlive the play by design: it is stopped here. Then every
            # connection of the play has ended, and so has every sshd session.
            survivors = processes_mentioning(str(control_dir))
            assert all(cmd.startswith(("ssh: ", "ssh -")) for cmd in survivors.values()), survivors
            wait_until(lambda: stop_ssh_control_masters(control_dir) == {} and relay.stats()["active"] == 0, 60,
                       interval=0.2, what="relay connections closed")
        finally:
            kill_group(process.pid)
            for pid in processes_mentioning(str(runner.workdir)):
                os.kill(pid, signal.SIGKILL)
            stop_ssh_control_masters(control_dir)
    wait_until(lambda: not server.session_pids(), 30, what="sshd sessions ended")


def _rerun(server, tmp_path, collections_root, args: dict):
    """The same push again, straight through (no cap), as the operator would run it after the kill."""
    relay, known_hosts = relay_to(server, tmp_path, rtt_ms=0)
    with relay:
        outcome = runner_via(tmp_path, server, relay, known_hosts, collections_root, "rerun").run(args)
    stop_ssh_control_masters(tmp_path / "cp")
    assert outcome.rc == 0, outcome
    return outcome


def _sigkill_then_rerun(server, tmp_path, collections_root, everything: bool) -> None:
    size = 256 * MIB
    connections = 4
    source = random_file(tmp_path / "src" / "disk.img", size, seed=7)
    dest = tmp_path / "remote" / "disk.img"
    old = random_file(dest, size, seed=8)  # the previous version, in place
    os.utime(old, (1_600_000_000, 1_600_000_000))
    old_digest = sha256(old)
    args = {"src": str(source), "dest": str(dest), "connections": connections, "chunk_size": "2M",
            "whole_checksum": True, "retry_delay": 0.05}

    _kill_during_push(server, tmp_path, collections_root, args, 0.9 * size, everything, rate_bytes_per_s=40e6)

    # Nothing under the final name is partial or a mix: the old version is untouched, the new one waits in its temp.
    assert sha256(dest) == old_digest
    temps = temp_files(dest.parent)
    assert len(temps) == 1, temps
    present = present_bytes(Path(temps[0]), source)
    missing = size - present
    if everything:
        assert 0 < present < size
    else:
        # ansible-playbook alone killed: the push stops when it notices (its workers at once), which on a
        # busy machine can come after the last bytes went out. What must hold is above: nothing was put in
        # place behind the user's back, and the data waits in the temp file for the resume.
        assert 0 < present <= size

    outcome = _rerun(server, tmp_path, collections_root, args)
    (entry,) = outcome.result["files"]
    assert entry["status"] == "resumed"
    assert sha256(dest) == sha256(source) and entry["checksum"] == crc32(source)
    assert temp_files(dest.parent) == []
    # The re-run sends the missing part, plus at most the part-written block of each range that was
    # in flight when the controller died (ranges are compared block by block).
    assert missing <= entry["bytes_sent"] <= missing + connections * MIB, (entry["bytes_sent"], missing)
    assert entry["bytes_sent"] < 0.15 * size
    FIGURES[f"resume after SIGKILL at 90% ({'whole controller' if everything else 'ansible-playbook'})"] = (
        f"re-run sent {entry['bytes_sent'] / size:.1%} of the file ({entry['bytes_sent'] / MIB:.1f} MiB; "
        f"{missing / MIB:.1f} MiB were missing, {(entry['bytes_sent'] - missing) / MIB:.1f} MiB sent again)")


@pytest.mark.slow
def test_sigkill_at_60_percent_with_defaults_resends_only_what_had_not_landed(server, tmp_path, collections_root):
    """The outside report: 120 MB over the default connections, every process of the play SIGKILLed at
    about 60%, re-run with defaults. Ranges are compared block by block, so the re-run sends what had
    not landed plus at most the part-written block of each connection's range."""
    size = 120 * 1000 * 1000
    source = random_file(tmp_path / "src" / "image.vmdk", size, seed=12)
    dest = tmp_path / "remote" / "image.vmdk"
    args = {"src": str(source), "dest": str(dest)}
    _kill_during_push(server, tmp_path, collections_root, args, 0.6 * size, everything=True, rate_bytes_per_s=30e6)
    (temp,) = temp_files(dest.parent)
    missing = size - present_bytes(Path(temp), source)
    assert not dest.exists() and 0 < missing < size

    outcome = _rerun(server, tmp_path, collections_root, args)
    (entry,) = outcome.result["files"]
    assert entry["status"] == "resumed" and sha256(dest) == sha256(source)
    assert temp_files(dest.parent) == []
    connections = outcome.result["connections"]
    # at most one part-written block per range (a range is written by one connection at a time)
    ranges = entry["ranges"]
    assert missing <= entry["bytes_sent"] <= missing + ranges * MIB, (entry["bytes_sent"], missing, ranges)
    FIGURES["resume after SIGKILL at 60%, default options"] = (
        f"{missing / 1e6:.1f} MB had not landed; the re-run sent {entry['bytes_sent'] / 1e6:.1f} MB over "
        f"{connections} connections ({(entry['bytes_sent'] - missing) / 1e6:.2f} MB that had landed)")


@pytest.mark.slow
def test_controller_killed_leaves_no_partial_file_and_the_rerun_resumes(server, tmp_path, collections_root):
    """Every process of the play SIGKILLed at once, as when the controller machine dies."""
    _sigkill_then_rerun(server, tmp_path, collections_root, everything=True)


@pytest.mark.slow
def test_sigkill_of_ansible_playbook_stops_the_push_and_the_rerun_resumes(server, tmp_path, collections_root):
    _sigkill_then_rerun(server, tmp_path, collections_root, everything=False)


def test_temp_of_another_source_version_is_not_resumed_and_removed_once_quiet(server, tmp_path, collections_root):
    source = random_file(tmp_path / "src" / "data.bin", 12 * MIB, seed=3)
    dest = tmp_path / "remote" / "data.bin"
    dest.parent.mkdir()
    args = {"src": str(source), "dest": str(dest), "connections": 2, "chunk_size": "1M", "whole_checksum": True}
    # A leftover of the previous source version, as an interrupted run leaves it: same size, its own token.
    stale = dest.parent / ".data.bin.0123456789ab.multipush.tmp"
    shutil.copyfile(source, stale)
    os.utime(stale, (time.time() - 600, time.time() - 600))  # nothing has written to it for ten minutes
    relay, known_hosts = relay_to(server, tmp_path, rtt_ms=0)
    with relay:
        outcome = runner_via(tmp_path, server, relay, known_hosts, collections_root).run(args)
    assert outcome.rc == 0, outcome
    (entry,) = outcome.result["files"]
    assert entry["status"] == "sent" and entry["bytes_sent"] == source.stat().st_size  # not resumed from it
    assert outcome.result["temps_removed"] == 1
    assert not stale.exists()
    assert sha256(dest) == sha256(source)


@pytest.mark.parametrize("source_changed", [False, True], ids=["same-version", "source-changed"])
def test_network_gone_then_rerun_resumes_only_the_same_source_version(server, tmp_path, collections_root,
                                                                      source_changed):
    size = 24 * MIB
    source = random_file(tmp_path / "src" / "data.bin", size, seed=4)
    dest = tmp_path / "remote" / "data.bin"
    args = {"src": str(source), "dest": str(dest), "connections": 2, "chunk_size": "1M", "retry_delay": 0.05,
            "whole_checksum": True}
    relay, known_hosts = relay_to(server, tmp_path, rtt_ms=0)
    with relay:
        runner = runner_via(tmp_path, server, relay, known_hosts, collections_root)
        relay.cut_next(4 * MIB, connections=None)  # the network goes away after 4 MiB on every connection
        failed = runner.run(dict(args, retries=0))
        relay.faults.clear()
        assert failed.rc == 2 and "gave up after 0 retries" in failed.msg, failed
        (leftover,) = temp_files(dest.parent)  # a network failure keeps the temp file for the next run
        assert not dest.exists()
        if source_changed:
            random_file(source, size, seed=5)  # new content, same size, new mtime: another version
            os.utime(source, (time.time() + 5, time.time() + 5))
        outcome = runner.run(args)
        assert outcome.rc == 0, outcome
        (entry,) = outcome.result["files"]
        assert sha256(dest) == sha256(source) and entry["checksum"] == crc32(source)
        if not source_changed:
            assert entry["status"] == "resumed"
            # at least the three whole 1 MiB ranges before the first cut (4 MiB on the wire) are kept
            assert entry["bytes_sent"] <= size - 3 * MIB, entry
            assert temp_files(dest.parent) == []
            return
        # Another version's temp is never resumed: the new version travels whole...
        assert entry["status"] == "sent" and entry["bytes_sent"] == size
        # ...and its leftover, written to moments ago (a concurrent push?), stays until it is quiet:
        assert temp_files(dest.parent) == [leftover]
        os.utime(leftover, (time.time() - 600, time.time() - 600))
        quiet = runner.run(args)
    assert quiet.rc == 0 and quiet.result["temps_removed"] == 1, quiet
    assert quiet.result["files"][0]["status"] == "skipped"
    assert temp_files(dest.parent) == []


def test_stale_temp_files_older_than_temp_max_age_are_removed(server, tmp_path, collections_root):
    source = random_file(tmp_path / "src" / "a.bin", 2 * MIB)
    dest_dir = tmp_path / "remote"
    dest_dir.mkdir()
    old = dest_dir / ".gone.bin.ba9876543210.multipush.tmp"
    old.write_bytes(b"left by a push long ago")
    recent = dest_dir / ".other.bin.ffffffffffff.multipush.tmp"
    recent.write_bytes(b"maybe being written now")
    not_ours = dest_dir / ".gone.bin.tmp"
    not_ours.write_bytes(b"someone else's temp file")
    for path in (old, not_ours):
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    relay, known_hosts = relay_to(server, tmp_path, rtt_ms=0)
    with relay:
        outcome = runner_via(tmp_path, server, relay, known_hosts, collections_root).run(
            {"src": str(source), "dest": f"{dest_dir}/", "temp_max_age": 3600})
    assert outcome.rc == 0, outcome
    assert outcome.result["temps_removed"] == 1
    assert not old.exists()
    assert recent.exists() and not_ours.exists()
    assert sha256(dest_dir / "a.bin") == sha256(source)


# --- the source changes during the push ------------------------------------------------------------------


def _rewrite_middle(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        handle.write(os.urandom(MIB))


def _truncate_to_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _append(path: Path) -> None:
    with open(path, "ab") as handle:
        handle.write(os.urandom(MIB))


def _rewrite_start(path: Path) -> None:
    with open(path, "r+b") as handle:  # a range that has most likely been sent already
        handle.write(os.urandom(MIB))


@pytest.mark.parametrize("change", [
    _rewrite_start, _rewrite_middle, _append,
    _truncate_to_half,
], ids=lambda change: change.__name__.strip("_"))
def test_source_changing_during_the_push_is_never_a_silent_mix(server, tmp_path, collections_root, change):
    size = 64 * MIB
    source = random_file(tmp_path / "src" / "live.img", size, seed=11)
    dest = tmp_path / "remote" / "live.img"
    old = random_file(dest, size, seed=12)
    os.utime(old, (1_600_000_000, 1_600_000_000))  # an older version: the quick check sends the new one
    old_digest = sha256(old)
    relay, known_hosts = relay_to(server, tmp_path, rtt_ms=2, rate_bytes_per_s=40e6, max_inflight=MIB)
    with relay:
        runner = runner_via(tmp_path, server, relay, known_hosts, collections_root)
        playbook, result_file = runner.write({"src": str(source), "dest": str(dest), "connections": 2,
                                             "chunk_size": "4M", "retry_delay": 0.05})
        process = subprocess.Popen(runner.command(playbook), env=runner.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            wait_until(lambda: relay.bytes_up >= 0.3 * size or process.poll() is not None, 120,
                       what="30% of the file on the wire")
            assert process.poll() is None, "the push finished before the source could be changed"
            change(source)
            output, _stderr = process.communicate(timeout=300)
        finally:
            kill_group(process.pid)
    final = sha256(dest)
    assert final in (old_digest, sha256(source)), "the file in place is a mix of versions"
    if process.returncode == 0:
        assert final == sha256(source), output  # re-sent: the new version, whole
    else:
        assert final == old_digest
        assert "changed while it was being pushed" in output or "shrank" in output, output
        assert str(source) in output, output[-4000:]
    assert temp_files(dest.parent) == [] or process.returncode != 0  # a failed run may keep its temp to resume


# --- concurrent pushes to the same destination -----------------------------------------------------------


def test_two_pushes_of_different_content_to_the_same_dest_at_once(server, tmp_path, collections_root):
    size = 48 * MIB
    sources = [random_file(tmp_path / f"src{n}" / "image.img", size, seed=20 + n) for n in (1, 2)]
    digests = {sha256(path) for path in sources}
    dest = tmp_path / "remote" / "image.img"
    # The link crawls (one push alone would need 12 s) until both pushes are writing, so that the one
    # whose Ansible started first cannot finish before the other begins, however loaded the machine is.
    relay, known_hosts = relay_to(server, tmp_path, rtt_ms=2, rate_bytes_per_s=4e6, max_inflight=MIB)
    with relay:
        processes = [_start_play(runner_via(tmp_path, server, relay, known_hosts, collections_root, f"push{n}"),
                                 {"src": str(source), "dest": str(dest), "connections": 2, "chunk_size": "4M"})
                     for n, source in enumerate(sources)]
        try:
            # both are on the wire at the same time: two temp files in the destination directory
            wait_until(lambda: len(temp_files(dest.parent)) == 2 or any(p.poll() is not None for p in processes),
                       120, what="both pushes writing")
            overlapped = len(temp_files(dest.parent)) == 2
            relay.link_up.set_rate(60e6)
            codes = [process.wait(300) for process in processes]
        finally:
            for process in processes:
                kill_group(process.pid)
    assert overlapped, "the pushes did not overlap; slow the relay down"
    assert codes == [0, 0], [Path(p.args[-1]).parent.joinpath("output.log").read_text()[-3000:] for p in processes]
    assert sha256(dest) in digests  # exactly one of them, never a mix
    assert temp_files(dest.parent) == []


def _bind_and_run(source_dir: Path, mountpoint: Path, command: list[str]) -> list[str]:
    """The command in its own mount namespace where source_dir is seen at mountpoint."""
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", str(source_dir),
            str(mountpoint), *command]


@pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root")
def test_two_controllers_pushing_different_content_under_the_same_path_size_and_mtime(server, tmp_path,
                                                                                      collections_root):
    """Two build machines push /build/out/image.img (same path, size and mtime, as reproducible builds
    make them) to the same target at once. Each push sees its own file at the same path: the final
    file must be exactly one of them, or a push must fail clearly; never a mix."""
    size = 48 * MIB
    mountpoint = tmp_path / "build" / "out"
    mountpoint.mkdir(parents=True)
    dirs = []
    for n in (1, 2):
        random_file(tmp_path / f"machine{n}" / "image.img", size, seed=30 + n)
        os.utime(tmp_path / f"machine{n}" / "image.img", ns=(1_700_000_000_000_000_000,) * 2)
        dirs.append(tmp_path / f"machine{n}")
    digests = {sha256(directory / "image.img"): directory.name for directory in dirs}
    dest = tmp_path / "remote" / "image.img"
    relay, known_hosts = relay_to(server, tmp_path, rtt_ms=2, rate_bytes_per_s=60e6, max_inflight=MIB)
    outputs = []
    with relay:
        processes = []
        for n, directory in enumerate(dirs):
            runner = runner_via(tmp_path, server, relay, known_hosts, collections_root, f"machine-play{n}")
            playbook, _result = runner.write({"src": str(mountpoint / "image.img"), "dest": str(dest),
                                              "connections": 2, "chunk_size": "4M", "retry_delay": 0.05})
            log = playbook.parent / "output.log"
            outputs.append(log)
            with open(log, "w") as handle:
                processes.append(subprocess.Popen(_bind_and_run(directory, mountpoint, runner.command(playbook)),
                                                  env=runner.env, stdout=handle, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, start_new_session=True))
            if n == 0:  # the second machine starts while the first one is writing
                wait_until(lambda: temp_files(dest.parent) or processes[0].poll() is not None, 120,
                           what="the first push writing")
        try:
            codes = [process.wait(300) for process in processes]
        finally:
            for process in processes:
                kill_group(process.pid)
    texts = [log.read_text() for log in outputs]
    assert 0 in codes, texts
    assert dest.exists()
    assert sha256(dest) in digests, f"the file in place is a mix of both machines' images: {codes}\n{texts}"
    for code, text in zip(codes, texts):
        if code != 0:
            assert "another push is writing" in text, text


def test_a_stopped_worker_dies_even_under_ansibles_inherited_sigterm_handler(server, tmp_path):
    """Ansible's task worker (the push's coordinator) installs a SIGTERM handler; forked workers
    inherit it, and in them it raises TypeError instead of exiting. A worker stopped mid-job
    (terminate(), or its parent's death) must die, not report that error from inside its job: the
    push would then fail as if the target had refused and remove the temp file a resume needs."""
    def ansible_like_term(signum, frame):  # ansible's WorkerProcess._term, as it runs in a grandchild
        signal.signal(signum, signal.SIG_DFL)
        os.killpg(None, signum)  # its Process object has no pid there: TypeError

    source = random_file(tmp_path / "src.bin", 32 * MIB)
    temp = tmp_path / "remote" / ".dst.bin.x.multipush.tmp"
    temp.parent.mkdir()
    relay, known_hosts = relay_to(server, tmp_path, rtt_ms=2, rate_bytes_per_s=4e6, max_inflight=MIB)
    previous = signal.signal(signal.SIGTERM, ansible_like_term)
    try:
        with relay, Engine(spec_via(server, relay, known_hosts), 1, 1, retries=0) as engine:
            engine.submit(CreateTemps(files=({"temp": str(temp), "size": 32 * MIB},)), lambda job, result: None)
            engine.run()
            engine.submit(WriteRange(local=str(source), temp=str(temp), dest=str(temp), start=0, end=32 * MIB,
                                     index=0, algorithm="crc32", size=32 * MIB),
                          lambda job, result: None)
            start = relay.bytes_up

            def stop_worker_mid_range():
                wait_until(lambda: relay.bytes_up - start > 2 * MIB, 30, what="the range under way")
                engine.processes[0].terminate()

            stopper = threading.Thread(target=stop_worker_mid_range)
            stopper.start()
            with pytest.raises(EngineError) as failure:
                engine.run()
            stopper.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "TypeError" not in str(failure.value), failure.value
    assert failure.value.keep_temps, failure.value  # a lost connection: the temp stays for a resume
    assert engine.exitcodes[0] == -signal.SIGTERM
