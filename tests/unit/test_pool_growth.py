"""Unit tests for plugins/plugin_utils/_pool_growth.py: the pool's size with `connections: auto` and
with a fixed count, driven with a made-up clock and byte counts (pure logic)."""

import pytest

from ansible_collections.multipush.sftp.plugins.plugin_utils._pool_growth import (
    MIN_WINDOW_SECONDS, SMALL_PUSH_BYTES, START_LONG, START_SHORT, PoolGrowth,
)

MIB = 1 << 20


class Cpu:
    """A made-up /proc/stat: `idle` share of the time idle, advanced by the Path's clock."""

    def __init__(self, idle: float = 0.5):
        self.idle, self.seconds = idle, 0.0

    def __call__(self):
        return self.seconds * self.idle * 200, self.seconds * 200  # two cores, 100 ticks a second


def growth_of(ceiling: int, auto: bool = True, idle: float = 0.5) -> PoolGrowth:
    return PoolGrowth(ceiling, auto, cpu=Cpu(idle))


class Path:
    """A made-up path: `rate(count)` bytes per second for a pool of `count`; drives a PoolGrowth the
    way the conductor does, every `step` seconds, with every admitted connection up at once."""

    def __init__(self, growth: PoolGrowth, rate, step: float = 0.05):
        self.growth, self.rate, self.step = growth, rate, step
        self.now = 0.0
        self.counts = [growth.count]

    def run(self, seconds: float, queued: int = 100) -> int:
        for _step in range(int(seconds / self.step)):
            self.now += self.step
            if isinstance(self.growth.cpu, Cpu):
                self.growth.cpu.seconds = self.now
            self.growth.add_bytes(int(self.rate(self.growth.count) * self.step))
            changed = self.growth.tick(self.now, self.growth.count, queued)
            if changed is not None:
                self.counts.append(changed)
        return self.growth.count


def cpu_bound(count: int) -> float:
    """Two cores: a second connection helps, more only compete."""
    return {1: 150 * MIB, 2: 210 * MIB}.get(count, 205 * MIB)


def window_bound(count: int) -> float:
    """50 ms: 2 MiB per round trip per connection, until the CPUs cap the pool at 9 connections' worth."""
    return min(count, 9) * 40 * MIB


def test_a_short_cpu_bound_path_settles_on_two():
    growth = growth_of(16)
    growth.note_round_trip(0.0004)
    assert growth.early_logins(tree_work=64) == 1  # a login is soon done after the survey
    assert growth.start(work=64, nbytes=1 << 30) == START_SHORT
    path = Path(growth, cpu_bound)
    assert path.run(5) == 2
    assert path.counts == [2, 4, 2]  # tried 4, no faster: back to 2
    assert growth.settled and growth.reason.startswith("auto: 2->4 -2%: back to 2 (2: 210 MiB/s, 4: 205 MiB/s)")
    assert growth.reason.endswith("round trip 0.4 ms")


def test_a_long_path_grows_while_doubling_pays_and_steps_back_when_it_does_not():
    growth = growth_of(16)
    growth.note_round_trip(0.08)
    growth.note_round_trip(0.05)  # the smallest of the round trips timed
    assert growth.early_logins(tree_work=64) == START_LONG
    assert growth.start(work=64, nbytes=1 << 30) == START_LONG
    path = Path(growth, window_bound)
    assert path.run(10) == 8
    assert path.counts == [8, 16, 8]  # 16 carried only 12% more than 8
    assert growth.reason == "auto: 8->16 +12%: back to 8 (8: 320 MiB/s, 16: 360 MiB/s); round trip 50.0 ms"


def test_growth_stops_at_max_connections():
    growth = growth_of(12)
    growth.note_round_trip(0.05)
    growth.start(work=64, nbytes=1 << 30)
    path = Path(growth, lambda count: count * 40 * MIB)
    assert path.run(10) == 12 and path.counts == [8, 12]
    assert growth.settled and growth.reason.startswith("auto: reached max_connections at 12")
    narrow = growth_of(4)
    narrow.note_round_trip(0.05)
    assert narrow.start(work=64, nbytes=1 << 30) == 4
    assert narrow.settled and narrow.reason == "auto: max_connections=4 reached at the start; round trip 50.0 ms"


def test_the_pool_never_outgrows_the_work_to_send():
    growth = growth_of(16)
    growth.note_round_trip(0.05)
    assert growth.start(work=3, nbytes=48 * MIB) == 3
    assert growth.settled and growth.reason.startswith("auto: 3 jobs to send")
    assert Path(growth, lambda count: count * 40 * MIB).run(5) == 3


def test_no_growth_once_the_last_jobs_are_handed_out():
    growth = growth_of(16)
    growth.start(work=64, nbytes=1 << 30)
    path = Path(growth, lambda count: count * 40 * MIB)
    path.run(MIN_WINDOW_SECONDS / 2)
    assert path.run(5, queued=0) == START_SHORT  # some connection may be idle: the rate says nothing
    assert growth.reason.startswith("auto: the last jobs went out at 2")


@pytest.mark.parametrize("work, nbytes, expected", [
    (1, 7, 1), (4, SMALL_PUSH_BYTES - 1, 1), (5, 10 * 1024, START_SHORT), (2, SMALL_PUSH_BYTES, START_SHORT),
], ids=["one-small-file", "four-small-jobs", "five-jobs", "one-mib"])
def test_a_small_push_uses_one_connection(work, nbytes, expected):
    assert growth_of(16).start(work, nbytes) == expected


def test_nothing_to_send_keeps_one():
    growth = growth_of(16)
    assert growth.start(0, 0) == 1 and growth.settled and growth.reason == "nothing to send"


def test_a_fixed_count_is_used_as_far_as_there_is_work():
    growth = growth_of(8, auto=False)
    growth.note_round_trip(0.05)
    assert growth.early_logins(tree_work=100) == START_LONG
    assert growth.start(work=100, nbytes=1 << 30) == 8 and growth.reason == "fixed by connections=8"
    assert Path(growth, lambda count: count * 40 * MIB).run(5) == 8  # never measured, never changed
    few = growth_of(8, auto=False)
    assert few.start(work=1, nbytes=7) == 1 and few.reason == "fixed by connections=8; 1 job to send"


def test_connections_that_never_come_up_do_not_stall_the_measurement():
    growth = growth_of(16)
    growth.start(work=64, nbytes=1 << 30)
    now = 0.0
    for _step in range(400):  # 20 s with only one of the two connections up
        now += 0.05
        growth.add_bytes(2 * MIB)
        growth.tick(now, up=1, queued=100)
    assert growth.steps, "a window was measured with the connections that came up"


def test_the_pool_never_outgrows_the_workers_there_are():
    growth = growth_of(16)
    growth.note_round_trip(0.05)
    assert growth.start(work=64, nbytes=1 << 30, workers=3) == 3  # no more could be forked
    assert Path(growth, lambda count: count * 40 * MIB).run(5) == 3


def test_no_growth_while_the_controllers_cpus_are_busy():
    growth = growth_of(16, idle=0.05)
    growth.start(work=64, nbytes=1 << 30)
    path = Path(growth, lambda count: count * 40 * MIB)
    assert path.run(5) == START_SHORT and path.counts == [START_SHORT]
    assert growth.reason.startswith("auto: the controller's CPUs were busy at 2 (5% idle) (2: 80 MiB/s)")


def test_the_first_round_trips_of_a_window_are_not_measured():
    growth = growth_of(16)
    growth.note_round_trip(0.05)
    growth.start(work=64, nbytes=1 << 30)
    growth.add_bytes(64 * MIB)  # the burst that fills the new connections' windows
    path = Path(growth, lambda count: count * 40 * MIB)
    path.run(0.6)
    assert growth.steps == [] or growth.steps[0][1] == pytest.approx(8 * 40 * MIB, rel=0.1)
    path.run(0.6)
    assert growth.steps[0][1] == pytest.approx(8 * 40 * MIB, rel=0.1), growth.steps


# -- what the work pays logins for (long paths) -------------------------------------------------------

VPOD_SIZES = (32 * MIB, 32 * MIB) + (16 * 1024,) * 300  # 2 images, 300 small files: five batches


def long_path(login_seconds: float | None) -> PoolGrowth:
    growth = growth_of(16)
    growth.note_round_trip(0.05)
    if login_seconds is not None:
        growth.note_login(login_seconds)
    return growth


def test_a_connection_is_worth_a_login_only_with_a_logins_worth_of_work():
    # One stream: 69 MiB at a window per round trip (34.5 round trips) plus five batches of three:
    # 49.5 round trips, 2.5 s at 50 ms.
    assert long_path(0.45).worth(VPOD_SIZES) == 5
    assert long_path(0.25).worth(VPOD_SIZES) == 9  # cheaper logins: more of them pay
    assert long_path(0.45).worth((1 << 30,)) == 56  # a big file: the ceiling decides
    assert long_path(0.45).worth((3000,) * 2000) == 10  # 32 batches of small files, three round trips each
    assert long_path(0.45).worth((100,)) == 1
    assert long_path(None).worth(VPOD_SIZES) is None  # no login timed yet: no bound
    short = growth_of(16)
    short.note_round_trip(0.0004)
    short.note_login(0.05)
    assert short.worth(VPOD_SIZES) is None  # a short path starts with START_SHORT


def test_a_small_push_on_a_long_path_starts_and_stays_with_what_it_pays_for():
    growth = long_path(0.45)
    assert growth.early_logins(tree_work=304, sizes=VPOD_SIZES) == 5
    assert growth.start(work=304, nbytes=sum(VPOD_SIZES), worth=growth.worth(VPOD_SIZES)) == 5
    assert growth.settled and growth.limit == 5
    assert growth.reason == "auto: 5: the work to send pays for no more logins of 0.45 s; round trip 50.0 ms"
    assert Path(growth, window_bound).run(5) == 5


def test_no_doubling_when_what_is_left_goes_out_before_more_could_log_in():
    growth = long_path(0.45)
    growth.start(work=64, nbytes=400 * MIB)  # 8 at the start; at 320 MiB/s the rest is gone in 0.7 s
    path = Path(growth, window_bound)
    assert path.run(5) == 8 and path.counts == [8]
    assert growth.reason.startswith("auto: what is left goes out at 8 sooner than more could log in (8: 320 MiB/s)")
    plenty = long_path(0.45)
    plenty.start(work=64, nbytes=1 << 30)
    tried = Path(plenty, window_bound)
    tried.run(5)
    assert tried.counts == [8, 16, 8]  # a gigabyte left: the doubling is tried (and undone: +12%)
