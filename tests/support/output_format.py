"""The one convention of every figure a person reads in the push's output: sizes and rates in binary
units, one decimal (whole bytes below 1 KiB), seconds with one decimal. The patterns of its lines,
for the unit tests of the progress room and for a real run's output alike."""

from __future__ import annotations

import re
from types import SimpleNamespace

SIZE = r"(\d+ B|\d+\.\d (KiB|MiB|GiB|TiB))"
RATE = SIZE + "/s"
# the bandwidth limits after the rate, when the push has any: " (limit 16.0 MiB/s host, 95.4 MiB/s total)"
LIMITS = rf"( \(limit {RATE} (host|total)(, {RATE} total)?\))?"


def line_patterns(host: str, path: str = r"\S+") -> SimpleNamespace:
    """Compiled patterns of the progress, per-file and done lines of `host`; `path`: what a file's
    name in a per-file line may look like."""
    host = re.escape(host)
    return SimpleNamespace(
        progress=re.compile(rf"^{host}: +\d+\.\d% {SIZE} of {SIZE}, {RATE}{LIMITS}, ETA (\d+:\d\d:\d\d|-), "
                            r"files \d+/\d+$"),
        file=re.compile(rf"^{host}: (sent|resent|resumed) {path} \({SIZE} in \d+\.\d s, ({RATE}|n/a)\)$"),
        done=re.compile(rf"^{host}: done: (\S.*: )?\d+ sent, (\d+ resumed, )?\d+ skipped"
                        rf"(, \d+ link\(s\) created or changed)?, {SIZE} in \d+\.\d s \({RATE}\), \d+ retries$"),
    )
