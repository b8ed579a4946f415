"""The peer sender's pure parts: SFTP packets, the bandwidth bucket on a made-up clock, the request
it accepts, how it splits files into parts, and the ssh command line it runs. What it does with a
real receiver is in tests/integration/test_peer_feed.py."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.multipush.sftp.plugins.module_utils import _peer_sender as sender
from ansible_collections.multipush.sftp.plugins.plugin_utils._remote_hash import BOOTSTRAP

GOOD_LINE = "[127.0.0.3]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOQ"


def request(**overrides) -> dict:
    value = {
        "receiver": {"host": "127.0.0.3", "port": 2222, "user": "deploy", "known_hosts_lines": [GOOD_LINE]},
        "files": [{"source_path": "/data/a", "temp": "/t/.a.tmp", "size": 10, "ranges": [[0, 6], [6, 4]]},
                  {"source_path": "/data/e", "temp": "/t/.e.tmp", "size": 0, "ranges": []}],
        "connections": 4, "bandwidth_limit": None, "timeout": 10,
    }
    value.update(overrides)
    return value


# -- packets ----------------------------------------------------------------------------------


def test_requests_are_framed_as_sftp_v3_packets():
    opening = sender.packet(sender.FXP_OPEN, 7, sender.open_payload("/t/x", truncate=True))
    length, kind, request_id = struct.unpack_from(">IBI", opening)
    assert (length, kind, request_id) == (len(opening) - 4, 3, 7)
    assert opening[9:17] == b"\x00\x00\x00\x04/t/x"
    flags, attr_flags, mode = struct.unpack_from(">III", opening, 17)
    assert flags == 0x02 | 0x08 | 0x10 and attr_flags == 0x04 and mode == 0o600
    no_truncate = sender.open_payload("/t/x", truncate=False)
    assert struct.unpack_from(">I", no_truncate, 8)[0] == 0x02 | 0x08

    sizing = sender.size_payload("/t/x", 1 << 40)  # a SETSTAT by path
    assert sizing == b"\x00\x00\x00\x04/t/x" + struct.pack(">IQI", 0x01 | 0x04, 1 << 40, 0o600)


def test_a_write_header_and_its_data_make_one_whole_packet():
    data = b"x" * 1000
    whole = sender.write_header(9, b"handle", 4096, len(data)) + data
    length, kind, request_id = struct.unpack_from(">IBI", whole)
    assert (length + 4, kind, request_id) == (len(whole), sender.FXP_WRITE, 9)
    handle, end = sender.read_string(whole, 9)
    assert handle == b"handle"
    offset, size = struct.unpack_from(">QI", whole, end)
    assert (offset, size, whole[end + 12:]) == (4096, 1000, data)


def test_replies_are_split_only_when_complete_whatever_the_pieces():
    ok = struct.pack(">I", 0) + sender.sftp_string("ok") + sender.sftp_string("")
    status = sender.packet(sender.FXP_STATUS, 5, ok)
    handle = sender.packet(sender.FXP_HANDLE, 6, sender.sftp_string(b"\x00\x01"))
    stream = status + handle
    buffer, seen = bytearray(), []
    for index in range(len(stream)):  # one byte at a time
        buffer += stream[index:index + 1]
        seen += sender.split_packets(buffer)
    assert [(kind, request_id) for kind, request_id, _body in seen] == [(101, 5), (102, 6)]
    assert sender.status_of(seen[0][2]) == (0, "ok")
    assert sender.read_string(seen[1][2])[0] == b"\x00\x01"
    assert buffer == bytearray()


def test_a_status_without_a_message_is_named_and_a_broken_stream_is_refused():
    assert sender.status_of(struct.pack(">I", 3)) == (3, "permission denied")
    with pytest.raises(sender.Failure) as caught:
        sender.split_packets(bytearray(struct.pack(">I", 10 * 1024 * 1024) + b"x" * 9))
    assert caught.value.kind == "interrupted" and "broken" in str(caught.value)


# -- bandwidth --------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_bucket_lets_a_burst_through_then_spaces_requests_at_the_rate():
    clock = FakeClock()
    bucket = sender.TokenBucket(rate=1000.0, burst=100.0, clock=clock)
    assert bucket.reserve(100) == 0.0  # the burst
    assert bucket.reserve(100) == pytest.approx(0.1)
    assert bucket.reserve(100) == pytest.approx(0.2)
    clock.now += 10  # idle: only the burst comes back, not ten seconds' worth
    assert bucket.reserve(100) == 0.0
    assert bucket.reserve(100) == pytest.approx(0.1)


def test_the_bucket_keeps_any_five_second_window_within_five_percent():
    rate = 20e6
    chunk = sender.chunk_size_for(rate)
    clock = FakeClock()
    bucket = sender.TokenBucket(rate=rate, burst=chunk, clock=clock)
    sends = []  # (time sent, bytes): senders sleep what reserve says, several of them interleaved
    ready = [clock.now] * 4
    for step in range(4000):
        sender_index = step % 4
        clock.now = max(clock.now, ready[sender_index])
        delay = bucket.reserve(chunk)
        sends.append((clock.now + delay, chunk))
        ready[sender_index] = clock.now + delay
    sends.sort()
    times = [moment for moment, _size in sends]
    worst = 0
    for start_index, start in enumerate(times):
        total = sum(size for moment, size in sends[start_index:] if moment < start + 5.0)
        worst = max(worst, total)
        if start + 5.0 > times[-1]:
            break
    assert worst <= rate * 5.0 * 1.05


def test_writes_get_smaller_under_a_low_limit_and_the_rate_must_be_positive():
    assert sender.chunk_size_for(None, 261120) == sender.WRITE_SIZE  # OpenSSH's limit is larger
    assert sender.chunk_size_for(1e9, 261120) == sender.WRITE_SIZE
    # A server that never said: SFTP's minimum, as the controller's own connections use.
    assert sender.chunk_size_for(None) == sender.SAFE_WRITE_SIZE == 32768
    assert sender.chunk_size_for(None, 16384) == 16384
    assert sender.chunk_size_for(1e6) == 20000
    assert sender.chunk_size_for(1000) == 4096
    with pytest.raises(ValueError):
        sender.TokenBucket(0, 1)


# -- the request ------------------------------------------------------------------------------


def test_a_request_is_read_with_its_ranges_and_defaults():
    parsed = sender.parse_request(json.dumps(request()).encode())
    assert parsed["host"] == "127.0.0.3" and parsed["port"] == 2222 and parsed["user"] == "deploy"
    assert parsed["files"][0]["ranges"] == [(0, 6), (6, 4)]
    assert parsed["files"][1]["ranges"] == []
    assert parsed["write_size"] == sender.SAFE_WRITE_SIZE  # the controller did not learn the receiver's limit
    assert sender.parse_request(json.dumps(request(write_size=261120)))["write_size"] == 261120
    empty = {"source_path": "/e", "temp": "/t/e", "size": 0, "ranges": [[0, 0]]}  # an empty range is no range
    assert sender.parse_request(json.dumps(request(files=[empty])))["files"][0]["ranges"] == []
    assert parsed["bandwidth_limit"] is None and parsed["timeout"] == 10.0


@pytest.mark.parametrize("change, words", [
    ({"files": [{"source_path": "/a", "temp": "/t", "size": 10, "ranges": [[0, 6]]}]}, "cover 6 of its 10"),
    ({"files": [{"source_path": "/a", "temp": "/t", "size": 10, "ranges": [[0, 6], [5, 5]]}]}, "do not cover"),
    ({"files": [{"source_path": "/a", "temp": "/t", "size": 2, "ranges": [[0, 3], [3, -1]]}]}, "do not cover"),
    ({"receiver": {"host": "h", "port": 22, "user": "u", "known_hosts_lines": []}}, "no known_hosts line"),
    ({"receiver": {"host": "-oProxyCommand=x", "port": 22, "user": "u", "known_hosts_lines": [GOOD_LINE]}},
     "malformed"),
    ({"receiver": {"host": "h", "port": 22, "user": "u", "known_hosts_lines": ["a\nb"]}}, "malformed"),
    ({"bandwidth_limit": 0}, "more than zero"),
    ({"receiver": None}, "unreadable request"),
])
def test_a_bad_request_is_refused_before_anything_runs(change, words):
    with pytest.raises(sender.Failure) as caught:
        sender.parse_request(json.dumps(request(**change)))
    assert words in str(caught.value)


def test_files_of_several_ranges_are_created_first_and_their_ranges_go_before_small_files():
    parsed = sender.parse_request(json.dumps(request(files=[
        {"source_path": "/a", "temp": "/t/a", "size": 10, "ranges": [[0, 6], [6, 4]]},
        {"source_path": "/b", "temp": "/t/b", "size": 3, "ranges": [[0, 3]]},
        {"source_path": "/e", "temp": "/t/e", "size": 0, "ranges": []},
    ])))
    first, rest = sender.plan_parts(parsed["files"])
    assert [(part.item["temp"], part.ranges, part.create) for part in first] == [("/t/a", [], True)]
    assert [(part.item["temp"], part.ranges, part.create) for part in rest] == [
        ("/t/a", [(0, 6)], False), ("/t/a", [(6, 4)], False), ("/t/b", [(0, 3)], True), ("/t/e", [], True)]


def test_small_parts_are_taken_together_and_a_big_one_alone():
    item = {"temp": "/t", "size": 0}
    feed = sender.Feed(sender.parse_request(json.dumps(request())), emit=None)
    feed.queue = [sender.Part(item, [(0, 8 << 20)], False), sender.Part(item, [(0, 100)], True),
                  sender.Part(item, [(0, 100)], True), sender.Part(item, [(0, 2 << 20)], True)]
    assert [part.size for part in feed.take_batch()] == [8 << 20]
    assert [part.size for part in feed.take_batch()] == [100, 100]
    assert [part.size for part in feed.take_batch()] == [2 << 20]
    assert feed.take_batch() == []


def test_spans_merge_and_say_what_is_there():
    spans = []
    for start, end in ((10, 20), (30, 40), (20, 30), (50, 50), (0, 5)):
        spans = sender.merge_span(spans, start, end)
    assert spans == [[0, 5], [10, 40]]
    there = sender.Availability(complete=False)
    rest = there.read_offers(b'{"available": [["/s/a", 0, 100]], "complete": false}\nnot json\n{"avail')
    assert rest == b'{"avail' and there.has("/s/a", 0, 100) and there.has("/s/a", 40, 60)
    assert not there.has("/s/a", 90, 101) and not there.has("/s/b", 0, 1)
    there.read_offers(b'{"available": [], "complete": true}\n')
    assert there.has("/s/b", 0, 1 << 30)


def test_a_streaming_feed_takes_only_parts_whose_bytes_are_at_the_source():
    feed = sender.Feed(sender.parse_request(json.dumps(request(streaming=True))), emit=None)
    big = {"temp": "/t/big", "size": 8 << 20, "source_path": "/s/big"}
    small = {"temp": "/t/small", "size": 100, "source_path": "/s/small"}
    feed.queue = [sender.Part(big, [(0, 4 << 20)], False), sender.Part(big, [(4 << 20, 4 << 20)], False),
                  sender.Part(small, [(0, 100)], True)]
    assert feed.take_batch() is None  # nothing there yet: nothing taken
    feed.availability.offer([("/s/small", 0, 100), ("/s/big", 4 << 20, 8 << 20)])
    assert [part.item["temp"] for part in feed.take_batch()] == ["/t/big"]
    assert [part.item["temp"] for part in feed.take_batch()] == ["/t/small"]
    assert feed.take_batch() is None
    feed.availability.offer([], complete=True)
    assert [part.ranges for part in feed.take_batch()] == [[(0, 4 << 20)]]
    assert feed.take_batch() == []


def test_the_ssh_command_trusts_only_the_given_key_never_prompts_and_runs_the_subsystem():
    parsed = sender.parse_request(json.dumps(request()))
    command = sender.ssh_command(parsed, "/tmp/x/known_hosts")
    options = dict(command[index + 1].split("=", 1) for index, word in enumerate(command) if word == "-o")
    assert options["StrictHostKeyChecking"] == "yes" and "accept-new" not in " ".join(command)
    assert options["UserKnownHostsFile"] == "/tmp/x/known_hosts" and options["GlobalKnownHostsFile"] == "/dev/null"
    assert options["BatchMode"] == "yes" and options["PasswordAuthentication"] == "no"
    assert options["ControlMaster"] == "no" and options["ControlPath"] == "none"
    assert options["ForwardAgent"] == "no" and options["IdentityAgent"] == "SSH_AUTH_SOCK"
    assert options["ConnectTimeout"] == "10"
    # OpenSSH's default set, AES-GCM first (cheaper than ChaCha20 where the CPU has AES instructions)
    assert options["Ciphers"].split(",")[0] == "aes128-gcm@openssh.com"
    assert set(options["Ciphers"].split(",")) == {"aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                                                  "chacha20-poly1305@openssh.com", "aes128-ctr", "aes192-ctr",
                                                  "aes256-ctr"}
    assert command[-8:] == ["-p", "2222", "-l", "deploy", "-s", "--", "127.0.0.3", "sftp"]


@pytest.mark.parametrize("timeout", [1, 2, 3, 5, 10, 30, 31, 100])
def test_the_ssh_keepalive_gives_up_only_well_after_the_watchdog(timeout):
    """ssh ends a silent session after CountMax + 1 keepalive intervals; the watchdog reports a
    receiver that stopped answering after `timeout`. ssh must not win that race (it would say only
    that it exited with status 255)."""
    parsed = sender.parse_request(json.dumps(request(timeout=timeout)))
    command = sender.ssh_command(parsed, "/tmp/x/known_hosts")
    options = dict(command[index + 1].split("=", 1) for index, word in enumerate(command) if word == "-o")
    interval, count = int(options["ServerAliveInterval"]), int(options["ServerAliveCountMax"])
    assert interval >= 1 and count >= 3
    assert interval * (count + 1) >= 2 * timeout
    assert interval * (count + 1) <= 3 * timeout + 2  # still a backstop for a dead link


def test_events_are_one_json_line_each():
    out = io.StringIO()
    emit = sender._emitter(out)
    emit({"written": "/t/a"})
    emit({"bytes": 5})
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [{"written": "/t/a"}, {"bytes": 5}]


def test_a_source_copy_of_another_size_is_the_sources_fault(tmp_path, monkeypatch):
    copy = tmp_path / "a"
    copy.write_bytes(b"12345")
    parsed = sender.parse_request(json.dumps(request(files=[
        {"source_path": str(copy), "temp": "/t/a", "size": 10, "ranges": [[0, 10]]}])))
    monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "agent.sock"))
    with pytest.raises(sender.Failure) as caught:
        sender.run(parsed, emit=None)
    assert caught.value.kind == "source" and "has 5 bytes, not the 10 expected" in str(caught.value)
    monkeypatch.delenv("SSH_AUTH_SOCK")
    with pytest.raises(sender.Failure) as caught:
        sender.run(parsed, emit=None)
    assert caught.value.kind == "source" and "no forwarded SSH agent" in str(caught.value)


def test_serve_answers_a_bad_request_with_one_error_line_and_status_1(monkeypatch):
    handlers = []
    monkeypatch.setattr(sender.signal, "signal", lambda number, handler: handlers.append(number))
    out = io.StringIO()
    with pytest.raises(SystemExit) as ended:
        sender.serve(io.BytesIO(b'{"receiver": 1}\n'), out)
    assert ended.value.code == 1
    event = json.loads(out.getvalue())
    assert event["kind"] == "interrupted" and event["error"].startswith("unreadable request from the controller")
    assert sender.signal.SIGTERM in handlers  # a terminated sender still removes its directory


def test_the_sender_exits_with_its_own_status_while_its_stdin_is_still_open(tmp_path):
    """As the controller runs it: the bootstrap reads the code and the request from stdin, and a
    thread then watches stdin for the controller's end. The request fails (no agent forwarded) while
    the controller keeps stdin open: the sender must exit 1, not hang in Python's shutdown on the
    watcher's stdin lock and abort (status 134)."""
    code = Path(sender.__file__).read_bytes()
    line = json.dumps(request(files=[{"source_path": str(tmp_path / "a"), "temp": "/t/a", "size": 0,
                                      "ranges": []}])).encode() + b"\n"
    environment = {key: value for key, value in os.environ.items() if key != "SSH_AUTH_SOCK"}
    process = subprocess.Popen([sys.executable, "-I", "-S", "-c", BOOTSTRAP], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)
    try:
        process.stdin.write(f"{len(code)}\n".encode() + code + line)
        process.stdin.flush()
        event = json.loads(process.stdout.readline())
        status = process.wait(timeout=60)
    finally:
        process.kill()
        process.stdin.close()
        process.wait()
    assert event["kind"] == "source" and "no forwarded SSH agent" in event["error"]
    assert status == 1, process.stderr.read().decode(errors="replace")[-500:]


class FakeConnection:
    def __init__(self, ready=False):
        self.ready = ready


def growth(cpu_samples, ceiling=4, cores=4):
    samples = iter(cpu_samples)
    return sender.Growth(ceiling, cores=cores, cpu=lambda: next(samples))


def test_a_feed_adds_a_connection_only_while_a_core_is_idle_and_the_last_one_paid():
    # (idle, total) ticks of the whole machine, read once per window: each window is 100 ticks
    plan = growth([(0, 0), (50, 100), (100, 200), (150, 300), (200, 400), (220, 500), (320, 600)])
    plan.start(0.0, 0)
    assert not plan.decide(0.2, 10, 1, 10**9)  # the window is not over
    assert plan.decide(0.5, 50, 1, 10**9)  # 2 of 4 cores idle, much left: a second connection
    joining = FakeConnection()
    plan.added(joining)
    assert not plan.decide(1.0, 60, 2, 10**9)  # it is still logging in
    joining.ready = True
    assert not plan.decide(1.1, 70, 2, 10**9)  # logged in: the window starts again
    assert plan.decide(1.6, 170, 2, 10**9)  # 200 B/s against 100 before: it paid; 2 cores idle
    plan.added(FakeConnection(ready=True))
    assert not plan.decide(1.7, 170, 3, 10**9)
    assert not plan.decide(2.2, 320, 3, 10**9)  # it paid too, but 0.8 cores idle: no fourth now
    assert not plan.settled
    assert plan.decide(2.7, 470, 3, 10**9)  # 4 cores idle again


def test_a_connection_that_did_not_raise_the_rate_settles_the_feed():
    plan = growth([(0, 0), (100, 100), (200, 200), (300, 300)])
    plan.start(0.0, 0)
    assert plan.decide(0.5, 100, 1, 10**9)
    plan.added(FakeConnection(ready=True))
    assert not plan.decide(0.6, 100, 2, 10**9)
    assert not plan.decide(1.1, 210, 2, 10**9)  # 220 B/s against 200: less than GROW_GAIN
    assert plan.settled and not plan.decide(5.0, 10**6, 2, 10**9)


@pytest.mark.parametrize("ceiling, connections, left, cpu", [
    (1, 1, 10**9, (100, 100)),  # one allowed
    (4, 4, 10**9, (100, 100)),  # all open
    (4, 1, 50, (100, 100)),  # 100 B/s and 50 bytes left: a login would not pay
])
def test_no_connection_is_added_at_the_most_or_near_the_end(ceiling, connections, left, cpu):
    plan = growth([(0, 0), cpu], ceiling=ceiling)
    plan.start(0.0, 0)
    assert not plan.decide(1.0, 100, connections, left)


def test_without_proc_stat_the_rate_alone_decides_and_a_failed_login_ends_the_growth():
    plan = growth([None] * 4)
    plan.start(0.0, 0)
    assert plan.decide(0.5, 100, 1, 10**9)
    plan.added(FakeConnection())
    plan.failed()
    assert plan.settled and not plan.decide(2.0, 10**4, 2, 10**9)


def test_private_directories_of_killed_senders_are_removed_and_live_ones_kept(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"{sender.PRIVATE_PREFIX}{gone.pid}-abc"
    live = tmp_path / f"{sender.PRIVATE_PREFIX}{os.getpid()}-def"
    unrelated = tmp_path / f"{sender.PRIVATE_PREFIX}x-1"
    for directory in (stale, live, unrelated):
        directory.mkdir()
        (directory / "known_hosts").write_text("[h]:22 ssh-ed25519 AAAA\n")
    (tmp_path / f"{sender.PRIVATE_PREFIX}{gone.pid}-file").write_text("not a directory")
    sender.remove_stale_directories(str(tmp_path))
    assert not stale.exists()
    assert live.exists() and unrelated.exists() and (tmp_path / f"{sender.PRIVATE_PREFIX}{gone.pid}-file").exists()
