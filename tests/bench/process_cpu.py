"""CPU seconds by program over one benchmark run (`--process-cpu`), from Linux's BSD process accounting.

The machine-wide CPU seconds of /proc/stat say how busy the cores were, not who kept them busy. On one
machine that plays the controller, the link and every host, "who" is the question: the push's workers,
sshd decrypting, sftp-server writing, the peers' ssh clients, the hashing service. Process accounting
(acct(5)) has the kernel append one record per process when it ends, with its user and system time, on
the whole machine; summing them by program name answers it without a profiler and without touching the
processes measured.

What it counts: every process that ended while accounting was on, whoever started it (on a shared
machine, other people's too; the machine's load is in every report). A process still running when the
run ends (a relay, a ControlPersist master) is not counted. Program names are the kernel's, cut at 15
characters (`ansible-playboo`: ansible-playbook and the processes it forks, the push's workers among
them). Needs root (`accton`, from Debian's `acct` package) and a kernel with BSD process accounting v3.
"""

from __future__ import annotations

import collections
import statistics
import os
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

# struct acct_v3 of <linux/acct.h>: flag, version, tty, exitcode, uid, gid, pid, ppid, btime, etime (float),
# utime, stime, mem, io, rw, minflt, majflt, swaps (comp_t each), comm[16]
RECORD = struct.Struct("<BBHIIIIIIf8H16s")
VERSION = 3
TICKS_PER_SECOND = 100  # AHZ: comp_t times are in 1/100 s
# sshd ends a session's processes a moment after the client returns: records wait this long for them.
SETTLE_SECONDS = 0.5


def comp_t(value: int) -> int:
    """acct's 16-bit float: a 13-bit mantissa and a 3-bit base-8 exponent."""
    return (value & 0x1FFF) << (3 * (value >> 13))


def by_program(data: bytes) -> dict[str, float]:
    """CPU seconds (user + system) per program name in a v3 accounting file's contents."""
    seconds: collections.Counter = collections.Counter()
    for offset in range(0, len(data) - RECORD.size + 1, RECORD.size):
        fields = RECORD.unpack_from(data, offset)
        if fields[1] & 0x7F != VERSION:
            raise ValueError(f"not a v3 process accounting record at byte {offset} (version {fields[1] & 0x7F})")
        name = fields[-1].split(b"\0", 1)[0].decode("utf-8", "replace") or "?"
        seconds[name] += (comp_t(fields[10]) + comp_t(fields[11])) / TICKS_PER_SECOND
    return {name: round(value, 2) for name, value in seconds.most_common()}


def unavailable() -> str | None:
    """Why process accounting cannot be used here, or None."""
    if os.geteuid() != 0:
        return "process accounting needs root"
    if shutil.which("accton") is None:
        return "accton is not installed (Debian: apt-get install acct)"
    if not Path("/proc/sys/kernel/acct").exists():
        return "this kernel has no BSD process accounting"
    return None


class ProcessAccounting:
    """Accounting on for the `with` block, into a file of its own; `programs` afterwards."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.programs: dict[str, float] = {}

    def __enter__(self) -> "ProcessAccounting":
        handle, name = tempfile.mkstemp(prefix="acct-", dir=self.directory)
        os.close(handle)
        self.path = Path(name)
        subprocess.run(["accton", str(self.path)], check=True, capture_output=True)
        return self

    def __exit__(self, *exc_info) -> None:
        time.sleep(SETTLE_SECONDS)
        subprocess.run(["accton", "off"], check=True, capture_output=True)
        try:
            self.programs = by_program(self.path.read_bytes())
        finally:
            self.path.unlink(missing_ok=True)


def report_lines(groups: list[tuple[str, list[dict]]], columns: int = 7) -> list[str]:
    """A Markdown section: per group (a row label and its runs' `process_cpu`), the median CPU seconds of
    the programs that cost the most over all groups, the rest as `other`, and the total. Empty when no run
    was accounted."""
    groups = [(label, runs) for label, runs in groups if runs]
    if not groups:
        return []
    medians = []
    for label, runs in groups:
        names = {name for run in runs for name in run}
        medians.append((label, len(runs), {name: statistics.median(run.get(name, 0.0) for run in runs)
                                           for name in names}))
    overall: collections.Counter = collections.Counter()
    for _label, _reps, values in medians:
        overall.update(values)
    shown = [name for name, _seconds in overall.most_common(columns)]
    lines = ["", "## CPU seconds by program (`--process-cpu`)", "",
             "Medians over the repetitions of the CPU seconds (user + system) of every process that ended during"
             " the command, summed by program name, on the whole machine (BSD process accounting: see"
             " tests/bench/process_cpu.py). `ansible-playboo` is ansible-playbook and every process it forks"
             " (push's workers too); `sshd` and `sftp-server` are the target's side; `ssh` is an OpenSSH client"
             " (scp's, rsync's, a peer's); `python3` and `python` are Python processes (on a target: push's hashing"
             " service, a peer's sender, Ansible's modules). A process still running at the end (a relay, a"
             " ControlPersist master) is not counted.", "",
             "| run | reps | " + " | ".join(f"`{name}`" for name in shown) + " | other | total |",
             "|---|---:|" + "---:|" * (len(shown) + 2)]
    for label, reps, values in medians:
        other = sum(seconds for name, seconds in values.items() if name not in shown)
        cells = " | ".join(f"{values.get(name, 0.0):.2f}" for name in shown)
        lines.append(f"| {label} | {reps} | {cells} | {other:.2f} | {sum(values.values()):.2f} |")
    return lines
