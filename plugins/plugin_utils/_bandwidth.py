# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Bandwidth budgets: `bandwidth_limit` (one host's push, all its connections) and
`total_bandwidth_limit` (everything the controller sends for one task, all hosts and forks).

parse_rate turns what the user wrote into bytes per second.
"""

from __future__ import annotations

import re

from ansible_collections.multipush.sftp.plugins.plugin_utils._plan import PlanError

# Byte units follow the push's sizes (K, M, G, T alone are binary, KB/MB/GB decimal); bit units are
# decimal as network links are sold (800Mbit = 100,000,000 bytes per second).
_BYTE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
               "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}
_BIT_UNITS = {"bit": 1 / 8, "kbit": 1000 / 8, "mbit": 1000**2 / 8, "gbit": 1000**3 / 8,
              "bps": 1 / 8, "kbps": 1000 / 8, "mbps": 1000**2 / 8, "gbps": 1000**3 / 8}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*(?:/\s*s)?\s*$")


def parse_rate(value, option: str) -> float | None:
    """'100M' (bytes per second), '800Mbit', '1.5G/s', '250000' -> bytes per second; None or ''
    -> None (no limit). Raises PlanError naming the option for anything else, zero included."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    problem = (f"{option}={value!r} is not a rate: use bytes per second with an optional unit, such as "
               "100M (MiB/s), 50MB (10^6 bytes/s) or 800Mbit (bits/s), or leave it unset for no limit")
    if isinstance(value, bool):
        raise PlanError(problem)
    if isinstance(value, (int, float)):
        rate = float(value)
    else:
        match = _RATE_RE.match(str(value))
        if not match:
            raise PlanError(problem)
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit in _BYTE_UNITS:
            rate = number * _BYTE_UNITS[unit]
        elif unit in _BIT_UNITS:
            rate = number * _BIT_UNITS[unit]
        else:
            raise PlanError(problem)
    if not rate > 0:
        raise PlanError(f"{option}={value!r} must be more than zero bytes per second; leave it unset for no limit")
    return rate
