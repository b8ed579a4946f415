"""Unit tests for plugins/plugin_utils/_bandwidth.py: rates as users write them, and the budgets'
arithmetic on a fake clock (no test here times anything). The real thing, measured by a relay's byte
counts under ansible-playbook, is tests/integration/test_bandwidth_limits.py."""

from __future__ import annotations

import heapq
import multiprocessing
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ansible_collections.multipush.sftp.plugins.plugin_utils import _bandwidth
from ansible_collections.multipush.sftp.plugins.plugin_utils._bandwidth import (
    BURST_SECONDS, Budget, FileBucket, LocalBucket, SharedBucket, for_push, parse_rate, total_state_file,
    wire_bytes,
)
from ansible_collections.multipush.sftp.plugins.plugin_utils._plan import PlanError
from ansible_collections.multipush.sftp.plugins.plugin_utils._progress import Progress
from tests.support.output_format import line_patterns

MIB = 1024 * 1024
REQUEST = 256 * 1024


# -- parse_rate ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("100M", 100 * MIB), ("100MiB", 100 * MIB), ("50MB", 50e6), ("1.5G/s", 1.5 * 1024**3), ("250000", 250000),
    ("800Mbit", 100e6), ("800mbps", 100e6), ("8kbit", 1000), ("64K", 65536), ("64KB", 64000), ("2T", 2 * 1024**4),
    (" 16 M ", 16 * MIB), (1000, 1000.0), (12.5, 12.5), (None, None), ("", None), ("  ", None),
])
def test_rates_with_units(value, expected):
    assert parse_rate(value, "bandwidth_limit") == expected


@pytest.mark.parametrize("value", [0, "0", -1, "-1", "-5M", "fast", "10Q", True, False, "M", "1e6", "0.0M",
                                   float("inf"), float("nan")])
def test_wrong_rates_name_the_option(value):
    with pytest.raises(PlanError) as failure:
        parse_rate(value, "total_bandwidth_limit")
    assert str(failure.value).startswith(f"total_bandwidth_limit={value!r} ")


# -- the budget on a fake clock ------------------------------------------------------------------

class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def simulate(workers: list[tuple[Budget, int]], requests: int, clock: FakeClock, size=lambda index: REQUEST,
             busy: float = 0.0005) -> dict[int, list[tuple[float, int]]]:
    """Greedy senders on a fake clock, interleaved in time order as processes would be: each worker
    (its budget, its host) asks again `busy` seconds after it sent; with both limits a host's workers
    take turns (Budget.turn). Runs Budget.steps as take() does. Returns per host the (send time,
    bytes) of every request."""
    events = []  # (time, sequence, worker, generator or None: wants its turn)
    sequence = 0
    waiting: dict = {}  # turn key -> workers waiting for it
    holder: dict = {}  # turn key -> worker holding it
    sends: dict[int, list] = {host: [] for _budget, host in workers}
    sizes: dict[int, int] = {}

    def push(at, worker, generator=None):
        nonlocal sequence
        sequence += 1
        heapq.heappush(events, (at, sequence, worker, generator))

    def turn_key(worker):
        budget, host = workers[worker]
        return host if budget.host is not None and budget.total is not None else ("alone", worker)

    def begin(worker):
        nonlocal sent
        sizes[worker] = size(sent)
        sent += 1
        generator = workers[worker][0].steps(sizes[worker])
        push(max(next(generator), clock.now), worker, generator)

    for worker in range(len(workers)):
        push(clock.now, worker)
    sent = 0
    while events and sent <= requests:
        at, _sequence, worker, generator = heapq.heappop(events)
        clock.now = max(clock.now, at)
        key = turn_key(worker)
        if generator is None:  # wants its turn
            if key in holder:
                waiting.setdefault(key, []).append(worker)
            else:
                holder[key] = worker
                begin(worker)
            continue
        try:
            push(max(next(generator), clock.now), worker, generator)
            continue
        except StopIteration:
            pass
        sends[workers[worker][1]].append((clock.now, sizes[worker]))
        del holder[key]
        if waiting.get(key):
            holder[key] = waiting[key].pop(0)
            begin(holder[key])
        push(clock.now + busy, worker)
    return {host: sorted(host_sends) for host, host_sends in sends.items()}


def greedy(budget: Budget, callers: int, requests: int, size=lambda index: REQUEST, busy: float = 0.0005):
    """`callers` workers of one host on `budget`: the (send time, bytes) of every request."""
    return simulate([(budget, 0)] * callers, requests, budget.clock, size, busy)[0]


def most_in_window(sends: list[tuple[float, int]], seconds: float) -> int:
    """The most bytes sent in any `seconds` (the worst window starts at a send)."""
    best = total = 0
    low = 0
    for at, nbytes in sends:
        total += nbytes
        while sends[low][0] < at - seconds:
            total -= sends[low][1]
            low += 1
        best = max(best, total)
    return best


def local_budget(host: float | None, total: float | None = None) -> Budget:
    clock = FakeClock()
    return Budget(LocalBucket(host, "host") if host else None, LocalBucket(total, "total") if total else None,
                  clock=clock, sleep=clock.sleep)


@pytest.mark.parametrize("rate", [16 * MIB, 100e6, 2 * MIB])
@pytest.mark.parametrize("callers", [1, 4, 16])
def test_any_five_seconds_keep_to_the_limit_and_greedy_callers_reach_it(rate, callers):
    budget = local_budget(rate)
    requests = int(rate * 30 / REQUEST)  # 30 s of sending
    sends = greedy(budget, callers, requests)
    assert most_in_window(sends, 5.0) <= 1.05 * rate * 5 + REQUEST
    assert most_in_window(sends, 1.0) <= rate * (1 + BURST_SECONDS) + REQUEST
    sent = sum(nbytes for _at, nbytes in sends)
    assert sent / (sends[-1][0] - sends[0][0]) >= 0.95 * rate


def test_odd_sizes_and_callers_that_come_back_late():
    rate = 8 * MIB
    budget = local_budget(rate)
    sizes = [1, 300, REQUEST, 65536, 40000, REQUEST, 7]
    sends = greedy(budget, 3, 3000, size=lambda index: sizes[index % len(sizes)], busy=0.02)
    assert most_in_window(sends, 5.0) <= 1.05 * rate * 5 + REQUEST


def test_after_an_idle_spell_only_the_burst_goes_at_once():
    rate = 4 * MIB
    budget = local_budget(rate)
    greedy(budget, 2, 100)
    budget.clock.now += 60  # nothing sent for a minute: no credit piles up
    sends = greedy(budget, 8, 400)
    assert most_in_window(sends, 0.001) <= rate * BURST_SECONDS + REQUEST
    assert most_in_window(sends, 5.0) <= 1.05 * rate * 5 + REQUEST


def test_a_request_larger_than_the_burst_waits_for_its_whole_slot():
    rate = 1 * MIB
    budget = local_budget(rate)
    sends = greedy(budget, 4, 200, size=lambda index: 4 * MIB)  # 4 s each
    assert most_in_window(sends, 5.0) <= rate * 5 + 4 * MIB
    assert [at for at, _nbytes in sends[:3]] == [1000.0, 1004.0, 1008.0]


@pytest.mark.parametrize("host_rates", [[4 * MIB, 10 * MIB, 30 * MIB], [2 * MIB, 3 * MIB, 4 * MIB]])
def test_host_and_total_limits_hold_together(host_rates):
    """Three hosts of four workers, each host under its own limit, all under one total: every limit
    holds over any 5 s, and what is reached is the total, or the hosts' sum when that is less."""
    clock = FakeClock()
    total = LocalBucket(20 * MIB, "total")
    budgets = [Budget(LocalBucket(rate, "host"), total, clock=clock, sleep=clock.sleep) for rate in host_rates]
    sends = simulate([(budgets[host], host) for host in range(3) for _worker in range(4)], 4000, clock)
    everything = sorted(send for host_sends in sends.values() for send in host_sends)
    assert most_in_window(everything, 5.0) <= 1.05 * 20 * MIB * 5 + REQUEST
    for host, rate in enumerate(host_rates):
        assert most_in_window(sends[host], 5.0) <= 1.05 * rate * 5 + REQUEST
    span = everything[-1][0] - everything[0][0]
    assert sum(nbytes for _at, nbytes in everything) / span >= 0.95 * min(20 * MIB, sum(host_rates))


def test_hosts_under_one_total_share_it():
    clock = FakeClock()
    total = LocalBucket(30 * MIB, "total")
    budgets = [Budget(None, total, clock=clock, sleep=clock.sleep) for _host in range(3)]
    sends = simulate([(budgets[host], host) for host in range(3) for _worker in range(3)], 3000, clock)
    everything = sorted(send for host_sends in sends.values() for send in host_sends)
    assert most_in_window(everything, 5.0) <= 1.05 * 30 * MIB * 5 + REQUEST
    assert sum(nbytes for _at, nbytes in everything) / (everything[-1][0] - everything[0][0]) >= 0.95 * 30 * MIB
    assert min(len(host_sends) for host_sends in sends.values()) >= 900  # first come, first served: even shares


def test_take_sleeps_until_the_slot():
    budget = local_budget(1 * MIB)
    clock = budget.clock
    budget.take(MIB // 10)  # within the burst: at once
    assert clock.now == 1000.0
    budget.take(MIB)  # a second of sending after 0.1 s already reserved
    assert clock.now == pytest.approx(1000.1)


def test_request_size_and_wire_cost():
    assert wire_bytes(REQUEST + 29) == REQUEST + 29 + 9 * _bandwidth.SSH_PACKET_OVERHEAD
    assert wire_bytes(10) == 10 + _bandwidth.SSH_PACKET_OVERHEAD
    assert wire_bytes(REQUEST) / REQUEST < 1.002  # the framing is a small part of a large request
    assert local_budget(100 * MIB).largest_request == int(100 * MIB * _bandwidth.REQUEST_SECONDS)
    assert local_budget(50 * MIB, 1 * MIB).largest_request == int(MIB * _bandwidth.REQUEST_SECONDS)
    assert local_budget(1000).largest_request == _bandwidth.MIN_REQUEST


# -- shared across processes ---------------------------------------------------------------------

def _reserve_many(bucket, count: int, nbytes: int, results) -> None:
    results.put([bucket.reserve(nbytes, 1000.0) for _index in range(count)])


def _run_in_two_processes(bucket, count: int, nbytes: int) -> list[float]:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=_reserve_many, args=(bucket, count, nbytes, results)) for _index in range(2)]
    for process in processes:
        process.start()
    starts = [results.get(timeout=60) for _process in processes]
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    return sorted(starts[0] + starts[1])


@pytest.mark.parametrize("kind", ["file", "shared memory"])
def test_two_processes_share_one_budget(kind, tmp_path):
    """Two processes reserve at once on one budget (clock stopped, so every slot lies ahead): no
    reservation is lost or given twice; the slots follow one another at the rate."""
    rate, nbytes, count = 1 * MIB, 64 * 1024, 300
    if kind == "file":
        bucket = FileBucket(rate, str(tmp_path / "total-test.budget"))
    else:
        bucket = SharedBucket(rate, multiprocessing.get_context("fork"))
    starts = _run_in_two_processes(bucket, count, nbytes)
    step = nbytes / rate
    assert len(set(starts)) == 2 * count
    expected = [1000.0 + max(0.0, (index + 1) * step - BURST_SECONDS) for index in range(2 * count)]
    assert starts == pytest.approx(expected)
    with bucket.locked() as cell:  # the next free time covers every reservation of both
        assert cell[0] == pytest.approx(1000.0 + 2 * count * step)


def test_the_total_budget_lives_in_a_private_directory_and_files_of_runs_that_are_over_go(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    directory = _bandwidth.runtime_dir()
    assert directory == str(tmp_path / "multipush")
    assert os.stat(directory).st_mode & 0o777 == 0o700
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(gone.stdout)
    hour_ago, month_ago = time.time() - 3600, time.time() - 30 * 86400
    files = {  # name: (mtime, removed?)
        f"total-{dead_pid}-over.budget": (hour_ago, True),  # its run is gone, untouched past the grace
        f"fanout-{dead_pid}-ledger.json": (hour_ago, False),  # another kind: the ledger prunes its own
        f"total-{dead_pid}-just-over.budget": (time.time(), False),  # gone, but its workers may still finish
        f"total-{os.getpid()}-live.budget": (hour_ago, False),  # its run lives
        f"total-{os.getpid()}-reused.budget": (month_ago, True),  # a month untouched: a reused pid
        "total-notapid.budget": (month_ago, False),  # not a run's file
    }
    for name, (mtime, _removed) in files.items():
        (Path(directory) / name).write_bytes(struct.pack("=d", 5.0))
        os.utime(Path(directory) / name, (mtime, mtime))
    path = total_state_file(f"{os.getpid()}-some-task")
    assert os.path.dirname(path) == directory and path == total_state_file(f"{os.getpid()}-some-task")
    assert path != total_state_file(f"{os.getpid()}-other-task")
    assert os.path.basename(path).startswith(f"total-{os.getpid()}-")
    assert {name for name, (_mtime, removed) in files.items() if not (Path(directory) / name).exists()} == \
        {name for name, (_mtime, removed) in files.items() if removed}
    os.chmod(directory, 0o755)
    with pytest.raises(PlanError, match="total_bandwidth_limit"):
        _bandwidth.runtime_dir()
    os.chmod(directory, 0o700)


def _options(**values):
    settings = dict(bandwidth_limit=None, total_bandwidth_limit=None, run_key="")
    settings.update(values)
    return SimpleNamespace(**settings)


def test_a_push_gets_the_budget_its_options_ask_for(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert for_push(_options()) is None  # no limit: nothing on the data path
    host = for_push(_options(bandwidth_limit=5e6))
    assert [(type(bucket), bucket.rate) for bucket in host.buckets] == [(SharedBucket, 5e6)] and host.turn is None
    both = for_push(_options(bandwidth_limit=5e6, total_bandwidth_limit=9e6, run_key="77-task"))
    assert [(type(bucket), bucket.name) for bucket in both.buckets] == [(SharedBucket, "host"), (FileBucket, "total")]
    assert both.turn is not None
    alone = for_push(_options(total_bandwidth_limit=9e6))  # no run key: the push keeps its total to itself
    assert [type(bucket) for bucket in alone.buckets] == [SharedBucket]


def test_progress_lines_show_the_limits():
    lines = []
    progress = Progress("web1", 5.0, lambda text, verbosity: lines.append(text), clock=lambda: 1000.0)
    progress.show_limits(50 * MIB, 100 * MIB)
    progress.start(100 * MIB, 1)
    assert "/s (limit 50.0 MiB/s host, 100.0 MiB/s total), ETA" in progress.line()
    assert line_patterns("web1").progress.match(progress.line())
    progress.show_limits(None, 12.5e6)
    assert "/s (limit 11.9 MiB/s total), ETA" in progress.line()
    progress.show_limits(None, None)
    assert "(limit" not in progress.line() and line_patterns("web1").progress.match(progress.line())
