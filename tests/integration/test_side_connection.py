"""The side connection against a real sshd: the jobs after a failed pool (temp removal, the created
directories' modes) run in the coordinator's own process, on a login of their own.

Why in-process: a worker forked from a coordinator whose other threads held a lock at that moment
(an import's, a Paramiko transport's) hung for good at its first log-in, and the failed push with it.
The fork-free rule is checked here directly: os.fork fails the test if anything calls it."""

from __future__ import annotations

import os

import pytest

from ansible_collections.multipush.sftp.plugins.plugin_utils._engine import EngineError
from ansible_collections.multipush.sftp.plugins.plugin_utils._jobs import Remove
from ansible_collections.multipush.sftp.plugins.plugin_utils._side_connection import SideConnection
from tests.support.relay import Relay
from tests.support.targets import spec_for, spec_via


@pytest.fixture
def no_fork(monkeypatch):
    def refuse():
        raise AssertionError("the side connection forked a process")

    monkeypatch.setattr(os, "fork", refuse)


def test_jobs_run_in_this_process_in_order_and_the_observer_hears_each(sshd, tmp_path, no_fork):
    temps = [tmp_path / f".image.bin.multipush-{number}" for number in range(3)]
    for temp in temps:
        temp.write_bytes(b"partial")
    heard, done = [], []
    with SideConnection(spec_for(sshd), retries=1, observer=lambda event, job, result: heard.append(event)) as side:
        for temp in temps:
            side.submit(Remove(path=str(temp)), lambda job, result: done.append(job.path))
        side.run()
    assert done == [str(temp) for temp in temps]
    assert heard == ["submit"] * 3 + ["done"] * 3
    assert not any(temp.exists() for temp in temps)


def test_a_dropped_connection_logs_in_again_and_the_job_goes_on(sshd, tmp_path, no_fork):
    relay = Relay(target=(sshd.host, sshd.port)).start()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(relay.known_hosts_line(sshd.known_hosts_line()))
    first, second = tmp_path / "first.tmp", tmp_path / "second.tmp"
    first.write_bytes(b"x")
    second.write_bytes(b"y")
    attempts = []
    try:
        with SideConnection(spec_via(sshd, relay, known_hosts), retries=2, retry_delay=0.1) as side:
            side.submit(Remove(path=str(first)), lambda job, result: attempts.append(job.attempt))
            side.run()
            assert relay.cut_all() == 1  # the login the first job used
            side.submit(Remove(path=str(second)), lambda job, result: attempts.append(job.attempt))
            side.run()
    finally:
        relay.stop()
    assert attempts == [0, 1]  # the second ran again on a new login
    assert relay.accepted == 2
    assert not first.exists() and not second.exists()


def test_a_refusal_is_an_engine_error_naming_the_path(sshd, tmp_path, no_fork):
    directory = tmp_path / "not-a-file"
    (directory / "inside").mkdir(parents=True)
    with pytest.raises(EngineError, match="not-a-file") as raised:
        with SideConnection(spec_for(sshd), retries=1) as side:
            side.submit(Remove(path=str(directory)), lambda job, result: None)
            side.run()
    assert not raised.value.keep_temps
    assert directory.is_dir()


def test_no_connection_is_an_engine_error_naming_the_host(sshd, tmp_path, no_fork):
    unused = spec_for(sshd, port=1, timeout=2.0)  # nothing listens on port 1 here
    with pytest.raises(EngineError, match="no connection to") as raised:
        with SideConnection(unused, retries=0) as side:
            side.submit(Remove(path=str(tmp_path / "x")), lambda job, result: None)
            side.run()
    assert raised.value.unreachable
