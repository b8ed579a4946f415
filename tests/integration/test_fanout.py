"""Fleet fan-out (issue 22): `fanout: true` on multipush.sftp.push, against a fleet on loopback.

The fleet (tests/support/fleet.py): host i is an sshd on 127.0.0.(i+2); the controller reaches it only
through relay i on 127.0.0.1, and all relays share one capped upload link, the controller's uplink
(30 MB/s here, 20 ms round trip); hosts reach each other directly at their `multipush_peer_address`.
The relays count what the controller sent, so "the uplink carried at most 4 copies" is measured, not
inferred from the results. Every run is a real ansible-playbook run; each host's result is written by
the push itself (`result_file`). Select these tests with the file's path or `-k fanout`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.support.fleet import Fleet, make_vpod, tree_bytes, tree_digests
from tests.support.files import leftovers, tree_snapshot
from tests.support.playenv import BIN
from tests.support.relay import Link, Relay
from tests.support.sshd import free_port

MiB = 1024 * 1024
HOSTS = 8
UPLINK = 30e6  # bytes/s, all hosts together
RTT_MS = 20.0
IMAGE = 32 * MiB
SMALL_FILES = 20
PLAY_TIMEOUT = 240.0
# A copy on the wire is the tree plus SSH/SFTP framing. Per SSH packet (up to 32 KiB of data): the SFTP
# write request's header (4 length + 1 type + 4 id + 4 + handle + 8 offset + 4 length, about 30-60 bytes),
# the channel data header (9), the packet length and padding (5 + 4..16 with the usual block padding) and
# the AES-GCM tag (16): at most ~100 bytes per 32 KiB, 0.3%; 1% leaves room for smaller packets.
FRAMING = 0.01
PLACING = 512 * 1024  # per host: checking and placing a peer's copy (see the eight-host test)
TMP_PATTERNS = re.compile(r"^(ssh-|multipush|tmp)")
# what other tests and tools running beside this file leave in /tmp for a while (their own, not the push's)
OTHERS_TMP = ("multipush-sshd-", "multipush-bench-", "multipush-demo-", "multipush-bad-input-")
# What a push with fanout makes in /tmp (and must remove): the sender's directory on a source, the
# controller's temporary agent when its TMPDIR is too long for a socket path. Other multipush-* entries
# there belong to other tests running beside this one (multipush-become-*, ...).
PUSH_TMP = ("multipush-peer-", "multipush-agent-")
# The controller's private state directory shared by Ansible's forks (the fan-out ledger, the bandwidth
# budget), <tmp>/multipush-<uid>, mode 0700: documented to stay, like ~/.ansible/cp (its files are pruned).
RUNTIME_DIR = f"multipush-{os.getuid()}"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with Fleet(tmp_path_factory.mktemp("fanout-fleet"), hosts=HOSTS, uplink_rate=UPLINK, rtt_ms=RTT_MS) as running:
        yield running


@pytest.fixture(scope="module")
def vpod(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fanout-src") / "vpod"
    make_vpod(root, IMAGE, SMALL_FILES)
    return root


@pytest.fixture
def fresh(fleet):
    """Every destination empty before and after the test."""
    fleet.clear_dests()
    yield fleet
    fleet.clear_dests()


@pytest.fixture
def controller_tmp():
    """A short private TMPDIR for ansible-playbook (AF_UNIX paths are limited to 108 bytes), so what the
    controller side leaves is found without other tests' files in the way."""
    path = Path(tempfile.mkdtemp(prefix="mpf-"))
    yield path
    with contextlib.suppress(OSError):
        for entry in path.iterdir():
            subprocess.run(["rm", "-rf", str(entry)], check=False)
        path.rmdir()


class Play:
    def __init__(self, rc: int, output: str, results: dict, seconds: float):
        self.rc = rc
        self.output = output
        self.results = results
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"<fan-out play rc={self.rc} {self.seconds:.1f}s>\n{self.output[-6000:]}"


def playbook(tmp_path: Path, src: Path, options: dict) -> Path:
    lines = "\n".join(f"        {key}: {json.dumps(value)}" for key, value in options.items())
    path = tmp_path / "fanout.yml"
    path.write_text(textwrap.dedent("""\
        - name: Fan-out
          hosts: targets
          gather_facts: false
          tasks:
            - name: Push the vPod
              multipush.sftp.push:
                src: {src}
                dest: "{{{{ fleet_dest }}}}"
                result_file: "{{{{ results_dir }}}}/{{{{ inventory_hostname }}}}.json"
        {lines}
              ignore_errors: true
        """).format(src=json.dumps(f"{src}/"), lines=lines))
    return path


def start_play(ansible_env: dict, tmp_path: Path, inventory: Path, src: Path, options: dict, forks: int,
               controller_tmp: Path | None = None, name: str = "run") -> tuple[subprocess.Popen, Path, Path]:
    results = tmp_path / f"results-{name}"
    results.mkdir()
    env = dict(ansible_env)
    if controller_tmp is not None:
        env["TMPDIR"] = str(controller_tmp)
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(BIN / "ansible-playbook"), "-i", str(inventory), "-f", str(forks), "-e", f"results_dir={results}",
             str(playbook(tmp_path, src, options))],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return process, results, log


def finish_play(process: subprocess.Popen, results: Path, log: Path, started: float,
                timeout: float = PLAY_TIMEOUT) -> Play:
    try:
        process.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    seconds = time.monotonic() - started
    found = {path.stem: json.loads(path.read_text()) for path in results.glob("*.json")}
    return Play(process.returncode, log.read_text(errors="replace"), found, seconds)


def run_play(ansible_env, tmp_path, inventory, src, options, forks, controller_tmp=None, name="run") -> Play:
    started = time.monotonic()
    process, results, log = start_play(ansible_env, tmp_path, inventory, src, options, forks, controller_tmp, name)
    return finish_play(process, results, log, started)


def ok(play: Play, name: str) -> dict:
    result = play.results.get(name)
    assert result is not None, f"no result for {name}\n{play!r}"
    assert not result.get("failed") and not result.get("unreachable"), (name, result.get("msg"), play)
    return result


def warnings_of(result: dict) -> list[str]:
    return [str(warning) for warning in result.get("warnings") or []]


def tmp_entries(directory: Path = Path("/tmp")) -> set[str]:
    with contextlib.suppress(OSError):
        return {entry.name for entry in directory.iterdir() if TMP_PATTERNS.match(entry.name)}
    return set()


def _live_sockets() -> list[str]:
    """Paths of the unix sockets some process has bound and not closed (/proc/net/unix)."""
    with contextlib.suppress(OSError):
        return [fields[-1] for line in Path("/proc/net/unix").read_text().splitlines()[1:]
                if len(fields := line.split()) >= 8 and fields[-1].startswith("/")]
    return []


def _cmdlines() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return found


def new_tmp_leftovers(before: set[str], directory: Path = Path("/tmp"), grace: float = 5.0,
                      fleet: Fleet | None = None) -> list[str]:
    """Entries matching ssh-*/multipush*/tmp* that appeared in `directory` since `before` and stay (given
    `grace` seconds to go). In the shared /tmp, where other tests run beside this one, an entry is not
    counted when it is another's: what other tests and tools make (OTHERS_TMP); one still in use (a live
    unix socket under it, e.g. another test's agent, or a running command naming it); a tmp* or a sender's
    multipush-peer-* entry that names no host of `fleet` (another fleet's known_hosts)."""
    shared = directory == Path("/tmp")
    deadline = time.monotonic() + grace
    while True:
        left = []
        candidates = [name for name in sorted(tmp_entries(directory) - before) if name != RUNTIME_DIR]
        if shared and candidates:
            sockets, commands = _live_sockets(), _cmdlines()
        for name in candidates:
            path = directory / name
            if shared:
                if name.startswith(OTHERS_TMP) or (name.startswith("multipush")
                                                   and not name.startswith(PUSH_TMP)):
                    continue
                if any(socket_path.startswith(f"{path}/") or socket_path == str(path) for socket_path in sockets):
                    continue
                if any(str(path) in command for command in commands):
                    continue
                if fleet is not None and name.startswith(("tmp", "multipush-peer-")) and not fleet.mentions(path):
                    continue
            left.append(name)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.25)


def same_tree(fleet: Fleet, names, src_digests: dict) -> dict:
    """Host name -> what differs from the source (empty when byte-identical)."""
    problems = {}
    for name in names:
        got = tree_digests(fleet[name].dest)
        if got != src_digests:
            missing = sorted(set(src_digests) - set(got))[:5]
            differ = sorted(key for key in src_digests if key in got and got[key] != src_digests[key])[:5]
            extra = sorted(set(got) - set(src_digests))[:5]
            problems[name] = {"missing": missing, "differ": differ, "extra": extra}
    return problems


# --- the fleet itself ------------------------------------------------------------------------------------


def test_fanout_fleet_relays_share_one_capped_uplink():
    """The infrastructure the other tests measure with: three relays on one 20 MB/s uplink carry 24 MB in
    at least 1.2 s, the uplink's meter counts what the relays count, and no 1 s holds much over the cap."""
    received = [0, 0, 0]
    servers, threads = [], []

    def sink(sock, slot):
        conn, _peer = sock.accept()
        with conn:
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                received[slot] += len(data)

    for slot in range(3):
        server = socket_listen()
        servers.append(server)
        threads.append(threading.Thread(target=sink, args=(server, slot), daemon=True))
        threads[-1].start()
    uplink = Link(0.005, 20e6, max_backlog=0.1)
    relays = [Relay(server.getsockname(), rtt_ms=10, uplink=uplink).start() for server in servers]
    try:
        started = time.monotonic()

        def send(relay):
            with socket.create_connection(relay.address, timeout=20) as client:
                for _chunk in range(8):
                    client.sendall(os.urandom(MiB))

        senders = [threading.Thread(target=send, args=(relay,), daemon=True) for relay in relays]
        for thread in senders:
            thread.start()
        for thread in senders + threads:
            thread.join(30)
        elapsed = time.monotonic() - started
    finally:
        for relay in relays:
            relay.stop()
        for server in servers:
            server.close()
    assert received == [8 * MiB] * 3
    assert sum(relay.bytes_up for relay in relays) == uplink.meter.total == 24 * MiB
    assert [relay.meter_up.total for relay in relays] == [8 * MiB] * 3
    assert elapsed >= 24 * MiB / 20e6 * 0.95, elapsed
    # read time may lead the cap by the backlog (0.1 s) and one chunk per connection
    assert uplink.meter.max_window(1.0) <= 20e6 * 1.0 + 20e6 * 0.1 + 3 * 256 * 1024, uplink.meter.series()


def socket_listen():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    return server


# --- fan-out -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fanout_eight_hosts_behind_one_uplink(fresh, vpod, ansible_env, tmp_path, controller_tmp):
    fleet = fresh
    names = [host.name for host in fleet]
    size = tree_bytes(vpod)
    src_digests = tree_digests(vpod)
    inventory = fleet.write_inventory(tmp_path / "inventory.ini")
    tmp_before = tmp_entries()
    up_before = fleet.bytes_up()

    play = run_play(ansible_env, tmp_path, inventory, vpod, {"fanout": True}, forks=HOSTS,
                    controller_tmp=controller_tmp, name="first")
    up_first = {name: fleet.bytes_up()[name] - up_before[name] for name in names}
    results = {name: ok(play, name) for name in names}

    assert not same_tree(fleet, names, src_digests), (same_tree(fleet, names, src_digests), play)
    snapshot = tree_snapshot(vpod)
    assert {name: tree_snapshot(fleet[name].dest) == snapshot for name in names} == dict.fromkeys(names, True), \
        "modes and mtimes as with a plain push"
    assert {name: results[name]["changed"] for name in names} == dict.fromkeys(names, True), play
    sources = {name: results[name].get("source") for name in names}
    assert set(sources.values()) <= {"controller", *names}, sources
    assert all(source != name for name, source in sources.items()), sources
    by_peer = [name for name, source in sources.items() if source != "controller"]
    assert len(by_peer) >= HOSTS // 2, (sources, play)
    # the result's fanout report agrees: a peer wrote at least the image into each peer-fed host's temps
    peer_bytes = {name: (results[name].get("fanout") or {}).get("peer_bytes") for name in names}
    assert all((peer_bytes[name] or 0) >= IMAGE for name in by_peer), (peer_bytes, sources)
    # the seed crosses the capped uplink for seconds: hosts take their copy from one still receiving it
    attempts = {name: (results[name].get("fanout") or {}).get("attempts") or [] for name in by_peer}
    assert any(attempt.get("streamed") for tried in attempts.values() for attempt in tried), attempts
    for name in names:
        assert leftovers(fleet[name].dest_root) == [], name
    assert new_tmp_leftovers(set(), controller_tmp) == [], "the controller's TMPDIR (agent, known_hosts)"
    assert new_tmp_leftovers(tmp_before, fleet=fleet) == [], "/tmp on the hosts (this machine)"

    # Nothing to do the second time; what it sends up is each host's logins and survey, which the first
    # run also paid. The bound for the uplink: 4 copies with framing, plus per host that and the first
    # run's checks and placing (the digest requests of the controller's check of a peer's copy, opens,
    # setstat and renames: 54-140 KB per host measured on the 32 MiB tree), bounded by PLACING.
    before = fleet.bytes_up()
    again = run_play(ansible_env, tmp_path, inventory, vpod, {"fanout": True}, forks=HOSTS,
                     controller_tmp=controller_tmp, name="second")
    up_second = {name: fleet.bytes_up()[name] - before[name] for name in names}
    second = {name: ok(again, name) for name in names}
    assert {name: second[name]["changed"] for name in names} == dict.fromkeys(names, False), again
    assert not same_tree(fleet, names, src_digests)

    overhead = max(up_second.values())
    bound = 4 * size * (1 + FRAMING) + HOSTS * (overhead + PLACING)
    detail = (f"uplink carried {sum(up_first.values())} bytes = {sum(up_first.values()) / size:.2f} copies of"
              f" {size}; bound {bound:.0f} (4 copies + {FRAMING:.0%} framing + {HOSTS} x ({overhead} + {PLACING})"
              f" per host); per host {up_first}; sources {sources}")
    assert sum(up_first.values()) <= bound, detail
    print(detail, f"first run {play.seconds:.1f}s, second {again.seconds:.1f}s")


def _sender_feeds(fleet: Fleet) -> list[tuple[str, str, list[int]]]:
    """(source host, receiver host, pids to kill) for every peer feed running now: a process below a
    host's sshd that started `ssh ... -s ... sftp` to another host of the fleet, and those ssh clients."""
    by_address = {(host.server.host, str(host.server.port)): host.name for host in fleet}
    feeds = []
    for host in fleet:
        procs = host.processes()
        by_pid = {proc.pid: proc for proc in procs}
        children: dict[int, list] = {}
        for proc in procs:
            children.setdefault(proc.ppid, []).append(proc)
        for proc in procs:
            argv = proc.argv
            if not argv or os.path.basename(argv[0]) != "ssh" or argv[-1] != "sftp" or "-s" not in argv:
                continue
            port = argv[argv.index("-p") + 1] if "-p" in argv[:-1] else "22"
            receiver = by_address.get((argv[-2], port))
            parent = by_pid.get(proc.ppid)
            if receiver is None or parent is None:
                continue
            pids = [parent.pid] + [child.pid for child in children.get(parent.pid, [])]
            feeds.append((host.name, receiver, pids))
    return feeds


@pytest.mark.slow
def test_fanout_peer_killed_while_feeding_another(fresh, vpod, ansible_env, tmp_path):
    """The sender of a peer feed is SIGKILLed (it and its ssh clients) once the receiver's temp holds
    some of the image: the receiver still completes, byte-identical, from another source."""
    fleet = fresh
    names = [host.name for host in fleet][:4]
    src_digests = tree_digests(vpod)
    inventory = fleet.write_inventory(tmp_path / "inventory.ini", hosts=names)
    # 10 MB/s per host: a 32 MiB image takes over 3 s on every feed, time enough to see one and act
    peer_dirs = {entry for entry in tmp_entries() if entry.startswith("multipush-peer-")}
    started = time.monotonic()
    process, results_dir, log = start_play(ansible_env, tmp_path, inventory, vpod,
                                           {"fanout": True, "bandwidth_limit": "10MB"}, forks=len(names))
    killed = None
    seen_feeds = set()
    try:
        deadline = time.monotonic() + 120
        while killed is None and process.poll() is None and time.monotonic() < deadline:
            for source, receiver, pids in _sender_feeds(fleet):
                seen_feeds.add((source, receiver))
                if receiver in names and 2 * MiB <= fleet[receiver].temp_bytes() <= IMAGE - 4 * MiB:
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    killed = (source, receiver, fleet[receiver].temp_bytes())
                    break
            time.sleep(0.05)
    finally:
        play = finish_play(process, results_dir, log, started)
        # SIGKILL gives the sender no chance to remove its private directory (its known_hosts): this
        # test's doing, so this test removes it
        for entry in {entry for entry in tmp_entries() if entry.startswith("multipush-peer-")} - peer_dirs:
            if fleet.mentions(Path("/tmp") / entry):
                subprocess.run(["rm", "-rf", "--", f"/tmp/{entry}"], check=False)
    assert killed is not None, (f"no peer feed seen with 2 MiB in the receiver's temp (feeds seen: {seen_feeds})",
                                play)
    source, receiver, temp_at_kill = killed
    results = {name: ok(play, name) for name in names}
    assert not same_tree(fleet, names, src_digests), (same_tree(fleet, names, src_digests), play)
    got = results[receiver]
    assert got["changed"] is True
    assert got.get("source") != source, (f"{receiver} was fed by {source}, whose sender was killed with"
                                         f" {temp_at_kill} bytes in the temp; the result still names it", got)
    assert got.get("source") in {"controller", *names}, got
    assert warnings_of(got), ("no warning about the interrupted feed", got)
    attempts = (got.get("fanout") or {}).get("attempts") or []
    assert any(attempt.get("source") == source and attempt.get("failed") for attempt in attempts), \
        ("the result's fanout.attempts does not show the killed feed as failed", attempts)
    for name in names:
        assert leftovers(fleet[name].dest_root) == [], name
    print(f"killed {source}'s sender feeding {receiver} at {temp_at_kill} bytes; {receiver} then came from"
          f" {got.get('source')}; warnings {warnings_of(got)}; {play.seconds:.1f}s")


def test_fanout_single_host_is_a_plain_push(fresh, vpod, ansible_env, tmp_path):
    fleet = fresh
    name = fleet[0].name
    inventory = fleet.write_inventory(tmp_path / "inventory.ini", hosts=[name])
    up_before = fleet.bytes_up()[name]
    play = run_play(ansible_env, tmp_path, inventory, vpod, {"fanout": True}, forks=1)
    result = ok(play, name)
    assert result["changed"] is True
    assert result.get("source") == "controller", result
    assert not same_tree(fleet, [name], tree_digests(vpod))
    assert tree_snapshot(fleet[name].dest) == tree_snapshot(vpod)
    assert leftovers(fleet[name].dest_root) == []
    sent = fleet.bytes_up()[name] - up_before
    assert sent >= tree_bytes(vpod), sent  # through its relay: the controller sent it


def test_fanout_unreachable_peer_address_falls_back_to_the_controller(fresh, vpod, ansible_env, tmp_path):
    fleet = fresh
    names = [host.name for host in fleet][:4]
    dead = fleet[names[2]]
    closed = f"{dead.address}:{free_port(dead.address)}"  # nothing listens there
    inventory = fleet.write_inventory(tmp_path / "inventory.ini", hosts=names,
                                      per_host={dead.name: {"multipush_peer_address": closed}})
    # One host at a time: the first seeds from the controller, so the dead address is always tried by a
    # peer (with every host at once, the host behind it could be the seed, and no peer ever tries it).
    play = run_play(ansible_env, tmp_path, inventory, vpod, {"fanout": True}, forks=1)
    results = {name: ok(play, name) for name in names}
    assert not same_tree(fleet, names, tree_digests(vpod)), play
    assert results[names[0]].get("source") == "controller" and results[names[1]].get("source") == names[0], results
    assert results[dead.name].get("source") == "controller", results[dead.name]
    named = [warning for name in names for warning in warnings_of(results[name])
             if dead.name in warning and closed in warning]
    assert named, ("no warning names the host and its address "
                   f"({dead.name}, {closed}): {[warnings_of(results[name]) for name in names]}", play)
    assert all(results[name]["changed"] for name in names)
    print(f"warnings: {named}; sources {({name: results[name].get('source') for name in names})}")


def test_fanout_a_feed_that_cannot_start_leaves_the_host_to_the_controllers_whole_pool(
        fresh, vpod, ansible_env, tmp_path):
    """No usable ssh-agent on the controller (one that exits at once stands in for it): no feed can
    start, each host but the seed is sent by the controller, with a warning saying why, on a pool
    sized for the whole push rather than the one connection a peer-fed host needs for its checks."""
    fleet = fresh
    names = [host.name for host in fleet][:3]
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "ssh-agent").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "ssh-agent").chmod(0o755)
    env = dict(ansible_env, PATH=f"{fake_bin}{os.pathsep}{ansible_env.get('PATH', '')}")
    env.pop("SSH_AUTH_SOCK", None)
    inventory = fleet.write_inventory(tmp_path / "inventory.ini", hosts=names)
    play = run_play(env, tmp_path, inventory, vpod, {"fanout": True}, forks=len(names))
    results = {name: ok(play, name) for name in names}
    assert not same_tree(fleet, names, tree_digests(vpod)), play
    assert all(results[name].get("source") == "controller" for name in names), results
    fallen_back = [name for name in names if any("ssh-agent" in warning for warning in warnings_of(results[name]))]
    assert len(fallen_back) == len(names) - 1, ({name: warnings_of(results[name]) for name in names}, play)
    for name in fallen_back:
        assert results[name]["connections"] >= 2, (name, results[name]["connections"], results[name].get("phases"))


def test_fanout_per_source_zero_fails_before_anything_is_sent(fresh, vpod, ansible_env, tmp_path):
    fleet = fresh
    names = [host.name for host in fleet][:2]
    inventory = fleet.write_inventory(tmp_path / "inventory.ini", hosts=names)
    accepted = {name: fleet[name].relay.accepted for name in names}
    play = run_play(ansible_env, tmp_path, inventory, vpod, {"fanout": True, "fanout_per_source": 0}, forks=2)
    for name in names:
        result = play.results.get(name)
        assert result is not None and result.get("failed"), (name, result, play)
        assert "fanout_per_source" in result.get("msg", ""), result
        assert fleet[name].relay.accepted == accepted[name], "no connection to the host"
        assert not any(fleet[name].dest_root.iterdir()), "nothing written"


def test_fanout_groups_keep_copies_within_their_group(fresh, vpod, ansible_env, tmp_path):
    """fanout_group: the controller seeds each group, and peers feed only hosts of their own group, so a
    site's WAN link is crossed once per site."""
    fleet = fresh
    names = [host.name for host in fleet][:6]
    site = {name: ("east" if index < 3 else "west") for index, name in enumerate(names)}
    inventory = fleet.write_inventory(tmp_path / "inventory.ini", hosts=names,
                                      per_host={name: {"site": site[name]} for name in names})
    play = run_play(ansible_env, tmp_path, inventory, vpod, {"fanout": True, "fanout_group": "{{ site }}"},
                    forks=len(names))
    results = {name: ok(play, name) for name in names}
    assert not same_tree(fleet, names, tree_digests(vpod)), play
    sources = {name: results[name]["source"] for name in names}
    for group in ("east", "west"):
        members = [name for name in names if site[name] == group]
        seeded = [name for name in members if sources[name] == "controller"]
        assert len(seeded) == 1, (group, sources)  # one copy over the uplink per group
        assert all(sources[name] in members for name in members if name not in seeded), (group, sources)
        assert all(results[name]["fanout"]["group"] == group for name in members)
