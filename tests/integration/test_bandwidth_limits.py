"""bandwidth_limit and total_bandwidth_limit through ansible-playbook, measured on the wire.

A relay (tests/support/relay.py, no added delay) sits between the controller and a real sshd; a
thread reads its upload byte count every 0.25 s. The limits are upper bounds on what the relay
counted over any 5 s, which a slow machine cannot break (it only sends less); nothing here times the
push itself. Several inventory hosts behind one relay are the controller's uplink shared by Ansible's
forks: separate processes whose only common budget is total_bandwidth_limit's state file.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.faults import ansible_env, inventory_line
from tests.support.files import MIB, random_file, sha256
from tests.support.playenv import BIN
from tests.support.relay import Relay

SAMPLE_SECONDS = 0.25
WINDOW_SECONDS = 5.0
# Bytes on the wire the push does not send through its budget: each connection's key exchange and
# login, and the hashing connection's few requests (tens of KiB together), with room to spare.
LOGIN_BYTES = 512 * 1024
FIGURES: dict = {}


@pytest.fixture(scope="module", autouse=True)
def report_figures():
    yield
    if FIGURES:
        print("\nbandwidth figures (relay's upload over the busiest 5 s, against the limit):")
        for name, value in FIGURES.items():
            print(f"  {name}: {value}")


class Sampler:
    """relay.bytes_up every SAMPLE_SECONDS from a thread, for as long as the `with` block runs (of
    several relays: their sum)."""

    def __init__(self, *relays: Relay):
        self.relays = relays
        self.samples: list[tuple[float, int]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bandwidth-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), sum(relay.bytes_up for relay in self.relays)))
            if self.stopping.wait(SAMPLE_SECONDS):
                self.samples.append((time.monotonic(), sum(relay.bytes_up for relay in self.relays)))
                return

    def __enter__(self) -> "Sampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(10)

    def most_in(self, seconds: float) -> int:
        """The most bytes counted between two samples at most `seconds` apart."""
        return self.busiest(seconds)[0]

    def busiest(self, seconds: float) -> tuple[int, float]:
        """(bytes, seconds between the samples) of the two samples at most `seconds` apart with the most
        bytes between them: the figures' rate (the samples are about SAMPLE_SECONDS apart, not exactly)."""
        best = (0, seconds)
        for index, (start, count) in enumerate(self.samples):
            for later, later_count in self.samples[index + 1:]:
                if later - start > seconds:
                    break
                best = max(best, (later_count - count, later - start))
        return best

    def figure(self, limit: float) -> str:
        nbytes, span = self.busiest(WINDOW_SECONDS)
        return (f"busiest {span:.2f} s: {nbytes / MIB:.1f} MiB, {nbytes / span / MIB:.2f} MiB/s "
                f"= {nbytes / span / limit:.3f} x the limit")


def run_push(tmp_path: Path, server, relay: Relay | dict, collections_root: Path, hosts: dict[str, Path],
             args: dict, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    """One play: multipush.sftp.push to every host (name -> its dest) through the relay (or each host
    through its own: name -> relay), forks enough for all at once; returns the run and each host's
    registered result."""
    relays = relay if isinstance(relay, dict) else dict.fromkeys(hosts, relay)
    known_hosts = tmp_path / "known_hosts_relay"
    known_hosts.write_text("".join(sorted({each.known_hosts_line(server.known_hosts_line())
                                           for each in relays.values()})))
    inventory = tmp_path / "inventory.ini"
    inventory.write_text("[targets]\n" + "".join(
        inventory_line(server.host, relays[name].port, server.user, known_hosts, server.client_key, name=name,
                       dest_path=str(dest)) + "\n" for name, dest in hosts.items()))
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    play = [{"name": "Bandwidth test play", "hosts": "targets", "gather_facts": False, "tasks": [
        {"name": "Push", "multipush.sftp.push": dict(args, dest="{{ dest_path }}"), "register": "pushed",
         "ignore_errors": True},
        {"name": "Save the result", "delegate_to": "localhost", "check_mode": False, "diff": False,
         "ansible.builtin.copy": {"content": "{{ pushed | to_json }}", "mode": "0600",
                                  "dest": f"{results}/{{{{ inventory_hostname }}}}.json"}},
    ]}]
    playbook = tmp_path / "play.yml"
    playbook.write_text(json.dumps(play, indent=2))
    completed = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), "--forks", str(max(5, len(hosts))), str(playbook)],
        env=ansible_env(tmp_path, collections_root), capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, check=False)
    return completed, {path.stem: json.loads(path.read_text()) for path in results.glob("*.json")}


def test_bandwidth_limit_holds_over_any_five_seconds(sshd, tmp_path, collections_root):
    limit = 5 * MIB  # 40 MiB at 5 MiB/s: 8 s, so there are 5 s windows to measure
    source = random_file(tmp_path / "src" / "big.img", 40 * MIB, seed=3)
    dest = tmp_path / "dest" / "big.img"
    dest.parent.mkdir()
    with Relay((sshd.host, sshd.port), rtt_ms=0) as relay, Sampler(relay) as sampler:
        completed, results = run_push(tmp_path, sshd, relay, collections_root, {"target": dest},
                                      {"src": str(source), "bandwidth_limit": "5M", "progress_interval": 2})
    result = results["target"]
    assert completed.returncode == 0 and not result.get("failed"), completed.stdout[-4000:]
    assert sha256(dest) == sha256(source)
    assert result["bandwidth_limit"] == {"host": limit, "total": None}
    most = sampler.most_in(WINDOW_SECONDS)
    FIGURES["bandwidth_limit 5M, 40 MiB"] = (f"{sampler.figure(limit)}; {relay.bytes_up / MIB:.1f} MiB up in all, "
                                             f"{result['connections']} connections, write_size {result['write_size']}")
    assert most <= 1.05 * limit * WINDOW_SECONDS + LOGIN_BYTES
    assert relay.bytes_up >= 40 * MIB  # the measured bytes are the push's
    assert "(limit 5.0 MiB/s host)" in completed.stdout


def test_a_low_limit_makes_the_write_requests_smaller(sshd, tmp_path, collections_root):
    """At 1 MiB/s a 255 KiB request would be a quarter of a second of the budget: requests are cut to
    1/20 s at the limit, so a single one never decides a window."""
    source = random_file(tmp_path / "src" / "small.img", 3 * MIB, seed=7)
    dest = tmp_path / "dest" / "small.img"
    dest.parent.mkdir()
    with Relay((sshd.host, sshd.port), rtt_ms=0) as relay:
        completed, results = run_push(tmp_path, sshd, relay, collections_root, {"target": dest},
                                      {"src": str(source), "bandwidth_limit": "1M"})
    result = results["target"]
    assert completed.returncode == 0 and not result.get("failed"), completed.stdout[-4000:]
    assert sha256(dest) == sha256(source)
    assert result["write_size"] == int(MIB * 0.05)


def test_a_tree_of_small_files_keeps_to_the_limit(sshd, tmp_path, collections_root):
    """Small files cost opens, attributes, closes and renames besides their data: those requests take
    from the budget too, so what the wire carries keeps to the limit."""
    limit = 1 * MIB
    tree = tmp_path / "src" / "tree"
    for number in range(2000):  # 2000 files of 3 KiB: 5.9 MiB of data, twice as many requests
        path = tree / f"dir{number % 20:02d}" / f"file{number:04d}.cfg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(3 * 1024))
    dest = tmp_path / "dest" / "tree"
    dest.parent.mkdir()
    with Relay((sshd.host, sshd.port), rtt_ms=0) as relay, Sampler(relay) as sampler:
        completed, results = run_push(tmp_path, sshd, relay, collections_root, {"target": dest},
                                      {"src": f"{tree}/", "bandwidth_limit": "1M"})
    result = results["target"]
    assert completed.returncode == 0 and not result.get("failed"), completed.stdout[-4000:]
    assert result["files_sent"] == 2000
    FIGURES["bandwidth_limit 1M, 2000 files of 3 KiB"] = (f"{sampler.figure(limit)}; "
                                                          f"{relay.bytes_up / MIB:.1f} MiB up in all")
    assert sampler.most_in(WINDOW_SECONDS) <= 1.05 * limit * WINDOW_SECONDS + LOGIN_BYTES


def test_total_bandwidth_limit_holds_for_three_hosts_through_one_uplink(sshd, tmp_path, collections_root):
    limit = 6 * MIB  # three hosts of 16 MiB each: 8 s at the total
    source = random_file(tmp_path / "src" / "big.img", 16 * MIB, seed=4)
    hosts = {f"host{number}": tmp_path / f"dest{number}" / "big.img" for number in range(3)}
    for dest in hosts.values():
        dest.parent.mkdir()
    with Relay((sshd.host, sshd.port), rtt_ms=0) as relay, Sampler(relay) as sampler:
        completed, results = run_push(tmp_path, sshd, relay, collections_root, hosts,
                                      {"src": str(source), "total_bandwidth_limit": "6M", "progress_interval": 2})
    assert completed.returncode == 0, completed.stdout[-4000:]
    for name, dest in hosts.items():
        assert not results[name].get("failed"), results[name]
        assert results[name]["bandwidth_limit"] == {"host": None, "total": limit}
        assert sha256(dest) == sha256(source)
    most = sampler.most_in(WINDOW_SECONDS)
    FIGURES["total_bandwidth_limit 6M, 3 hosts x 16 MiB"] = (
        f"{sampler.figure(limit)}; {relay.bytes_up / MIB:.1f} MiB up in all")
    # Each host alone would send at 6 MiB/s: only one budget shared by the three keeps to this.
    assert most <= 1.05 * limit * WINDOW_SECONDS + len(hosts) * LOGIN_BYTES
    assert "(limit 6.0 MiB/s total)" in completed.stdout


def test_host_and_total_limits_hold_together(sshd, tmp_path, collections_root):
    """Two hosts, each through its own relay (so each host's bytes are measured), each limited to
    3 MiB/s and both to 5 MiB/s: the total binds, and every limit holds over any 5 s."""
    host_limit, total_limit = 3 * MIB, 5 * MIB
    source = random_file(tmp_path / "src" / "big.img", 16 * MIB, seed=6)
    hosts = {f"host{number}": tmp_path / f"dest{number}" / "big.img" for number in range(2)}
    for dest in hosts.values():
        dest.parent.mkdir()
    with Relay((sshd.host, sshd.port), rtt_ms=0) as first, Relay((sshd.host, sshd.port), rtt_ms=0) as second:
        relays = dict(zip(hosts, (first, second)))
        with Sampler(first) as one, Sampler(second) as other, Sampler(first, second) as both:
            completed, results = run_push(tmp_path, sshd, relays, collections_root, hosts, {
                "src": str(source), "bandwidth_limit": "3M", "total_bandwidth_limit": "5M", "progress_interval": 2})
    assert completed.returncode == 0, completed.stdout[-4000:]
    for name, dest in hosts.items():
        assert results[name]["bandwidth_limit"] == {"host": host_limit, "total": total_limit}
        assert sha256(dest) == sha256(source)
    FIGURES["bandwidth_limit 3M + total_bandwidth_limit 5M, 2 hosts x 16 MiB"] = (
        f"total {both.figure(total_limit)}; host0 {one.figure(host_limit)}; host1 {other.figure(host_limit)}")
    assert both.most_in(WINDOW_SECONDS) <= 1.05 * total_limit * WINDOW_SECONDS + len(hosts) * LOGIN_BYTES
    for sampler in (one, other):
        assert sampler.most_in(WINDOW_SECONDS) <= 1.05 * host_limit * WINDOW_SECONDS + LOGIN_BYTES
    assert "(limit 3.0 MiB/s host, 5.0 MiB/s total)" in completed.stdout


@pytest.mark.parametrize("option, value, says", [
    ("bandwidth_limit", 0, "must be more than zero"),
    ("bandwidth_limit", "-5M", "is not a rate"),
    ("bandwidth_limit", "fast", "is not a rate"),
    ("total_bandwidth_limit", "10Q", "is not a rate"),
])
def test_a_wrong_limit_fails_before_anything_is_sent(sshd, tmp_path, collections_root, option, value, says):
    source = random_file(tmp_path / "src" / "small.img", MIB, seed=5)
    dest = tmp_path / "dest" / "small.img"
    dest.parent.mkdir()
    with Relay((sshd.host, sshd.port), rtt_ms=0) as relay:
        completed, results = run_push(tmp_path, sshd, relay, collections_root, {"target": dest},
                                      {"src": str(source), option: value})
        accepted = relay.accepted
    result = results["target"]
    assert result.get("failed"), completed.stdout[-4000:]
    assert f"{option}=" in result["msg"] and says in result["msg"], result["msg"]
    assert accepted == 0  # the relay never saw a connection
    assert list(dest.parent.iterdir()) == []
