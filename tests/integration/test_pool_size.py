"""The pool's size against a real sshd: sized by the work to send, grown by measuring with
`connections: auto` (the rule itself is unit-tested with a made-up clock in test_pool_growth.py),
and the engine's admitting and retiring of workers that the growth relies on."""

from __future__ import annotations

from pathlib import Path

import pytest

from ansible_collections.multipush.sftp.plugins.plugin_utils._arguments import PushOptions
from ansible_collections.multipush.sftp.plugins.plugin_utils._engine import Engine
from ansible_collections.multipush.sftp.plugins.plugin_utils._jobs import Lstat
from ansible_collections.multipush.sftp.plugins.plugin_utils._push import Push
from tests.support.files import MIB, random_file, sha256
from tests.support.playenv import push_task
from tests.support.relay import Relay
from tests.support.targets import spec_for, spec_via
from tests.support.waiting import wait_until


@pytest.fixture
def synced_tree(tmp_path) -> Path:
    root = tmp_path / "tree"
    random_file(root / "disk.img", 40 * MIB, seed=7)
    for number in range(20):
        (root / "conf" / f"{number:02}.cfg").parent.mkdir(parents=True, exist_ok=True)
        (root / "conf" / f"{number:02}.cfg").write_text(f"value {number}\n")
    return root


@pytest.mark.parametrize("connections", [None, 8], ids=["auto", "fixed-8"])
def test_one_changed_small_file_in_a_synced_tree_opens_one_connection(run_play, synced_tree, tmp_path, connections):
    dest = tmp_path / "dest"
    options = {} if connections is None else {"connections": connections}
    first = run_play(push_task(f"{synced_tree}/", dest, **options))["pushed"]
    assert first["files_sent"] == 21 and first["connections"] >= 2, first

    unchanged = run_play(push_task(f"{synced_tree}/", dest, **options))["pushed"]
    assert (unchanged["files_sent"], unchanged["connections"]) == (0, 1), unchanged
    assert unchanged["connections_reason"] == "nothing to send"

    (synced_tree / "conf" / "07.cfg").write_text("changed")  # 7 bytes
    changed = run_play(push_task(f"{synced_tree}/", dest, **options))["pushed"]
    assert (changed["files_sent"], changed["connections"]) == (1, 1), changed
    expected = ("auto: 1 job of 0 KiB to send: one connection is done sooner than another logs in"
                if connections is None else "fixed by connections=8; 1 job to send")
    assert changed["connections_reason"].startswith(expected), changed["connections_reason"]
    for path in synced_tree.rglob("*"):  # (the directories keep the mtimes the target gave them)
        if path.is_file():
            assert sha256(dest / path.relative_to(synced_tree)) == sha256(path)


def test_a_long_path_logs_in_several_connections_during_the_survey_and_reports_the_round_trip(sshd, tmp_path):
    source = random_file(tmp_path / "image.bin", 64 * MIB, seed=3)  # four 16 MiB ranges
    # 150 ms: the login's round trips then outweigh what a loaded machine adds to it (a session start,
    # a login shell), so the four ranges (32 round trips of data on one stream) pay for a second login
    # however busy the machine is; at 30 ms a loaded CI run's login once cost more than the work
    relay = Relay(target=(sshd.host, sshd.port), rtt_ms=150).start()
    try:
        known_hosts = tmp_path / "known_hosts_relay"
        known_hosts.write_text(relay.known_hosts_line(sshd.known_hosts_line()))
        result = Push(PushOptions(src=str(source), dest=str(tmp_path / "copy.bin")),
                      spec_via(sshd, relay, known_hosts), None, print).run()
    finally:
        relay.stop()
    assert result["round_trip_ms"] >= 150, result
    # A long path starts wide, but never wider than the work there is (four ranges), nor than it pays
    # logins for: 32 round trips of data on one stream against a login of several round trips and
    # a session start, as long as this machine's load makes it.
    count, reason = result["connections"], result["connections_reason"]
    assert 2 <= count <= 4, result
    expected = "auto: 4 jobs to send" if count == 4 else f"auto: {count}: the work to send pays for no more logins of "
    assert reason.startswith(expected) and "; round trip " in reason, reason
    assert sha256(tmp_path / "copy.bin") == sha256(source)


def test_a_short_path_starts_small_and_says_why(sshd, tmp_path):
    source = random_file(tmp_path / "image.bin", 160 * MIB, seed=4)  # ten 16 MiB ranges
    result = Push(PushOptions(src=str(source), dest=str(tmp_path / "copy.bin")), spec_for(sshd), None, print).run()
    assert result["round_trip_ms"] is not None and result["round_trip_ms"] > 0
    assert 2 <= result["connections"] <= 10, result  # never more than the ranges
    assert result["connections_reason"].startswith("auto: "), result
    assert sha256(tmp_path / "copy.bin") == sha256(source)


def test_retired_workers_log_out_finish_their_jobs_and_can_be_admitted_again(sshd, tmp_path):
    spec = spec_for(sshd)
    with Engine(spec, 3, 3, retries=1) as engine:
        def lstat_round() -> int:
            done = []
            for _round in range(6):
                engine.submit(Lstat(path=str(tmp_path)), lambda job, result: done.append(result))
            engine.run()
            assert len(done) == 6 and all(result["entry"] for result in done)
            return engine.serving

        assert wait_until(lambda: lstat_round() == 3, 20, what="all three connections up")
        engine.admit(1)
        # Retired at once in the pool's count; logged out once each has noticed (it may be waiting
        # for a job). One admitted again before it noticed would keep its login, which is fine but
        # is not what this test is about.
        assert wait_until(lambda: lstat_round() == 1 and len(engine.ready) == 1, 20,
                          what="two connections retired and logged out")
        engine.admit(2)
        assert wait_until(lambda: lstat_round() == 2, 20, what="one connection back")
        assert engine.stats["connections_opened"] == 4  # three, then the one admitted again logged in anew
