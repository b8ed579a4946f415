# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""How many connections a push uses: sized by the work it has to send, and with `connections: auto`
grown while a wider pool still carries more.

One SSH stream carries at most one channel window (2 MiB with OpenSSH) per round trip, so a long
path needs many connections; but each connection costs a login, an sshd process and CPU on both
ends, so on a short path or a small machine more connections only compete for the same cores. Which
of the two holds depends on the path and on both ends' CPUs, which the controller cannot know in
advance, so the push measures: the round trip at login, then the pool's aggregate rate over windows
of several round trips. The pool doubles while a doubling raised the rate by at least MIN_GAIN; when
one did not, it goes back to the size that was about as fast, and stays there. It never exceeds the
work left to hand out, nor the ceiling (`max_connections`, or the fixed `connections`).

Pure logic: the conductor (_push) feeds it the round trip, the bytes sent and the clock, and gives
the engine the count it returns.
"""

from __future__ import annotations

from typing import Callable

from ansible_collections.multipush.sftp.plugins.plugin_utils._plan import (
    BATCH_MAX_BYTES, BATCH_MAX_FILES, SMALL_FILE_LIMIT,
)

# From this round trip on, one stream's window caps it far below what a core can encrypt, and a
# login takes long enough that starting a few during the survey pays. Well above what a busy machine
# adds to a short path's round trip (a loopback measured up to 11 ms while its CPUs were busy).
LONG_PATH_SECONDS = 0.020
START_SHORT = 2
# On a long path a pool is limited by round trips first (windows, and the small files' batches), and
# its logins overlap the survey: start as wide as a push to one host used before it measured.
START_LONG = 8
# Below this many bytes (and with only a few jobs) one connection finishes before another logs in.
SMALL_PUSH_BYTES = 1 << 20
SMALL_PUSH_JOBS = 4
# A doubling of the pool must raise the rate by this much to be kept.
MIN_GAIN = 0.15
# A measurement window: long enough to average over many round trips and chunk boundaries.
MIN_WINDOW_SECONDS = 0.5
WINDOW_ROUND_TRIPS = 10
MAX_WINDOW_SECONDS = 3.0
# Connections that do not come up within this long are left out of the measurement.
LOGIN_WAIT_SECONDS = 10.0
# A window starts this long (or two round trips) after the pool is up: the first round trip of new
# connections fills empty windows and socket buffers at once, a burst that is not the pool's rate.
WARM_UP_SECONDS = 0.1
# Less idle than this over a window, the controller's own cores are the limit: another connection
# (a process on each end) would only take CPU from the ones there are.
BUSY_CPU_IDLE = 0.15
MIB = 1 << 20
# What one stream moves per round trip on a long path: OpenSSH's channel window.
WINDOW_BYTES = 2 * MIB
# A batch of small files holds its connection for three round trips (opens; writes, attributes and
# closes; renames), whatever it carries.
BATCH_ROUND_TRIPS = 3


def machine_cpu() -> tuple[float, float] | None:
    """(idle, total) CPU time of this machine so far, in clock ticks (Linux /proc/stat); None where
    it cannot be read, and then the controller's CPU is not watched."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [float(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user..steal


class PoolGrowth:
    """The pool's size over one push. ceiling: the most connections allowed; auto: grow by measuring
    (False: the ceiling is the fixed count, used as far as there is work)."""

    def __init__(self, ceiling: int, auto: bool, cpu: Callable[[], tuple[float, float] | None] = machine_cpu):
        self.ceiling = max(1, ceiling)
        self.cpu = cpu
        self.cpu_start: tuple[float, float] | None = None
        self.auto = auto
        self.round_trip: float | None = None
        self.count = 1
        self.limit = 1  # min(ceiling, work to send), set by start()
        self.bytes_sent = 0
        self.settled = not auto
        self.steps: list[tuple[int, float]] = []  # (count, rate in bytes/s) per finished window
        self.window_start: tuple[float, int] | None = None
        self.waiting_since: float | None = None
        self.up_since: float | None = None
        self.reason = f"fixed by connections={ceiling}" if not auto else "auto: nothing to send"
        self.login_seconds: float | None = None  # the first login, alone: connect, authenticate, start SFTP
        self.total_bytes = 0

    # -- before the survey ends ------------------------------------------------------------------

    def note_round_trip(self, seconds: float) -> None:
        if seconds > 0 and (self.round_trip is None or seconds < self.round_trip):
            self.round_trip = seconds

    def note_login(self, seconds: float) -> None:
        if seconds > 0 and self.login_seconds is None:
            self.login_seconds = seconds

    @property
    def long_path(self) -> bool:
        return self.round_trip is not None and self.round_trip >= LONG_PATH_SECONDS

    def early_logins(self, tree_work: int, sizes: tuple = ()) -> int:
        """Connections worth logging in while the survey runs: on a long path, a login takes several
        round trips that the first ranges would otherwise wait for; on a short one, it is soon done
        after the survey and a push with nothing to send then opens no more than one. sizes: of the
        files in the tree (all of them may need sending), for what their logins pay (see `worth`)."""
        if not self.long_path:
            return 1
        return max(1, min(self.ceiling, tree_work, START_LONG, self.worth(sizes) or START_LONG))

    def worth(self, sizes) -> int | None:
        """On a long path, the connections that files of these sizes pay logins for: a connection
        must have at least one login's worth of work. Their time on one stream (a channel window per
        round trip, BATCH_ROUND_TRIPS per batch of small files) over the first login's time, which
        includes what the target spends starting a session (a login shell that runs a profile costs a
        tenth of a second and more, every one competing for the target's CPUs). None: not measured
        yet, or a short path (there a login costs little time, and _push starts with START_SHORT)."""
        if not self.long_path or not self.login_seconds:
            return None
        nbytes = small = small_bytes = 0
        for size in sizes:
            nbytes += size
            if size <= SMALL_FILE_LIMIT:
                small += 1
                small_bytes += size
        batches = max(-(-small // BATCH_MAX_FILES), -(-small_bytes // BATCH_MAX_BYTES))
        one_stream = (nbytes / WINDOW_BYTES + batches * BATCH_ROUND_TRIPS) * self.round_trip
        return max(1, int(one_stream / self.login_seconds))

    # -- the transfer ----------------------------------------------------------------------------

    def start(self, work: int, nbytes: int, workers: int | None = None, worth: int | None = None) -> int:
        """The count to begin the transfer with, for `work` jobs' worth of `nbytes` to send.
        workers: the processes there are, when fewer than the ceiling could be started; worth: the
        connections the work pays logins for (see `worth`), None for no such bound."""
        self.total_bytes = nbytes
        self.limit = max(1, min(self.ceiling, work, workers or self.ceiling))
        if workers is not None and workers < min(self.ceiling, work):
            self.ceiling = max(1, workers)
        if work <= 0:
            self.count, self.settled = 1, True
            self.reason = "nothing to send"
            return self.count
        if not self.auto:
            self.count = self.limit
            if self.limit < self.ceiling:
                self.reason = f"fixed by connections={self.ceiling}; {_jobs(work)} to send"
            return self.count
        if nbytes < SMALL_PUSH_BYTES and work <= SMALL_PUSH_JOBS:
            self.count, self.settled = 1, True
            self.reason = (f"auto: {_jobs(work)} of {_size(nbytes)} to send: one connection is done sooner "
                           "than another logs in")
            return self.count
        start = START_LONG if self.long_path else START_SHORT
        self.count = min(start, self.limit)
        path = self._path()
        if worth is not None and worth < self.count:
            self.count = self.limit = worth
            self.reason = (f"auto: {self.count}: the work to send pays for no more logins of "
                           f"{self.login_seconds:.2f} s{path}")
        elif self.count >= self.limit:
            self.reason = f"auto: {_jobs(work)} to send{path}" if self.limit == work else \
                f"auto: max_connections={self.ceiling} reached at the start{path}"
        else:
            self.reason = f"auto: started with {self.count}{path}"
        self.settled = self.count >= self.limit
        return self.count

    def add_bytes(self, nbytes: int) -> None:
        self.bytes_sent += nbytes

    def tick(self, now: float, up: int, queued: int) -> int | None:
        """Called often during the transfer. up: connections logged in and serving; queued: jobs
        waiting for a connection. Returns a new count, or None to keep the pool as it is."""
        if self.settled:
            return None
        if self.window_start is None:
            self.waiting_since = self.waiting_since or now
            if up < self.count and now - self.waiting_since < LOGIN_WAIT_SECONDS:
                self.up_since = None
                return None
            self.up_since = self.up_since or now
            if now - self.up_since >= max(WARM_UP_SECONDS, 2 * (self.round_trip or 0.0)):
                self.window_start = (now, self.bytes_sent)
                self.cpu_start = self.cpu()
            return None
        started, bytes_then = self.window_start
        if queued == 0:
            # The last jobs are handed out: some connection may wait for work, so the rate no longer
            # says what the pool could carry; what is left finishes on the pool as it is.
            self._settle(f"the last jobs went out at {self.count}")
            return None
        elapsed = now - started
        if elapsed < self._window():
            return None
        rate = (self.bytes_sent - bytes_then) / elapsed
        return self._decide(rate, queued)

    def _decide(self, rate: float, queued: int) -> int | None:
        self.steps.append((self.count, rate))
        self.window_start = None
        self.waiting_since = None
        self.up_since = None
        idle = self._idle_share()
        if len(self.steps) >= 2:
            previous_count, previous_rate = self.steps[-2]
            if previous_rate > 0 and rate < previous_rate * (1 + MIN_GAIN):
                self.count = previous_count
                tried = self.steps[-1][0]
                self._settle(f"{previous_count}->{tried} {_gain(previous_rate, rate)}: back to {previous_count}")
                return self.count
        if self.count >= self.limit:
            bound = "max_connections" if self.limit == self.ceiling else "the work to send"
            self._settle(f"reached {bound} at {self.count}")
            return None
        if idle is not None and idle < BUSY_CPU_IDLE:
            self._settle(f"the controller's CPUs were busy at {self.count} ({idle * 100:.0f}% idle)")
            return None
        wanted = min(self.limit, self.count * 2)
        if queued < wanted - self.count:
            self._settle(f"too little work left for more than {self.count}")
            return None
        if self.login_seconds and rate > 0 and (self.total_bytes - self.bytes_sent) / rate < 2 * self.login_seconds:
            # New connections spend a login before they carry anything: the rest must outlast that.
            self._settle(f"what is left goes out at {self.count} sooner than more could log in")
            return None
        self.count = wanted
        self.reason = self._told(f"grew to {self.count}")  # until the next window says more
        return self.count

    def _idle_share(self) -> float | None:
        """The share of the controller's CPU time that was idle during the window just ended."""
        start, end = self.cpu_start, self.cpu()
        self.cpu_start = None
        if start is None or end is None or end[1] <= start[1]:
            return None
        return (end[0] - start[0]) / (end[1] - start[1])

    def _settle(self, why: str) -> None:
        self.settled = True
        self.reason = self._told(why)

    def _told(self, why: str) -> str:
        history = ", ".join(f"{count}: {rate / MIB:.0f} MiB/s" for count, rate in self.steps)
        return f"auto: {why}" + (f" ({history})" if history else "") + self._path()

    def _window(self) -> float:
        round_trip = self.round_trip or 0.0
        return min(MAX_WINDOW_SECONDS, max(MIN_WINDOW_SECONDS, WINDOW_ROUND_TRIPS * round_trip))

    def _path(self) -> str:
        if self.round_trip is None:
            return ""
        return f"; round trip {self.round_trip * 1000:.1f} ms"


def _jobs(work: int) -> str:
    return f"{work} job" + ("" if work == 1 else "s")


def _size(nbytes: int) -> str:
    return f"{nbytes / 1024:.0f} KiB" if nbytes < MIB else f"{nbytes / MIB:.1f} MiB"


def _gain(before: float, after: float) -> str:
    return f"{(after / before - 1) * 100:+.0f}%"
