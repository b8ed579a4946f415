# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Progress of one push as lines for the ansible-playbook output.

The coordinator feeds it acknowledged bytes and finished files; it decides when a line is due
and formats it. It never prints by itself: `emit(text, verbosity)` does (the action maps
verbosity 0 to Display.display and 1 to Display.v). Small files count toward the totals, so the
figures reach 100% exactly when the last file is in place.
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


def human_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


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

    def start(self, total_bytes: int, total_files: int) -> None:
        self.total_bytes = total_bytes
        self.total_files = total_files
        self.started = self.last_line = self.clock()
        self.active = True

    def add_bytes(self, count: int) -> None:
        self.done_bytes += count

    def grow(self, extra_bytes: int) -> None:
        """More to send than planned (a range sent again after a mismatch)."""
        self.total_bytes += extra_bytes

    def file_done(self, dest: str, size: int, seconds: float, status: str) -> None:
        self.done_files += 1
        if self.interval <= 0:
            return
        rate = f", {size / seconds / 1e6:.1f} MB/s" if seconds > 0.05 and size else ""
        self.emit(f"{self.host}: {status} {dest} ({human_bytes(size)} in {seconds:.1f} s{rate})", 1)

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
                f"{rate / 1e6:.1f} MB/s, ETA {eta}, files {self.done_files}/{self.total_files}")

    def tick(self) -> None:
        if not self.active or self.interval <= 0:
            return
        now = self.clock()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self.lines_shown += 1
            self.emit(self.line(), 0)

    def finish(self, result: dict) -> None:
        if self.interval <= 0:
            return
        if self.lines_shown:  # the figure seen last must be the 100% one
            self.emit(self.line(), 0)
        self.emit(
            f"{self.host}: done: {result['files_sent']} sent, {result['files_skipped']} skipped, "
            f"{human_bytes(result['bytes_sent'])} in {result['seconds']:.1f} s ({result['throughput_mb_s']} MB/s), "
            f"{result['retries']} retries", 0)
