# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Progress of one push as lines for the ansible-playbook output.

The coordinator feeds it acknowledged bytes and finished files; it decides when a line is due
and formats it. It never prints by itself: `emit(text, verbosity)` does (the action maps
verbosity 0 to Display.display and 1 to Display.v). Small files count toward the totals, so the
figures reach 100% exactly when the last file is in place.

One convention for every figure a person reads (progress lines, per-file lines, the `done:` line
and the result's `summary`): sizes in binary units (B, KiB, MiB, GiB, TiB: powers of 1024, one
decimal), rates in the same units per second (MiB/s), durations in seconds with one decimal (ETA as
H:MM:SS). Machine-readable result fields stay plain numbers (bytes, seconds, throughput_mb_s).
"""

from __future__ import annotations

import time
from typing import Callable

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(count: float) -> str:
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {_UNITS[-1]}"  # pragma: no cover - loop always returns


def human_rate(bytes_per_second: float) -> str:
    """A rate in the units of human_bytes, per second: '45.9 MiB/s'."""
    return f"{human_bytes(bytes_per_second)}/s"


def file_rate(size: int, seconds: float) -> str:
    """The rate of one file for the per-file lines; 'n/a' when its time is not known."""
    return human_rate(size / seconds) if seconds > 0 else "n/a"


def summary(result: dict, check_mode: bool = False) -> str:
    """What a push did (or in check mode would do), in one line: the `done:` line and the result's
    `summary`. Resumed files (an interrupted run's temp file completed) are counted apart from sent
    ones (sent and resent)."""
    files = result.get("files") or []
    statuses = [item.get("status") for item in files]
    links = [item for item in result.get("links") or [] if item.get("status") not in ("unchanged", None)]
    if check_mode:
        sending = [item for item in files if item.get("status") == "would_send"]
        text = (f"would send {len(sending)} file(s) ({human_bytes(sum(item.get('size', 0) for item in sending))}), "
                f"{result.get('files_skipped', 0)} skipped")
        if links:
            text += f", would create or change {len(links)} link(s)"
        return text
    resumed = statuses.count("resumed")
    sent = sum(1 for status in statuses if status in ("sent", "resent")) if files else result.get("files_sent", 0)
    seconds = result.get("seconds") or 0.0
    text = f"{sent} sent, " + (f"{resumed} resumed, " if resumed else "") + f"{result.get('files_skipped', 0)} skipped"
    if links:
        text += f", {len(links)} link(s) created or changed"
    bytes_sent = result.get("bytes_sent", 0)
    fed = result.get("fanout") or {}
    if result.get("source") not in (None, "controller"):
        text += f" (fed by {result['source']}: {human_bytes(fed.get('peer_bytes', 0))} from it)"
    return (f"{text}, {human_bytes(bytes_sent)} in {seconds:.1f} s "
            f"({human_rate(bytes_sent / seconds if seconds > 0 else 0)}), {result.get('retries', 0)} retries")


def human_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


# The first progress line comes this soon after the first bytes were acknowledged (or after
# `interval`, if that is shorter), so a push shorter than the interval still shows one.
FIRST_LINE_SECONDS = 1.0


class Progress:
    """Progress lines every `interval` seconds (0 turns them off) and a final summary."""

    def __init__(self, host: str, interval: float, emit: Callable[[str, int], None],
                 clock: Callable[[], float] = time.monotonic):
        self.host = host
        self.interval = interval
        self.emit = emit
        self.clock = clock
        self.started = clock()
        self.last_line = self.started
        self.total_bytes = 0
        self.done_bytes = 0
        self.total_files = 0
        self.done_files = 0
        self.active = False
        self.lines_shown = 0
        self.first_bytes: float | None = None  # when the first bytes were acknowledged
        self.limits = ""  # the bandwidth limits, after the rate in the progress lines

    def show_limits(self, host: float | None, total: float | None) -> None:
        """The push's bandwidth limits (bytes per second, None: none), shown after its rate."""
        named = [f"{human_rate(rate)} {name}" for rate, name in ((host, "host"), (total, "total")) if rate]
        self.limits = f" (limit {', '.join(named)})" if named else ""

    def start(self, total_bytes: int, total_files: int) -> None:
        self.total_bytes = total_bytes
        self.total_files = total_files
        self.started = self.last_line = self.clock()
        self.active = True

    def add_bytes(self, count: int) -> None:
        self.done_bytes += count
        if self.first_bytes is None and count > 0:
            self.first_bytes = self.clock()

    def grow(self, extra_bytes: int) -> None:
        """More to send than planned (a range sent again after a mismatch)."""
        self.total_bytes += extra_bytes

    def file_done(self, dest: str, size: int, seconds: float, status: str) -> None:
        """A file is in place; status is the file's result status (sent, resent, resumed)."""
        self.done_files += 1
        if self.interval <= 0:
            return
        self.emit(f"{self.host}: {status} {dest} ({human_bytes(size)} in {seconds:.1f} s, "
                  f"{file_rate(size, seconds)})", 1)

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        done = min(self.done_bytes, self.total_bytes)
        percent = 100.0 * done / self.total_bytes if self.total_bytes else 100.0
        if self.done_files < self.total_files:
            percent = min(percent, 99.9)  # 100% only once every file is in place
        rate = self.done_bytes / elapsed
        remaining = max(self.total_bytes - done, 0)
        eta = human_duration(remaining / rate) if rate > 0 else "-"
        return (f"{self.host}: {percent:5.1f}% {human_bytes(done)} of {human_bytes(self.total_bytes)}, "
                f"{human_rate(rate)}{self.limits}, ETA {eta}, files {self.done_files}/{self.total_files}")

    def tick(self) -> None:
        if not self.active or self.interval <= 0:
            return
        now = self.clock()
        if self.lines_shown == 0:
            # the first line about a second after bytes start to flow, then one per interval
            due = self.first_bytes is not None and now - self.first_bytes >= min(FIRST_LINE_SECONDS, self.interval)
        else:
            due = now - self.last_line >= self.interval
        if due:
            self.last_line = now
            self.lines_shown += 1
            self.emit(self.line(), 0)

    def finish(self, result: dict) -> None:
        """The last lines: the 100% line (when anything was sent) and the done line, which names
        where the push landed (the absolute dest) and, in check mode, what it would send."""
        if self.interval <= 0:
            return
        if self.lines_shown or self.total_files:  # the figure seen last is the 100% one, even for a short push
            self.emit(self.line(), 0)
        where = f"{result['dest']}: " if result.get("dest") else ""
        self.emit(f"{self.host}: done: {where}{result.get('summary') or summary(result)}", 0)
