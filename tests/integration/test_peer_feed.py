"""A host feeding another (fleet fan-out) with real servers: two sshd on their own loopback
addresses, one the source (the sender runs there through our Paramiko session, with the agent
forwarded), one the receiver (the sender's own ssh clients write to it). Both are this machine,
so the source sshd is given a TMPDIR of the test's: what the sender leaves behind is found there.
The controller's temporary agent lives under tempfile's directory, pointed at the test's too.

Rates are not timed here (the benchmark measures them); the sender's byte accounting is checked.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ansible_collections.multipush.sftp.plugins.module_utils import _peer_sender
from ansible_collections.multipush.sftp.plugins.plugin_utils._peer_feed import (
    FeedFailure, PeerFile, PeerReceiver, TemporaryAgent, _request_line, feed_from_peer,
)
from tests.support.files import MIB, random_file, sha256
from tests.support.sshd import SshServer, free_port, generate_key
from tests.support.targets import spec_for
from tests.support.waiting import wait_until


@dataclass
class Fleet:
    source: SshServer
    receiver: SshServer
    source_tmp: Path  # the sender's TMPDIR on the source
    data: Path  # the source's verified copies
    big: Path
    smalls: list

    def peer(self, **overrides) -> PeerReceiver:
        values = dict(host=self.receiver.host, port=self.receiver.port, user=self.receiver.user,
                      known_hosts_lines=(self.receiver.known_hosts_line().strip(),))
        values.update(overrides)
        return PeerReceiver(**values)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Fleet:
    base = tmp_path_factory.mktemp("peer-fleet")
    source_tmp = base / "source-tmp"
    source_tmp.mkdir()
    source = SshServer(workdir=base / "source", host="127.0.0.2", options={"SetEnv": f"TMPDIR={source_tmp}"})
    receiver = SshServer(workdir=base / "receiver", host="127.0.0.3")
    data = base / "data"
    big = random_file(data / "image.bin", 40 * MIB, seed=11)
    smalls = [random_file(data / "one.bin", 1, seed=1), random_file(data / "small.cfg", 100 * 1024, seed=2),
              random_file(data / "medium.bin", 300 * 1024, seed=3)]
    (data / "empty").write_bytes(b"")
    source.start()
    try:
        receiver.start()
    except BaseException:
        source.stop()
        raise
    yield Fleet(source, receiver, source_tmp, data, big, smalls)
    receiver.stop()
    source.stop()


@pytest.fixture
def controller_tmp(monkeypatch) -> Path:
    """tempfile's directory on the controller for this test: the temporary agent's goes there (a
    short path: an agent socket's path must fit in about 100 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="mp-peer-ctl-"))
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def whole(path: Path, temp: Path, range_size: int = 0) -> PeerFile:
    size = path.stat().st_size
    step = range_size or max(size, 1)
    ranges = tuple((offset, min(step, size - offset)) for offset in range(0, size, step))
    return PeerFile(source_path=str(path), temp=str(temp), size=size, ranges=ranges)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that mention `text` (ssh clients name their known_hosts)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
            if text in command:
                found.append(command)
    return found


def descendants(pids: list[int]) -> list[int]:
    """`pids` and every process below them."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(pids), list(pids)
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier.extend(children)
    return sorted(found)


def nothing_left(fleet: Fleet, controller_tmp: Path) -> bool:
    return (not list(fleet.source_tmp.iterdir()) and not list(controller_tmp.iterdir())
            and not processes_mentioning(str(fleet.source_tmp)) and not processes_mentioning(str(controller_tmp)))


def feed(fleet: Fleet, files: list, receiver: PeerReceiver | None = None, **options) -> frozenset:
    values = dict(connections=4, agent_keys=[str(fleet.receiver.client_key)], bandwidth_limit=None, timeout=10.0)
    values.update(options)
    return feed_from_peer(spec_for(fleet.source), receiver or fleet.peer(), files, **values)


def test_a_peer_writes_ranges_small_and_empty_files_byte_identical_and_leaves_nothing(
        fleet, tmp_path, controller_tmp):
    out = tmp_path / "receiver-side"
    out.mkdir()
    files = [whole(fleet.big, out / ".image.bin.tmp", 8 * MIB)]
    files += [whole(path, out / f".{path.name}.tmp") for path in fleet.smalls]
    files.append(PeerFile(source_path=str(fleet.data / "empty"), temp=str(out / ".empty.tmp"), size=0, ranges=()))
    (out / ".small.cfg.tmp").write_bytes(b"left over by an earlier try, longer than the file" * 10000)
    (out / ".empty.tmp").write_bytes(b"not empty")
    acknowledged = []

    written = feed(fleet, files, on_bytes=acknowledged.append)

    assert written == frozenset(item.temp for item in files)
    assert len(files[0].ranges) == 5
    for item in files:
        assert sha256(Path(item.temp)) == sha256(Path(item.source_path)), item.temp
        assert (Path(item.temp).stat().st_mode & 0o777) == 0o600
    assert sum(acknowledged) == sum(item.size for item in files)
    wait_until(lambda: nothing_left(fleet, controller_tmp), timeout=10, what="no temp dir, agent or ssh client left")


class GrowingCopy:
    """A source copy still arriving at its host (a streaming feed's source): `original` is written into
    `path` a span at a time, and each span is offered only once it is written."""

    def __init__(self, original: Path, path: Path, step: int, pause: float, stop_after: int | None = None):
        self.original, self.path, self.step, self.pause = original, path, step, pause
        self.size = original.stat().st_size
        self.stop_after = stop_after  # spans written before the source "fails"
        self.spans: list = []
        self.lock = threading.Lock()
        self.last_offer = 0.0
        with open(path, "wb") as stream:
            stream.truncate(self.size)  # allocated at full size as the push does: zeros until written
        self.writer = threading.Thread(target=self._write, daemon=True)

    def _write(self) -> None:
        with open(self.original, "rb") as source, open(self.path, "r+b") as copy:
            # the last span first, then the rest in order: spans arrive out of order, as ranges do
            starts = list(range(0, self.size, self.step))
            for start in starts[-1:] + starts[:-1]:
                if self.stop_after is not None and len(self.spans) >= self.stop_after:
                    return
                source.seek(start)
                copy.seek(start)
                copy.write(source.read(self.step))
                copy.flush()
                with self.lock:
                    self.spans.append((str(self.path), start, min(start + self.step, self.size)))
                time.sleep(self.pause)

    def __call__(self):
        with self.lock:
            spans, complete = list(self.spans), len(self.spans) * self.step >= self.size
            self.last_offer = time.monotonic()
        if self.stop_after is not None and len(spans) >= self.stop_after:
            raise FeedFailure("source", "the source stopped receiving the tree it was passing on")
        return spans, complete


def test_a_streaming_feed_passes_on_a_copy_as_it_arrives_and_only_what_has(fleet, tmp_path, controller_tmp):
    """The source still receives its copy (written here a span at a time, the rest zeros): every
    byte the receiver gets was offered first, so the result is the original, not zeros."""
    out = tmp_path / "receiver-side"
    out.mkdir()
    growing = GrowingCopy(fleet.big, fleet.data / "arriving.bin", step=4 * MIB, pause=0.15)
    files = [PeerFile(source_path=str(growing.path), temp=str(out / ".image.bin.tmp"), size=growing.size,
                      ranges=tuple((offset, min(8 * MIB, growing.size - offset))
                                   for offset in range(0, growing.size, 8 * MIB)))]
    spans = []
    growing.writer.start()
    written = feed(fleet, files, availability=growing, on_spans=spans.extend)
    growing.writer.join(30)
    assert written == {files[0].temp}
    assert sha256(Path(files[0].temp)) == sha256(fleet.big)
    assert sorted(end - start for _temp, start, end in spans) == [8 * MIB] * 5  # the receiver's ranges, acknowledged
    wait_until(lambda: nothing_left(fleet, controller_tmp), timeout=10, what="no temp dir, agent or ssh client left")


def test_a_streaming_feed_whose_source_stops_receiving_ends_naming_it(fleet, tmp_path, controller_tmp):
    out = tmp_path / "receiver-side"
    out.mkdir()
    growing = GrowingCopy(fleet.big, fleet.data / "stalled.bin", step=4 * MIB, pause=0.05, stop_after=3)
    files = [whole(fleet.big, out / ".image.bin.tmp", 8 * MIB)]
    files = [PeerFile(source_path=str(growing.path), temp=files[0].temp, size=files[0].size, ranges=files[0].ranges)]
    growing.writer.start()
    started = time.monotonic()
    with pytest.raises(FeedFailure) as caught:
        feed(fleet, files, availability=growing)
    assert caught.value.kind == "source" and "stopped receiving" in str(caught.value)
    assert time.monotonic() - started < 30
    wait_until(lambda: nothing_left(fleet, controller_tmp), timeout=10, what="the sender and its ssh clients gone")


def test_the_user_agent_is_forwarded_when_no_key_is_named(fleet, tmp_path, controller_tmp, monkeypatch):
    agent_dir = tmp_path / "user-agent"
    agent_dir.mkdir()
    socket_path = agent_dir / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        wait_until(socket_path.exists, timeout=10, what="the user's agent")
        subprocess.run(["ssh-add", "-q", str(fleet.receiver.client_key)], env={**os.environ, "SSH_AUTH_SOCK": str(
            socket_path)}, check=True, timeout=30, stdin=subprocess.DEVNULL, capture_output=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket_path))
        out = tmp_path / "receiver-side"
        out.mkdir()
        files = [whole(path, out / f".{path.name}.tmp") for path in fleet.smalls]
        assert feed(fleet, files, agent_keys=[]) == frozenset(item.temp for item in files)
    finally:
        agent.terminate()
        agent.wait(timeout=10)
    for item in files:
        assert sha256(Path(item.temp)) == sha256(Path(item.source_path))
    wait_until(lambda: nothing_left(fleet, controller_tmp), timeout=10, what="nothing left")


def test_with_a_bandwidth_limit_every_byte_is_written_and_counted(fleet, tmp_path, controller_tmp):
    out = tmp_path / "receiver-side"
    out.mkdir()
    source = random_file(tmp_path / "limited.bin", 6 * MIB, seed=5)
    files = [whole(source, out / ".limited.tmp", 2 * MIB)]
    acknowledged = []
    assert feed(fleet, files, bandwidth_limit=20e6, on_bytes=acknowledged.append) == {files[0].temp}
    assert sum(acknowledged) == 6 * MIB
    assert sha256(Path(files[0].temp)) == sha256(source)


def test_a_host_key_other_than_the_verified_one_is_the_receivers_fault_and_nothing_is_written(
        fleet, tmp_path, controller_tmp):
    out = tmp_path / "receiver-side"
    out.mkdir()
    impostor_key = fleet.source.known_hosts_line().split()[1:]  # another server's key under the receiver's name
    name = fleet.receiver.known_hosts_line().split()[0]
    files = [whole(fleet.smalls[1], out / ".small.cfg.tmp")]
    with pytest.raises(FeedFailure) as caught:
        feed(fleet, files, receiver=fleet.peer(known_hosts_lines=(" ".join([name, *impostor_key]),)))
    assert caught.value.kind == "receiver", caught.value
    assert caught.value.written == frozenset()
    assert "Host key verification failed" in str(caught.value) or "HOST IDENTIFICATION" in str(caught.value)
    assert f"{fleet.receiver.host}:{fleet.receiver.port}" in str(caught.value)
    assert not list(out.iterdir())
    wait_until(lambda: nothing_left(fleet, controller_tmp), timeout=10, what="nothing left")


def test_a_temp_the_receiver_cannot_create_stops_the_feed_with_the_receivers_words(fleet, tmp_path, controller_tmp):
    files = [whole(fleet.smalls[0], tmp_path / ".one.tmp"), whole(fleet.smalls[1], tmp_path / "no-such-dir" / ".x.tmp")]
    with pytest.raises(FeedFailure) as caught:
        feed(fleet, files, connections=1)
    assert caught.value.kind == "interrupted", caught.value
    assert "cannot open" in str(caught.value) and "no-such-dir" in str(caught.value)
    assert "No such file" in str(caught.value)
    assert caught.value.written <= {files[0].temp}
    wait_until(lambda: nothing_left(fleet, controller_tmp), timeout=10, what="nothing left")


def test_a_closed_port_is_the_receivers_fault(fleet, tmp_path, controller_tmp):
    closed = free_port(fleet.receiver.host)
    line = fleet.receiver.known_hosts_line().split()
    receiver = fleet.peer(port=closed, known_hosts_lines=(" ".join([f"[{fleet.receiver.host}]:{closed}", *line[1:]]),))
    with pytest.raises(FeedFailure) as caught:
        feed(fleet, [whole(fleet.smalls[0], tmp_path / ".one.tmp")], receiver=receiver)
    assert caught.value.kind == "receiver", caught.value
    assert "refused" in str(caught.value).lower()
    assert caught.value.written == frozenset()


def test_a_key_the_receiver_does_not_accept_is_the_receivers_fault(fleet, tmp_path, controller_tmp):
    with pytest.raises(FeedFailure) as caught:
        feed(fleet, [whole(fleet.smalls[0], tmp_path / ".one.tmp")], agent_keys=[str(fleet.source.client_key)])
    assert caught.value.kind == "receiver", caught.value
    assert "Permission denied" in str(caught.value)
    wait_until(lambda: nothing_left(fleet, controller_tmp), timeout=10, what="nothing left")


def test_a_key_with_a_passphrase_is_added_with_it_and_named_without_it(fleet, tmp_path, controller_tmp):
    key = generate_key(tmp_path / "id_locked", passphrase="correct horse")
    with open(fleet.receiver.authorized_keys, "a", encoding="utf-8") as authorized:
        authorized.write(key.with_suffix(".pub").read_text())
    files = [whole(fleet.smalls[0], tmp_path / ".one.tmp")]
    with pytest.raises(FeedFailure) as caught:
        feed(fleet, files, agent_keys=[str(key)])
    assert caught.value.kind == "receiver" and str(key) in str(caught.value)
    with pytest.raises(FeedFailure) as caught:
        feed(fleet, files, agent_keys=[str(key)], key_passphrase="wrong horse")
    assert "wrong horse" not in str(caught.value)
    assert feed(fleet, files, agent_keys=[str(key)], key_passphrase="correct horse") == {files[0].temp}
    wait_until(lambda: nothing_left(fleet, controller_tmp), timeout=10, what="nothing left")


def test_no_agent_and_no_key_file_fails_before_connecting(fleet, tmp_path, controller_tmp, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with pytest.raises(FeedFailure) as caught:
        feed(fleet, [whole(fleet.smalls[0], tmp_path / ".one.tmp")], agent_keys=[])
    assert caught.value.kind == "receiver"
    assert "key file" in str(caught.value) and "passwords are never sent" in str(caught.value)


def test_a_source_without_python_is_the_sources_fault(fleet, tmp_path, controller_tmp):
    with pytest.raises(FeedFailure) as caught:
        feed(fleet, [whole(fleet.smalls[0], tmp_path / ".one.tmp")], python_interpreter="/nonexistent/python3")
    assert caught.value.kind == "source", caught.value
    assert "no Python" in str(caught.value)


def test_a_source_copy_that_is_gone_is_the_sources_fault(fleet, tmp_path, controller_tmp):
    files = [PeerFile(source_path=str(tmp_path / "gone"), temp=str(tmp_path / ".gone.tmp"), size=5, ranges=((0, 5),))]
    with pytest.raises(FeedFailure) as caught:
        feed(fleet, files)
    assert caught.value.kind == "source" and "cannot read the source copy" in str(caught.value)
    assert not (tmp_path / ".gone.tmp").exists()


def test_a_source_without_an_ssh_client_is_the_sources_fault(tmp_path, fleet, controller_tmp):
    lonely = SshServer(workdir=tmp_path / "no-ssh", host="127.0.0.4", options={"SetEnv": "PATH=/nonexistent"})
    lonely.start()
    try:
        with pytest.raises(FeedFailure) as caught:
            feed_from_peer(spec_for(lonely), fleet.peer(), [whole(fleet.smalls[0], tmp_path / ".one.tmp")],
                           connections=2, agent_keys=[str(fleet.receiver.client_key)], bandwidth_limit=None,
                           timeout=10.0)
    finally:
        lonely.stop()
    assert caught.value.kind == "source", caught.value
    assert "no OpenSSH client" in str(caught.value)


@pytest.mark.parametrize("how", ["cancel", "source session killed"])
def test_a_feed_stopped_midway_reports_what_it_completed_and_its_clients_end(fleet, tmp_path, controller_tmp, how):
    out = tmp_path / "receiver-side"
    out.mkdir()
    files = [whole(path, out / f".{path.name}.tmp") for path in fleet.smalls]
    files.append(whole(fleet.big, out / ".image.bin.tmp", 8 * MIB))
    cancel = threading.Event()
    acknowledged = []

    killed = []

    def progress(nbytes: int) -> None:
        acknowledged.append(nbytes)
        if sum(acknowledged) > MIB and not cancel.is_set():
            cancel.set()
            if how != "cancel":
                for pid in fleet.source.session_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

    with pytest.raises(FeedFailure) as caught:
        # 8 MB/s: the 40 MiB image takes seconds, stopped after its first MiB
        feed(fleet, files, bandwidth_limit=8e6, on_bytes=progress, cancel=cancel if how == "cancel" else None)
    expected = "interrupted" if how == "cancel" else "source"
    assert caught.value.kind == expected, caught.value
    assert caught.value.written < frozenset(item.temp for item in files)
    assert files[-1].temp not in caught.value.written
    for temp in caught.value.written:
        source = next(item.source_path for item in files if item.temp == temp)
        assert sha256(Path(temp)) == sha256(Path(source))
    wait_until(lambda: nothing_left(fleet, controller_tmp), timeout=20,
               what="the sender's ssh clients ended and its temp dir removed")
    remove_forwarded_agent_sockets(killed)


def remove_forwarded_agent_sockets(pids: list) -> None:
    """A SIGKILLed sshd session cannot remove the directory it made for the forwarded agent's socket
    (/tmp/ssh-*/agent.<its pid>): the test that killed it does, so the machine keeps no litter."""
    for pid in pids:
        for socket_path in Path("/tmp").glob(f"ssh-*/agent.{pid}"):
            shutil.rmtree(socket_path.parent, ignore_errors=True)


def test_a_receiver_that_stops_answering_ends_the_feed_within_its_timeout(fleet, tmp_path, controller_tmp):
    out = tmp_path / "receiver-side"
    out.mkdir()
    files = [whole(fleet.big, out / ".image.bin.tmp", 8 * MIB)]
    frozen: list[int] = []
    acknowledged = []

    def progress(nbytes: int) -> None:
        acknowledged.append(nbytes)
        if sum(acknowledged) > MIB and not frozen:
            frozen.extend(descendants(fleet.receiver.session_pids()))
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)

    try:
        with pytest.raises(FeedFailure) as caught:
            feed(fleet, files, bandwidth_limit=8e6, on_bytes=progress, timeout=3.0)
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert frozen, "the receiver's sessions were never stopped"
    assert caught.value.kind == "interrupted", caught.value
    assert caught.value.written == frozenset()
    assert "not responding" in str(caught.value) or "no reply from the receiver" in str(caught.value)
    wait_until(lambda: nothing_left(fleet, controller_tmp), timeout=20, what="nothing left")


def test_connections_added_while_a_feed_runs_write_their_share_and_end_with_it(
        fleet, tmp_path, controller_tmp, monkeypatch):
    """The sender in this process (its module is the one the controller ships), told that every
    added connection pays, and its queue held back until the third has logged in (bounded): the
    added connections join mid-feed, each writes ranges from the queue, and every byte arrives.
    The growth's own rule is in tests/unit/test_peer_sender.py."""
    monkeypatch.setattr(_peer_sender, "GROW_SECONDS", 0.01)
    monkeypatch.setattr(_peer_sender, "GROW_GAIN", 0.0)
    monkeypatch.setattr(_peer_sender, "GROW_WINDOWS_LEFT", 0)
    monkeypatch.setattr(_peer_sender, "cpu_times", lambda: None)
    events, writers = [], set()
    take_batch, write_batch = _peer_sender.Feed.take_batch, _peer_sender.write_batch

    def held_back(feed):
        wait_until(lambda: any(event.get("connections") == 3 for event in events), timeout=60, interval=0.01,
                   what="the third connection logged in")
        return take_batch(feed)

    def recorded(feed, connection, batch):
        writers.add(connection.index)
        return write_batch(feed, connection, batch)

    monkeypatch.setattr(_peer_sender.Feed, "take_batch", held_back)
    monkeypatch.setattr(_peer_sender, "write_batch", recorded)
    out = tmp_path / "receiver-side"
    out.mkdir()
    files = [whole(fleet.big, out / ".image.bin.tmp", MIB)]
    request = _peer_sender.parse_request(_request_line(fleet.peer(), files, 3, None, 10.0).decode())
    agent = TemporaryAgent([str(fleet.receiver.client_key)], None)
    monkeypatch.setenv("SSH_AUTH_SOCK", agent.socket_path)
    monkeypatch.setenv("TMPDIR", str(controller_tmp))
    try:
        _peer_sender.run(request, events.append)
    finally:
        agent.close()
    assert max(event["connections"] for event in events if "connections" in event) == 3, events
    assert writers == {0, 1, 2}
    assert {"written": files[0].temp} in events
    assert sha256(Path(files[0].temp)) == sha256(fleet.big)
    wait_until(lambda: not processes_mentioning(str(controller_tmp)), timeout=20, what="every ssh client ended")


def test_a_copy_renamed_into_place_since_it_was_listed_is_read_at_its_final_path(fleet, tmp_path, controller_tmp):
    """A holding host's copy is listed as its temp and its final path: by the time the sender opens
    it, its host may have checked and renamed it."""
    out = tmp_path / "receiver-side"
    out.mkdir()
    renamed = whole(fleet.smalls[1], out / ".small.cfg.tmp")
    files = [PeerFile(source_path=str(fleet.data / ".small.cfg.gone"), temp=renamed.temp, size=renamed.size,
                      ranges=renamed.ranges, final_path=str(fleet.smalls[1]))]
    assert feed(fleet, files) == frozenset({renamed.temp})
    assert sha256(Path(renamed.temp)) == sha256(fleet.smalls[1])
    missing = [PeerFile(source_path=str(fleet.data / ".gone"), temp=renamed.temp, size=renamed.size,
                        ranges=renamed.ranges, final_path=str(fleet.data / "gone"))]
    with pytest.raises(FeedFailure) as caught:
        feed(fleet, missing)
    assert caught.value.kind == "source" and ".gone" in str(caught.value)


@pytest.mark.parametrize("refusal", ["no splice here", "a source that cannot splice"])
def test_where_splice_is_missing_or_refused_the_sender_reads_and_writes_every_byte(
        fleet, tmp_path, controller_tmp, monkeypatch, refusal):
    """The sender moves WRITE data with splice(2) where it can; without it (an older Python, another
    platform) or when the file system refuses it (EINVAL), each connection reads and writes instead,
    and every byte still arrives. The sender runs in this process, so its os module is this one."""
    if refusal == "no splice here":
        monkeypatch.delattr(os, "splice", raising=False)
    else:
        def refuses(*_args, **_kwargs):
            raise OSError(errno.EINVAL, "Invalid argument")
        monkeypatch.setattr(os, "splice", refuses, raising=False)
    out = tmp_path / "receiver-side"
    out.mkdir()
    files = [whole(fleet.big, out / ".image.bin.tmp", 8 * MIB), whole(fleet.smalls[1], out / ".small.cfg.tmp")]
    request = _peer_sender.parse_request(_request_line(fleet.peer(), files, 1, None, 10.0).decode())
    agent = TemporaryAgent([str(fleet.receiver.client_key)], None)
    monkeypatch.setenv("SSH_AUTH_SOCK", agent.socket_path)
    monkeypatch.setenv("TMPDIR", str(controller_tmp))
    events = []
    try:
        _peer_sender.run(request, events.append)
    finally:
        agent.close()
    for item in files:
        assert {"written": item.temp} in events
        assert sha256(Path(item.temp)) == sha256(Path(item.source_path)), refusal
    wait_until(lambda: not processes_mentioning(str(controller_tmp)), timeout=20, what="every ssh client ended")
