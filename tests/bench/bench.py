"""Benchmark: multipush.sftp.push with its defaults against scp, rsync, ansible.posix.synchronize (and sftp,
ansible.builtin.copy), same source and target.

Run it with `./dev bench [options]` (see tests/bench/README.md). It starts a throwaway sshd on 127.0.0.1
and, for the emulated long link, a loopback relay in front of it (tests/support/relay.py, in a process of its
own) that adds a round-trip time; every tool copies the same source to the same sshd, every copy is compared
byte for byte, and the destination is removed (and synced to disk) between runs. Each run records its wall
seconds and CPU seconds (the whole machine's, the benchmark's own, the relay's). Results: RESULTS.md (with
the issue #21 targets, computed from the `push (defaults)` row), results.json and a chart in the output
directory (default tests/bench/results/).

Also measured: push with `verify: size` beside the defaults, no-op pushes of an already synced tree beside
a one-task `ansible.builtin.command: true` playbook, optionally the controller's peak memory for a small and
a large file, and one push under py-spy (flame graph and the top functions).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import ctypes
import datetime
import json
import os
import platform
import pwd
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.demo import make_tree, parse_size, same_content  # noqa: E402
from tests.support.sshd import SshServer, sftp_server_path, throwaway_server  # noqa: E402
from process_cpu import ProcessAccounting, report_lines, unavailable as accounting_unavailable  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
BIN = Path(sys.executable).parent
ALL_TOOLS = ("scp", "sftp", "rsync", "synchronize", "copy", "push")
# sftp -b moves bytes as scp does (OpenSSH 9's scp speaks SFTP); ansible.builtin.copy takes minutes per tree:
# both only when asked for (--tools), to keep a full run near 10 minutes on 2 cores.
DEFAULT_TOOLS = ("scp", "rsync", "synchronize", "push")
TOOL_LABELS = {"scp": "scp", "sftp": "sftp -b", "rsync": "rsync -a", "synchronize": "ansible.posix.synchronize",
               "copy": "ansible.builtin.copy"}
DEFAULTS_LABEL = "push (defaults)"
SIZE_LABEL = "push (defaults, verify: size)"
SHA256_LABEL = "push (defaults, sha256)"
ALL_WORKLOADS = ("big", "tree")
# verify: the headline push with verify: size beside it (big file, every link); sha256: also
# checksum_algorithm: sha256; rerun: no-op pushes of a synced tree beside the one-task `command: true`
# playbook; rss: the controller's peak memory for a small and a large file.
ALL_EXTRAS = ("verify", "sha256", "rerun", "rss")
DEFAULT_EXTRAS = ("verify", "rerun")
# Rows that no target reads and that cost the most time: run --context-reps times (default once).
CONTEXT_ROWS = {("sftp", "big"), ("sftp", "tree"), ("scp", "tree"), ("rsync", "big"), ("synchronize", "big")}
LINK_SETTINGS = ("loopback", "wan")
TREE_IMAGES = ("vms/esxi-01/esxi-01-flat.vmdk", "vms/vcsa-01/vcsa-01-flat.vmdk")  # made by demo.make_tree
RUN_TIMEOUT = 1800.0  # no single copy may take longer than this; it is killed and recorded as failed


class BenchError(Exception):
    """Something the benchmark cannot go on without; reported in one line."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the machine -------------------------------------------------------------------------------------------


def _version(command: list[str], pattern: str = r"(\S+)") -> str:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (completed.stdout + completed.stderr).strip()
    match = re.search(pattern, text)
    return match.group(1) if match else text.splitlines()[0] if text else "?"


def machine_description() -> dict:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import paramiko

        paramiko_version = paramiko.__version__
    except ImportError:
        paramiko_version = "missing"
    try:
        import cryptography

        cryptography_version = cryptography.__version__
    except ImportError:
        cryptography_version = "missing"
    commit = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "plugins"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssh": _version(["ssh", "-V"], r"(OpenSSH_\S+)").rstrip(","),
        "paramiko": paramiko_version,
        "cryptography": cryptography_version,
        "ansible_core": _version([str(BIN / "ansible-playbook"), "--version"], r"core ([\d.]+)"),
        "rsync": _version(["rsync", "--version"], r"version (\S+)"),
        "collection_commit": commit + (" + uncommitted changes in plugins/" if dirty else ""),
        "loadavg_start": os.getloadavg(),
    }


# --- workloads ---------------------------------------------------------------------------------------------


def write_data(path: Path, size: int) -> None:
    """Incompressible for every compressor: each MiB fresh from os.urandom. (One random MiB repeated, as the
    demo's images are, is incompressible for zlib's 32 KiB window but not for zstd's window of several MiB,
    which rsync 3.2+ negotiates for `--compress`, ansible.posix.synchronize's default.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        written = 0
        while written < size:
            take = min(MiB, size - written)
            out.write(os.urandom(take))
            written += take


def tree_files(root: Path) -> dict[str, Path]:
    """Relative path -> path of every regular file under root (a file: {'': root})."""
    if root.is_file():
        return {"": root}
    found = {}
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            found[str(path.relative_to(root))] = path
    return found


class Workload:
    def __init__(self, name: str, path: Path, description: str):
        self.name = name
        self.path = path  # a file, or a directory whose contents are copied
        self.description = description
        self.is_tree = path.is_dir()
        self.files = tree_files(path)
        self.bytes = sum(file.stat().st_size for file in self.files.values())


def make_workloads(args: argparse.Namespace, source: Path) -> dict[str, Workload]:
    made = {}
    if "big" in args.workloads:
        path = source / "big.img"
        log(f"writing the big file: {args.size / MiB:.0f} MiB")
        write_data(path, args.size)
        made["big"] = Workload("big", path, f"one {args.size / MiB:.0f} MiB file")
    if "tree" in args.workloads:
        root = source / "vpod"
        images = args.tree_images
        log(f"writing the vPod-like tree: 2 x {images / MiB:.0f} MiB images + {args.small_files} small files")
        make_tree(root, images, images, args.small_files)
        for image in TREE_IMAGES:  # the demo's images repeat one random MiB: made incompressible here
            write_data(root / image, images)
        made["tree"] = Workload("tree", root, f"vPod tree: 2 x {images / MiB:.0f} MiB + {args.small_files} files"
                                " of 0.1-64 KiB")
    return made


# --- memory of a process tree ------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                found.extend(int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return found


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; PSS shares copy-on-write pages fairly between forked processes."""
    rss = pss = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


class TreeMemory:
    """Polls the memory of a process and all its descendants; keeps the peaks of the sums."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid = pid
        self.interval = interval
        self.peak_rss_kib = 0
        self.peak_pss_kib = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _poll(self) -> None:
        while not self._stop.is_set():
            pids, todo = [], [self.pid]
            while todo and len(pids) < 1000:
                pid = todo.pop()
                pids.append(pid)
                todo.extend(_children(pid))
            rss = pss = 0
            for pid in pids:
                one_rss, one_pss = _memory_kib(pid)
                rss += one_rss
                pss += one_pss
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.peak_pss_kib = max(self.peak_pss_kib, pss)
            self.peak_processes = max(self.peak_processes, len(pids))
            self._stop.wait(self.interval)


def run_measured(command: list[str], env: dict | None = None, cwd: Path | None = None, memory: bool = False,
                 timeout: float = RUN_TIMEOUT, accounting: Path | None = None) -> dict:
    """Run a command; wall seconds, exit code, output tail, the largest process's peak RSS, and
    (memory=True) the whole tree's peak memory; with `accounting` (a directory for its file), the
    CPU seconds of every program that ended meanwhile (process_cpu.py), as `process_cpu`.

    wait4() gives the largest single process of the tree for free (Linux folds reaped descendants
    into it). Polling /proc for the tree's RSS and PSS sums is not free: reading smaps_rollup walks
    every process's page tables under its mmap lock, ten times a second, and slowed a 5.5 s tree
    push by 0.5 s here. Timed comparisons therefore run without it; the rss section polls.
    """
    output = tempfile.TemporaryFile()
    accounted = ProcessAccounting(accounting) if accounting is not None else contextlib.nullcontext()
    with accounted:
        result = _run_timed(command, env, cwd, memory, timeout, output)
    if accounting is not None:
        result["process_cpu"] = accounted.programs
    return result


def _run_timed(command: list[str], env: dict | None, cwd: Path | None, memory: bool, timeout: float,
               output) -> dict:
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=output,
                               stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        os.killpg(process.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    poller = TreeMemory(process.pid) if memory else contextlib.nullcontext()
    try:
        with poller:
            _pid, status, usage = os.wait4(process.pid, 0)
            machine_cpu_end = machine_cpu_seconds()
    finally:
        timer.cancel()
    seconds = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    output.seek(0)
    text = output.read().decode(errors="replace")
    output.close()
    result = {"seconds": seconds, "rc": process.returncode, "output": text[-4000:], "timed_out": timed_out.is_set(),
              "max_process_rss_mib": round(usage.ru_maxrss / 1024, 1),
              "machine_cpu_end": machine_cpu_end}
    if memory:
        result.update(tree_rss_mib=round(poller.peak_rss_kib / 1024, 1),
                      tree_pss_mib=round(poller.peak_pss_kib / 1024, 1),
                      tree_processes=poller.peak_processes)
    return result


# --- CPU time ------------------------------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot: user + nice + system + irq + softirq of /proc/stat
    (every core, every process: other people's work on a shared machine too)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in fields[1:8])
    return (user + nice + system + irq + softirq) / TICK


def process_cpu_seconds(pid: int, reaped_children: bool = False) -> float:
    """utime + stime of one process from /proc/PID/stat; reaped_children: plus cutime + cstime, the time of
    every descendant it (or a descendant) has waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


class RelayProcess:
    """tests/support/relay.py run as a child process of its own, so that its CPU time can be read apart from
    everything else (/proc/PID/stat) and subtracted by a reader: it runs on the same cores as the tools."""

    def __init__(self, target: tuple[str, int], rtt_ms: float, rate: float | None):
        command = [sys.executable, str(REPO / "tests" / "support" / "relay.py"), "--target", f"{target[0]}:{target[1]}",
                   "--rtt-ms", f"{rtt_ms:g}", "--seconds", "86400"] + (["--rate", str(int(rate))] if rate else [])
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        first = self.process.stdout.readline()
        match = re.match(r"relay \S+:(\d+) ", first)
        if not match:
            self.process.kill()
            raise BenchError(f"the relay did not start: {first!r}")
        self.port = int(match.group(1))

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)

    def stop(self) -> dict | None:
        """Stop it (SIGINT: it prints its counters) and return the counters."""
        self.process.send_signal(signal.SIGINT)
        try:
            output = self.process.communicate(timeout=15)[0]
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            return None
        with contextlib.suppress(ValueError, SyntaxError, IndexError):
            return ast.literal_eval(output.strip().splitlines()[-1])
        return None


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make the benchmark the reaper of every orphan among its descendants (Linux prctl): an sftp-server whose
    sshd session ended without waiting for it, a daemonized ssh ControlMaster. Their CPU time then reaches
    the benchmark's RUSAGE_CHILDREN when it reaps them, instead of vanishing with init."""
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    return False


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds around one run: the whole machine (/proc/stat), and the benchmark's own processes (`own`):
    everything it reaped (the command's process tree, and orphans: the benchmark is their subreaper), the
    sshd tree (the listening sshd's own and its reaped sessions' time) and the relay."""

    def __init__(self, server: SshServer, relay: RelayProcess | None):
        self.server = server
        self.relay = relay
        self.subreaper = become_subreaper()

    def kept(self) -> set[int]:
        """Children that live for the whole benchmark: never reaped here."""
        return {process.pid for process in (self.server.process, self.relay and self.relay.process) if process}

    def marks(self) -> dict:
        return {"machine": machine_cpu_seconds(), "reaped": children_cpu_seconds(),
                "sshd": process_cpu_seconds(self.server.process.pid, True),
                "relay": self.relay.cpu_seconds() if self.relay else 0.0}

    def settle(self, timeout: float = 3.0) -> bool:
        """Wait (bounded) until sshd has reaped every session and every orphan handed to the benchmark has
        ended and been reaped, so that their CPU time is counted."""
        deadline, kept = time.monotonic() + timeout, self.kept()
        while True:
            while True:
                try:
                    info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    info = None
                if info is None or info.si_pid in kept:
                    break
                os.waitpid(info.si_pid, 0)
            if not self.server.session_pids() and not set(_children(os.getpid())) - kept:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def measure(self, before: dict, machine_after: float, through_relay: bool) -> dict:
        settled = self.settle()
        after = self.marks()
        part = {key: after[key] - before[key] for key in ("reaped", "sshd", "relay")}
        if not through_relay:
            part["relay"] = 0.0
        found = {"cpu_s": round(machine_after - before["machine"], 2), "own_cpu_s": round(sum(part.values()), 2),
                 "reaped_cpu_s": round(part["reaped"], 2), "sshd_cpu_s": round(part["sshd"], 2)}
        if through_relay:
            found["relay_cpu_s"] = round(part["relay"], 2)
        if not settled:
            found["own_cpu_partial"] = True  # a process of the run outlived the wait: its time is missing
        return found


# --- another user on the target ---------------------------------------------------------------------------

# Where the target user's Python is looked for (the controller's may live under a home it cannot enter).
TARGET_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")


def target_python() -> str | None:
    """The first Python among TARGET_PYTHONS that can be run."""
    return next((path for path in TARGET_PYTHONS if os.access(path, os.X_OK)), None)


def target_user_problem(name: str) -> str | None:
    """Why the benchmark cannot log in as `name` (None: it can)."""
    if os.geteuid() != 0:
        return "only root can run sshd for another user; run the benchmark as root or leave --target-user out"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return "no such user; create one, e.g. useradd -m -s /bin/bash NAME && usermod -p '*' NAME"
    if entry.pw_shell.endswith(("nologin", "false")):
        return f"its login shell is {entry.pw_shell}; sftp-server starts through it: give it a shell (usermod -s)"
    if target_python() is None:
        return f"no Python for the target side among {', '.join(TARGET_PYTHONS)}"
    return None


def open_to_target_user(server: SshServer, workdir: Path) -> None:
    """Let the target user read its authorized_keys (sshd reads it as that user) and reach the
    destination; private keys stay unreadable to it (directories 0711, keys 0600)."""
    for directory in (server.workdir, workdir):
        os.chmod(directory, 0o711)
    os.chmod(server.authorized_keys, 0o644)


# --- the bench ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One row of the main table: a tool, and for push its connection count (None: the default) and variables."""

    tool: str
    label: str
    connections: int | None = None
    extra_vars: tuple = ()  # (name, value) pairs for the push playbook


def push_variants(args: argparse.Namespace, workload: str) -> list[Variant]:
    """The push rows: the defaults (the headline), verify: size (and sha256) beside them on the big file, then
    the fixed connection counts for context. --push-var applies to every one and is named in its label."""
    given = tuple(sorted(args.push_vars.items()))
    suffix = "".join(f", {key.removeprefix('push_')}={value}" for key, value in given)
    found = []
    for connections in args.connections:
        if connections is not None:
            found.append(Variant("push", f"push -c {connections}{suffix}", connections, given))
            continue
        found.append(Variant("push", DEFAULTS_LABEL if not given else f"push (defaults{suffix})", None, given))
        if workload == "big" and "verify" in args.extras:
            found.append(Variant("push", SIZE_LABEL.replace("defaults", f"defaults{suffix}"), None,
                                 given + (("push_verify", "size"),)))
        if workload == "big" and "sha256" in args.extras:
            found.append(Variant("push", SHA256_LABEL.replace("defaults", f"defaults{suffix}"), None,
                                 given + (("push_checksum_algorithm", "sha256"),)))
    return found


def variants_for(args: argparse.Namespace, workload: str, rep: int) -> list[Variant]:
    """What runs in one repetition of one workload and link, in the order they run: rotated by one place per
    repetition, so that no tool always runs first (or right after the biggest writer)."""
    found = []
    for tool in args.tools:
        if tool == "push":
            found += push_variants(args, workload)
        elif tool == "copy" and rep >= args.copy_reps:
            continue
        elif (tool, workload) in CONTEXT_ROWS and rep >= args.context_reps:
            continue
        else:
            found.append(Variant(tool, TOOL_LABELS[tool]))
    shift = rep % len(found) if found else 0
    return found[shift:] + found[:shift]


PLAYBOOKS = {
    "copy": """\
        - name: ansible.builtin.copy, as the benchmark's peer
          hosts: all
          gather_facts: false
          tasks:
            - name: Copy src to dest
              ansible.builtin.copy:
                src: "{{ src }}"
                dest: "{{ dest }}"
                mode: preserve
        """,
    "synchronize": """\
        - name: ansible.posix.synchronize with its defaults, as the benchmark's peer
          hosts: all
          gather_facts: false
          tasks:
            - name: Synchronize src to dest
              ansible.posix.synchronize:
                src: "{{ src }}"
                dest: "{{ dest }}"
        """,
    "floor": """\
        - name: The floor, a one-task playbook that runs one command on the target
          hosts: all
          gather_facts: false
          tasks:
            - name: Run true
              ansible.builtin.command: "true"
              changed_when: false
        """,
}


class Commands:
    """The command line of every tool against one link of the benchmark's sshd, and what Ansible needs."""

    def __init__(self, args: argparse.Namespace, workdir: Path, server: SshServer, target_user):
        self.args = args
        self.workdir = workdir
        self.server = server
        self.target_user = target_user
        self.links: dict[str, tuple[int, Path, Path]] = {}  # link -> (port, known_hosts, inventory)
        self.playbooks = {}
        for name, text in PLAYBOOKS.items():
            self.playbooks[name] = workdir / f"{name}.yml"
            self.playbooks[name].write_text(textwrap.dedent(text))

    def add_link(self, name: str, port: int) -> None:
        known = self.workdir / f"known_hosts-{name}"
        public = self.server.host_key.with_suffix(".pub").read_text().split()
        known.write_text(f"[{self.server.host}]:{port} {public[0]} {public[1]}\n")
        inventory = self.workdir / f"inventory-{name}.ini"
        common = f"-o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"
        extra = {"ansible_port": str(port), "ansible_ssh_common_args": f"'{common}'"}
        if self.target_user:
            extra["ansible_python_interpreter"] = target_python()
        self.server.write_inventory(inventory, **extra)
        self.links[name] = (port, known, inventory)

    def ssh_options(self, link: str) -> list[str]:
        _port, known, _inventory = self.links[link]
        return ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known}",
                "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-i", str(self.server.client_key)]

    def ansible_env(self, tag: str) -> dict:
        base = self.workdir / "ansible" / tag
        control = base / "cp"  # a fresh ControlPath per run: every run pays its own SSH set-up
        control.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update({
            "ANSIBLE_COLLECTIONS_PATH": self.args.collections,
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control),
            "ANSIBLE_HOST_KEY_CHECKING": "True",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_LOCAL_TEMP": str(base / "local"),
            "ANSIBLE_REMOTE_TEMP": str(owned_by(self.target_user, base / "remote", self.workdir)),
            "ANSIBLE_DEPRECATION_WARNINGS": "0",
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        })
        return env

    def close_masters(self, tag: str) -> None:
        """Stop the ssh ControlMaster processes a run's Ansible left behind (ControlPersist keeps them 60 s), so
        that their sshd sessions end and count in that run's CPU time, not in a later run's."""
        control = self.workdir / "ansible" / tag / "cp"
        for socket_path in control.iterdir() if control.is_dir() else ():
            subprocess.run(["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "bench"], capture_output=True,
                           timeout=10, check=False)

    def playbook(self, name: str, link: str, tag: str, variables: dict) -> tuple[list[str], dict]:
        env = self.ansible_env(tag)
        if name == "copy" and self.args.copy_pipelining:  # fewer SSH round trips per file: copy's faster way
            env["ANSIBLE_PIPELINING"] = "True"
        if name == "synchronize":
            env["ANSIBLE_COLLECTIONS_PATH"] = f"{self.args.collections}{os.pathsep}{self.args.posix_collections}"
        command = [str(BIN / "ansible-playbook"), "-i", str(self.links[link][2]), str(self.playbooks[name])]
        for key, value in variables.items():
            command += ["-e", f"{key}={value}"]
        return command, env

    def command_for(self, variant: Variant, workload: Workload, link: str, dest: Path,
                    tag: str) -> tuple[list[str], dict | None, Path | None]:
        port = self.links[link][0]
        remote = f"{self.server.user}@{self.server.host}"
        src, slash = str(workload.path), "/" if workload.is_tree else ""
        tool = variant.tool
        if tool == "scp":
            return ["scp", "-q", *self.ssh_options(link), "-P", str(port), *(["-r"] if workload.is_tree else []),
                    src, f"{remote}:{dest}"], None, None
        if tool == "sftp":
            batch = self.workdir / f"sftp-{tag}.batch"
            batch.write_text(f"-mkdir {dest}\nput -r {src}/. {dest}\n" if workload.is_tree else f"put {src} {dest}\n")
            return ["sftp", "-q", *self.ssh_options(link), "-P", str(port), "-b", str(batch), remote], None, None
        if tool == "rsync":
            shell = shlex.join(["ssh", *self.ssh_options(link), "-p", str(port)])
            return ["rsync", "-a", "-e", shell, src + slash, f"{remote}:{dest}{slash}"], None, None
        if tool in ("copy", "synchronize", "floor"):
            variables = {} if tool == "floor" else {"src": src + slash, "dest": f"{dest}{slash}"}
            return (*self.playbook(tool, link, tag, variables), None)
        if tool == "push":  # the collection's playbook, as a user runs it; its result file is written by the action
            result_dir = self.workdir / "results" / tag
            variables = {"src": src + slash, "dest": str(dest), "result_dir": str(result_dir)}
            if variant.connections:
                variables["push_connections"] = variant.connections
            variables.update(variant.extra_vars)
            command = [str(BIN / "ansible-playbook"), "multipush.sftp.push", "-i", str(self.links[link][2])]
            for key, value in variables.items():
                command += ["-e", f"{key}={value}"]
            return command, self.ansible_env(tag), result_dir
        raise BenchError(f"unknown tool {tool}")


def owned_by(user, directory: Path, workdir: Path) -> Path:
    """Make `directory` (on the target: this machine) and hand it to the target user, if any."""
    directory.mkdir(parents=True, exist_ok=True)
    if user:
        os.chown(directory, user.pw_uid, user.pw_gid)
        for parent in directory.parents:  # created by us as root: the user must get through them
            if parent == workdir:
                break
            os.chmod(parent, 0o711)
    return directory


def differences(workload: Workload, dest: Path) -> str | None:
    """None when dest holds exactly the workload's files, byte for byte, else what differs."""
    if not dest.exists():
        return f"{dest} does not exist"
    got = tree_files(dest)
    if workload.is_tree:
        got = {path: file for path, file in got.items() if not path.endswith(".multipush.tmp")}
    missing = sorted(set(workload.files) - set(got))
    extra = sorted(set(got) - set(workload.files))
    differ = sorted(path for path, file in workload.files.items() if path in got and not same_content(file, got[path]))
    if not (missing or extra or differ):
        return None
    return f"missing {missing[:3]} ({len(missing)}), differ {differ[:3]} ({len(differ)}), extra {extra[:3]}"


PUSH_RESULT_KEYS = ("seconds", "bytes_sent", "files_sent", "files_skipped", "throughput_mb_s", "connections",
                    "write_size", "cipher", "crc32_library", "retries", "handshake_retries", "changed",
                    "connections_reason", "round_trip_ms", "phases")


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, server: SshServer):
        self.args = args
        self.workdir = workdir
        self.server = server
        self.dest_root = workdir / "dest"
        self.target_user = pwd.getpwnam(args.target_user) if args.target_user else None
        self.commands = Commands(args, workdir, server, self.target_user)
        self.relay: RelayProcess | None = None
        self.cpu = CpuMeter(server, None)
        self.runs: list[dict] = []

    def clean_dest(self) -> None:
        if self.dest_root.exists():
            shutil.rmtree(self.dest_root)
        owned_by(self.target_user, self.dest_root, self.workdir)
        os.sync()  # the last run's dirty pages must not be written back during the next one

    def copy_once(self, variant: Variant, workload: Workload, link: str, rep: int = 0, clean: bool = True,
                  section: str = "main", memory: bool = False, check: bool = True) -> dict:
        if clean:
            self.clean_dest()
        dest = self.dest_root / workload.name
        tag = f"{section}-{variant.tool}{variant.connections or ''}-{workload.name}-{link}-{rep}-{len(self.runs)}"
        command, env, result_dir = self.commands.command_for(variant, workload, link, dest, tag)
        load = os.getloadavg()[0]
        timeout = self.args.copy_timeout if variant.tool == "copy" else RUN_TIMEOUT
        before = self.cpu.marks()
        outcome = run_measured(command, env=env, cwd=self.workdir, memory=memory, timeout=timeout,
                               accounting=self.workdir if self.args.process_cpu else None)
        if env is not None:
            self.commands.close_masters(tag)
        record = {
            "section": section, "tool": variant.tool, "variant": variant.label, "connections": variant.connections,
            "workload": workload.name, "link": link, "rep": rep, "seconds": round(outcome["seconds"], 3),
            "bytes": workload.bytes, "rc": outcome["rc"], "loadavg_1m_before": round(load, 2),
            "extra_vars": dict(variant.extra_vars),
            **self.cpu.measure(before, outcome["machine_cpu_end"], link != "loopback"),
        }
        for key in ("max_process_rss_mib", "tree_rss_mib", "tree_pss_mib", "tree_processes", "process_cpu"):
            if key in outcome:
                record[key] = outcome[key]
        if result_dir is not None:
            path = result_dir / "target.json"
            if path.exists():
                pushed = json.loads(path.read_text())
                record["push"] = {key: pushed.get(key) for key in PUSH_RESULT_KEYS}
        problem = None
        if outcome["timed_out"]:
            record["censored"] = True  # stopped at the time limit: its time is a lower bound
            problem = f"stopped after {timeout:.0f} s (--copy-timeout): its time is at least that"
        elif outcome["rc"] != 0:
            problem = f"exit {outcome['rc']}: {outcome['output'][-1500:]}"
        elif check:
            problem = differences(workload, dest)
        record["ok"] = problem is None
        if problem:
            record["problem"] = problem
        self.runs.append(record)
        status = "ok" if problem is None else f"FAILED: {problem[:300]}"
        log(f"{section:7s} {variant.label:30s} {workload.name:5s} {link:9s} rep {rep}: {outcome['seconds']:7.2f} s "
            f"{workload.bytes / outcome['seconds'] / 1e6:7.1f} MB/s cpu {record['cpu_s']:5.1f} s"
            f" (own {record['own_cpu_s']:5.1f}) {status}")
        return record

    # -- sections -------------------------------------------------------------------------------------------

    def main_matrix(self, workloads: dict[str, Workload], links: list[str]) -> None:
        for link in links:
            for workload in workloads.values():
                for rep in range(self.args.reps):
                    for variant in variants_for(self.args, workload.name, rep):
                        self.copy_once(variant, workload, link, rep)

    def rss_section(self, link: str) -> None:
        """Controller peak memory: a small and a large file, same connections."""
        variant = Variant("push", f"push -c {self.args.rss_connections}", self.args.rss_connections)
        for label, size in (("small", self.args.rss_small), ("large", self.args.rss_large)):
            path = self.workdir / "source" / f"rss-{label}.img"
            log(f"rss: writing {size / MiB:.0f} MiB")
            write_data(path, size)
            workload = Workload(f"rss-{label}", path, f"{size / MiB:.0f} MiB file")
            for rep in range(self.args.extra_reps):
                self.copy_once(variant, workload, link, rep, section="rss", memory=True)
            path.unlink()
            self.clean_dest()

    def rerun_section(self, workload: Workload, links: list[str]) -> None:
        """No-op pushes of a synced tree (defaults), interleaved with the floor: a one-task playbook running
        `ansible.builtin.command: true` on the same host, both timed as the whole ansible-playbook command."""
        push, floor = Variant("push", DEFAULTS_LABEL), Variant("floor", "one-task playbook, command: true")
        for link in links:
            self.copy_once(push, workload, link, 0, section="rerun-1st")
            for rep in range(self.args.extra_reps):
                self.copy_once(push, workload, link, rep, clean=False, section="rerun")
                self.copy_once(floor, workload, link, rep, clean=False, section="floor", check=False)

    def profile_section(self, workload: Workload, link: str, out: Path) -> dict:
        """One push under py-spy: a flame graph (SVG) and the hottest functions (from raw stacks)."""
        py_spy = shutil.which("py-spy", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        if not py_spy:
            raise BenchError("py-spy is not installed (./dev bench installs tests/bench/requirements.txt)")
        found = {}
        variant = Variant("push", f"push -c {self.args.profile_connections}", self.args.profile_connections)
        for fmt, name in (("raw", "profile-stacks.txt"), ("flamegraph", "profile-flame.svg")):
            self.clean_dest()
            command, env, _result_dir = self.commands.command_for(variant, workload, link,
                                                                  self.dest_root / workload.name, f"profile-{fmt}")
            wrapped = [py_spy, "record", "--subprocesses", "--rate", "200", "--format", fmt,
                       "--output", str(out / name), "--", *command]
            outcome = run_measured(wrapped, env=env, cwd=self.workdir)
            log(f"profile ({fmt}): {outcome['seconds']:.1f} s, exit {outcome['rc']}")
            if outcome["rc"] != 0:
                raise BenchError(f"py-spy failed: {outcome['output'][-2000:]}")
            found[fmt] = out / name
        return summarize_profile(found["raw"])

    def run(self) -> dict:
        args = self.args
        workloads = make_workloads(args, self.workdir / "source")
        self.commands.add_link("loopback", self.server.port)
        wan = wan_name(args)
        if "wan" in args.links or ("rerun" in args.extras and "tree" in workloads):
            self.relay = RelayProcess((self.server.host, self.server.port), args.rtt, args.rate)
            self.cpu.relay = self.relay
            self.commands.add_link(wan, self.relay.port)
        links = [wan if link == "wan" else link for link in args.links]
        profile = relay_stats = None
        try:
            if args.tools:
                self.main_matrix(workloads, links)
            if "rerun" in args.extras and "tree" in workloads:
                self.rerun_section(workloads["tree"], ["loopback", wan])
            if "rss" in args.extras:
                self.rss_section("loopback")
            if args.profile:
                target = workloads.get("big") or next(iter(workloads.values()))
                profile = self.profile_section(target, "loopback" if args.profile_link == "loopback" else wan,
                                               args.out)
        finally:
            if self.relay:
                relay_stats = self.relay.stop()
        return {"workloads": {name: {"description": w.description, "bytes": w.bytes, "files": len(w.files)}
                              for name, w in workloads.items()},
                "runs": self.runs, "relay": relay_stats, "profile": profile,
                "own_cpu_counts_orphans": self.cpu.subreaper}


def wan_name(args) -> str:
    name = f"rtt{args.rtt:g}ms"
    return name + (f"-{args.rate / 1e6:g}MBps" if args.rate else "")


# --- profile summary ---------------------------------------------------------------------------------------


def summarize_profile(raw: Path, top: int = 25) -> dict:
    """py-spy raw output (collapsed stacks, 'frame;frame;... count') -> hottest functions.

    self: samples whose innermost frame is the function; total: samples with the function anywhere on the
    stack. Percentages are of all samples of all processes; py-spy samples only threads that are not idle.
    """
    self_counts: dict[str, int] = {}
    total_counts: dict[str, int] = {}
    process_counts: dict[str, int] = {}
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _sep, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        count = int(count)
        samples += count
        frames = stack.split(";")
        process = frames[0] if frames[0].startswith("process") else "?"
        key = re.sub(r"process \d+:", "", process).strip().strip('"')[:90]
        process_counts[key] = process_counts.get(key, 0) + count
        frames = [frame for frame in frames if not frame.startswith(("process", "thread"))]
        names = [re.sub(r"\s*\(([^)]*/)?([^/)]+)\)$", r" (\2)", frame).strip() for frame in frames]
        if names:
            self_counts[names[-1]] = self_counts.get(names[-1], 0) + count
        for name in set(names):
            total_counts[name] = total_counts.get(name, 0) + count

    def ranked(counts):
        return [{"function": name, "samples": value, "percent": round(100 * value / samples, 1)}
                for name, value in sorted(counts.items(), key=lambda item: -item[1])[:top]]

    return {"samples": samples, "self": ranked(self_counts), "total": ranked(total_counts),
            "processes": ranked(process_counts)}


# --- summary, report, chart --------------------------------------------------------------------------------


def run_label(run: dict) -> str:
    """The row a run belongs to (results.json of earlier versions has no `variant`)."""
    if run.get("variant"):
        return run["variant"]
    if run["tool"] == "push":
        return f"push -c {run['connections']}" if run["connections"] else DEFAULTS_LABEL
    return TOOL_LABELS.get(run["tool"], run["tool"])


def row_rank(row: dict) -> tuple:
    """Headline first: push (defaults), its verify variants, the peers, then push with fixed counts."""
    headline = (DEFAULTS_LABEL, SIZE_LABEL, SHA256_LABEL)
    if row["label"] in headline:
        return 0, headline.index(row["label"]), 0
    if row["tool"] != "push":
        return 1, ALL_TOOLS.index(row["tool"]) if row["tool"] in ALL_TOOLS else 99, 0
    return 2, row["connections"] or 0, row["label"]


def _median(items: list[dict], key: str):
    values = [item[key] for item in items if item.get(key) is not None]
    return statistics.median(values) if values else None


def median_rows(runs: list[dict], section: str = "main") -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        if run["section"] == section:
            groups.setdefault((run["workload"], run["link"], run_label(run)), []).append(run)
    rows = []
    for (workload, link, label), items in groups.items():
        good_runs = [item for item in items if item["ok"]]
        good = [item["seconds"] for item in good_runs]
        censored = [item["seconds"] for item in items if item.get("censored")]
        median = statistics.median(good) if good else None
        at_least = not good and bool(censored)
        if at_least:
            median = min(censored)
        transfer = [item["push"]["seconds"] for item in good_runs if item.get("push")]
        gigabytes = items[0]["bytes"] / 1e9
        cpu, own = _median(good_runs, "cpu_s"), _median(good_runs, "own_cpu_s")
        rows.append({
            "workload": workload, "link": link, "tool": items[0]["tool"], "connections": items[0]["connections"],
            "label": label, "reps": len(good), "failed": len(items) - len(good) - len(censored),
            "at_least": at_least, "censored": len(censored), "seconds": median,
            "spread": (min(good), max(good)) if good else None,
            "mb_s": items[0]["bytes"] / median / 1e6 if median else None,
            "transfer_seconds": statistics.median(transfer) if transfer else None,
            "peak_rss_mib": max((item.get("max_process_rss_mib", 0) for item in items), default=None) or None,
            "load": statistics.median(item["loadavg_1m_before"] for item in items),
            "cpu_s": cpu, "own_cpu_s": own, "relay_cpu_s": _median(good_runs, "relay_cpu_s"),
            "cpu_s_per_gb": cpu / gigabytes if cpu is not None else None,
            "own_cpu_s_per_gb": own / gigabytes if own is not None else None,
        })
    for row in rows:
        scp = find_row(rows, "scp", row["workload"], row["link"])
        row["vs_scp"] = scp["seconds"] / row["seconds"] if scp and row["seconds"] else None
        defaults = find_row(rows, DEFAULTS_LABEL, row["workload"], row["link"])
        row["vs_defaults"] = row["seconds"] / defaults["seconds"] if defaults and row["seconds"] else None
    rows.sort(key=lambda r: (r["link"] != "loopback", r["link"], r["workload"], row_rank(r)))
    return rows


def fmt(value, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def find_row(rows: list[dict], label: str, workload: str, link: str) -> dict | None:
    """The row of a tool (by its name or its label) for a workload and link, with a time."""
    wanted = TOOL_LABELS.get(label, label)
    return next((r for r in rows if r["label"] == wanted and r["workload"] == workload and r["link"] == link
                 and r["seconds"]), None)


NOT_MEASURED = ("not measured in this run", "-")


def targets(data: dict) -> list[tuple[str, str, str]]:
    """The issue's targets, each from the push (defaults) row only (never the best fixed count):
    (target, measured, verdict); a target this run has no data for says so."""
    rows = median_rows(data["runs"])
    wan = data["settings"]["wan_link"]
    found = []
    for link, workload, peer, goal, text in (
            (wan, "big", "scp", 5.0, "1 GB file"), (wan, "tree", "rsync", 1.2, "vPod tree"),
            ("loopback", "big", "scp", 1.2, "1 GB file")):
        target = f"{link}, {text}: {TOOL_LABELS[peer]} s / push (defaults) s >= {goal:g}x"
        push, other = find_row(rows, DEFAULTS_LABEL, workload, link), find_row(rows, peer, workload, link)
        if not (push and other):
            found.append((target, *NOT_MEASURED))
            continue
        ratio = other["seconds"] / push["seconds"]
        found.append((target, f"{ratio:.2f}x ({other['seconds']:.2f} s / {push['seconds']:.2f} s)",
                      _verdict(ratio >= goal)))
    for link in ("loopback", wan):
        target = f"{link}, big file: verify: checksum costs <= 10% over verify: size (push defaults otherwise)"
        checksum, size = find_row(rows, DEFAULTS_LABEL, "big", link), find_row(rows, SIZE_LABEL, "big", link)
        if not (checksum and size):
            found.append((target, *NOT_MEASURED))
            continue
        cost = 100 * (checksum["seconds"] / size["seconds"] - 1)
        found.append((target, f"{cost:+.1f}% ({size['seconds']:.2f} -> {checksum['seconds']:.2f} s)",
                      _verdict(cost <= 10)))
    found += _rerun_targets(data["runs"], wan)
    return found


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _rerun_targets(runs: list[dict], wan: str) -> list[tuple[str, str, str]]:
    found = []
    for link in ("loopback", wan):
        target = f"{link}: no-op push of a synced tree < a one-task `ansible.builtin.command: true` playbook"
        noop = [run["seconds"] for run in runs if run["section"] == "rerun" and run["link"] == link and run["ok"]]
        floor = [run["seconds"] for run in runs if run["section"] == "floor" and run["link"] == link and run["ok"]]
        if not (noop and floor):
            found.append((target, *NOT_MEASURED))
            continue
        push, command = statistics.median(noop), statistics.median(floor)
        found.append((target, f"{push:.2f} s vs {command:.2f} s ({len(noop)} + {len(floor)} runs)",
                      _verdict(push < command)))
    return found


def context_names() -> str:
    return ", ".join(sorted(f"{TOOL_LABELS[tool]} {workload}" for tool, workload in CONTEXT_ROWS))


def _header(data: dict) -> list[str]:
    settings, machine = data["settings"], data["machine"]
    wan = settings["wan_link"]
    lines = [
        "# multipush.sftp benchmark results",
        "",
        f"Command: `{settings['command']}`  ",
        f"Date: {machine['date']}; duration {data['duration_s'] / 60:.1f} min."
        + (f" Push variables in the main table: `{settings['push_vars']}`." if settings.get("push_vars")
           else " The headline row, `push (defaults)`, runs the collection's playbook with no push_* variable."),
        "",
        f"Target user: `{settings.get('target_user', '?')}` (login shell `{settings.get('target_shell', '?')}`);"
        f" sftp subsystem: `{settings.get('sftp_subsystem', '?')}`."
        + (f" ansible.posix {settings['ansible_posix']}." if settings.get("ansible_posix") else ""),
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {key} | {value} |" for key, value in machine.items()]
    lines += [
        f"| loadavg at end | {data['loadavg_end']} |",
        "",
        "The machine is shared (other people's work may run beside the benchmark): numbers are medians of the"
        " repetitions, run interleaved (every tool once per repetition, the order rotated); `spread` is min-max."
        " Seconds are wall-clock of the whole command as a user runs it (for Ansible tools the whole"
        " `ansible-playbook` run: start-up and SSH set-up included); `transfer s` is push's own `seconds`;"
        " `load` is the median 1-minute load average just before the runs (2 cores: above 2, others wanted the"
        " CPUs too).",
        f" Links: `loopback` = straight to sshd on 127.0.0.1; `{wan}` = through the loopback relay"
        f" (tests/support/relay.py in its own process, {settings['rtt_ms']:g} ms round trip"
        + (f", {settings['rate_bytes_per_s'] / 1e6:g} MB/s per direction" if settings["rate_bytes_per_s"]
           else ", no rate cap") + ").",
        " MB = 10^6 bytes. `vs scp` = scp's seconds / this row's seconds (higher is faster); `x defaults` ="
        " this row's seconds / push (defaults)' seconds (above 1: push with its defaults is that many times"
        " faster).",
        f" Rows that no target reads and that take long ({context_names()})"
        f" ran {settings.get('context_reps', settings['reps'])} time(s) per link (`--context-reps`), the others"
        f" {settings['reps']}.",
        "",
        "## Workloads",
        "",
    ]
    lines += [f"- `{name}`: {workload['description']} ({workload['files']} files, {workload['bytes'] / 1e6:.1f} MB)"
              for name, workload in data["workloads"].items()]
    return lines


def _results_table(rows: list[dict]) -> list[str]:
    lines = ["", "## Results", "",
             "| tool | workload | link | seconds | spread | MB/s | vs scp | x defaults | transfer s | peak RSS MiB"
             " | reps | load |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        spread = f"{row['spread'][0]:.2f}-{row['spread'][1]:.2f}" if row["spread"] else "-"
        reps = f"{row['reps']}" + (f" ({row['failed']} failed)" if row["failed"] else "") + \
            (f" ({row['censored']} stopped at the time limit)" if row["censored"] else "")
        bound = "<" if row["at_least"] else ""
        label = f"**{row['label']}**" if row["label"] == DEFAULTS_LABEL else row["label"]
        lines.append(f"| {label} | {row['workload']} | {row['link']} | {'>' if row['at_least'] else ''}"
                     f"{fmt(row['seconds'])} | {spread} | {bound}{fmt(row['mb_s'], 1)} |"
                     f" {bound}{fmt(row['vs_scp'], 2, 'x')} | {fmt(row['vs_defaults'], 2, 'x')} |"
                     f" {fmt(row['transfer_seconds'])} | {fmt(row['peak_rss_mib'], 0)} | {reps} | {row['load']:.1f} |")
    return lines


def _cpu_table(rows: list[dict]) -> list[str]:
    lines = ["", "## CPU seconds", "",
             "Medians over the repetitions. `machine`: busy CPU seconds of the whole machine during the command"
             " (/proc/stat: user + nice + system + irq + softirq, both cores, everything running, other people's"
             " work included). `own`: the benchmark's processes only: all it reaped (the command's process tree,"
             " and orphans such as an sftp-server whose session ended first: the benchmark is their subreaper),"
             " the sshd serving it (the listening sshd's reaped sessions) and the relay. `relay`: the relay process"
             " alone (wan links; it runs on the same 2 cores: subtract it for the tools' own cost). Per GB:"
             " divided by the workload's bytes (10^9).",
             "",
             "| tool | workload | link | seconds | machine CPU s | machine CPU s/GB | own CPU s | own CPU s/GB"
             " | relay CPU s | own - relay CPU s/GB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        relay = row["relay_cpu_s"]
        without = (row["own_cpu_s"] - relay) / (row["own_cpu_s"] / row["own_cpu_s_per_gb"]) \
            if relay is not None and row["own_cpu_s"] else None
        lines.append(f"| {row['label']} | {row['workload']} | {row['link']} | {fmt(row['seconds'])} |"
                     f" {fmt(row['cpu_s'], 1)} | {fmt(row['cpu_s_per_gb'], 1)} | {fmt(row['own_cpu_s'], 1)} |"
                     f" {fmt(row['own_cpu_s_per_gb'], 1)} | {fmt(relay, 1)} | {fmt(without, 1)} |")
    return lines


def _process_cpu_section(runs: list[dict]) -> list[str]:
    groups: dict[str, list[dict]] = {}
    for run in runs:
        if run.get("process_cpu") and run["ok"]:
            groups.setdefault(f"{run_label(run)}, {run['workload']}, {run['link']}", []).append(run["process_cpu"])
    return report_lines(list(groups.items()))


EXTRA_SECTIONS = {
    "rss": "## Controller memory (push, whole ansible-playbook process tree)",
    "rerun": "## No-op push of an already synced tree (push defaults)",
    "floor": "## The floor: a one-task playbook running `ansible.builtin.command: true` on the same host",
}


def _extra_sections(runs: list[dict]) -> list[str]:
    lines = []
    for section, title in EXTRA_SECTIONS.items():
        chosen = [run for run in runs if run["section"] == section]
        if not chosen:
            continue
        lines += ["", title, "",
                  "| workload | link | row | rep | seconds | transfer s | machine CPU s | own CPU s | tree RSS MiB"
                  " | tree PSS MiB | largest process MiB | ok |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for run in chosen:
            lines.append(f"| {run['workload']} | {run['link']} | {run_label(run)} | {run['rep']} |"
                         f" {run['seconds']:.2f} | {fmt((run.get('push') or {}).get('seconds'))} |"
                         f" {fmt(run.get('cpu_s'), 1)} | {fmt(run.get('own_cpu_s'), 1)} |"
                         f" {fmt(run.get('tree_rss_mib'), 0)} | {fmt(run.get('tree_pss_mib'), 0)} |"
                         f" {fmt(run.get('max_process_rss_mib'), 0)} | {'yes' if run['ok'] else 'NO'} |")
    return lines


def _profile_lines(profile: dict) -> list[str]:
    lines = ["", "## Profile (py-spy, one push, all processes of the ansible-playbook tree)", "",
             f"{profile['samples']} samples; flame graph: `profile-flame.svg`; raw stacks: `profile-stacks.txt`.",
             "", "Hottest functions by own time (innermost frame):", "", "| function | % of samples |", "|---|---:|"]
    lines += [f"| `{item['function']}` | {item['percent']} |" for item in profile["self"][:15]]
    lines += ["", "By time including callees:", "", "| function | % of samples |", "|---|---:|"]
    lines += [f"| `{item['function']}` | {item['percent']} |" for item in profile["total"][:15]]
    return lines


def write_report(out: Path, data: dict) -> Path:
    rows = median_rows(data["runs"])
    lines = _header(data) + _results_table(rows)
    lines += ["", "## Targets (issue #21; from the push (defaults) row only)", "",
              "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {target} | {measured} | {verdict} |" for target, measured, verdict in targets(data)]
    lines += _cpu_table(rows) + _process_cpu_section(data["runs"]) + _extra_sections(data["runs"])
    if data.get("profile"):
        lines += _profile_lines(data["profile"])
    failed = [run for run in data["runs"] if not run["ok"]]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {run_label(run)} {run['workload']} {run['link']} rep {run['rep']}:"
                  f" {run.get('problem', '')[:400]!r}" for run in failed]
    if data.get("relay"):
        lines += ["", f"Relay counters at the end: {data['relay']}"]
    lines += ["", "![throughput](throughput.png)", ""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path


def write_chart(out: Path, data: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no chart (./dev bench installs tests/bench/requirements.txt)")
        return None
    rows = [row for row in median_rows(data["runs"]) if row["mb_s"]]
    panels = sorted({(row["link"] != "loopback", row["link"], row["workload"]) for row in rows})
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8), squeeze=False)
    for axis, (_wan, link, workload) in zip(axes[0], panels):
        items = [row for row in rows if row["link"] == link and row["workload"] == workload]
        colors = ["#1f77b4" if row["tool"] == "push" else "#999999" for row in items]
        bars = axis.bar(range(len(items)), [row["mb_s"] for row in items], color=colors)
        axis.set_xticks(range(len(items)))
        names = [row["label"].replace("ansible.builtin.", "ansible ").replace("ansible.posix.", "") for row in items]
        axis.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        axis.set_title(f"{workload}, {link}", fontsize=10)
        axis.set_ylabel("MB/s (median, higher is better)")
        for patch, row in zip(bars, items):
            axis.annotate(f"{row['mb_s']:.0f}", (patch.get_x() + patch.get_width() / 2, patch.get_height()),
                          ha="center", va="bottom", fontsize=7)
    figure.suptitle(f"multipush.sftp benchmark ({data['machine']['nproc']} CPUs, {data['machine']['openssh']})",
                    fontsize=11)
    figure.tight_layout()
    path = out / "throughput.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# --- main --------------------------------------------------------------------------------------------------


def csv_list(allowed):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if item not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown: {', '.join(bad)} (choose from {', '.join(allowed)})")
        return items
    return parse


def connection_list(text: str) -> list[int | None]:
    """'default,2,16' -> [None, 2, 16]; None is push with no push_connections at all (its default)."""
    values = []
    for item in (item.strip() for item in text.split(",")):
        if item in ("default", "defaults", "d"):
            values.append(None)
        elif item:
            try:
                values.append(int(item))
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a connection count or 'default': {item!r}") from None
            if values[-1] < 1:
                raise argparse.ArgumentTypeError("connection counts must be 1 or more")
    if not values:
        raise argparse.ArgumentTypeError("give at least one: default, or a count")
    return values


QUICK = {"size": 256 * MiB, "reps": 1, "links": ["loopback"], "connections": [None], "extras": [],
         "tools": ["scp", "rsync", "synchronize", "push"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./dev bench", description=__doc__.split("\n\n", maxsplit=1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="256 MiB, 1 rep, loopback only, scp, rsync, synchronize and push (defaults), no extras:"
                        " under 2 minutes")
    parser.add_argument("--workloads", type=csv_list(ALL_WORKLOADS), default=list(ALL_WORKLOADS))
    parser.add_argument("--tools", type=csv_list(ALL_TOOLS), default=list(DEFAULT_TOOLS),
                        help=f"of {','.join(ALL_TOOLS)} (synchronize = ansible.posix.synchronize, copy ="
                        " ansible.builtin.copy); empty: extras only")
    parser.add_argument("--links", type=csv_list(LINK_SETTINGS), default=list(LINK_SETTINGS))
    parser.add_argument("--connections", type=connection_list, default="default,2",
                        help="push rows: 'default' (no push_connections: the headline row) and fixed counts")
    parser.add_argument("--push-var", dest="push_vars", action="append", default=[], metavar="NAME=VALUE",
                        help="extra variable for every push of the main table, e.g. push_verify=size (then no row"
                        " is the defaults and the targets say 'not measured')")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each copy (median reported)")
    parser.add_argument("--context-reps", type=int, default=1,
                        help=f"repetitions of the slow rows no target reads: {context_names()}")
    parser.add_argument("--copy-reps", type=int, default=1,
                        help="repetitions for ansible.builtin.copy (slow: minutes per tree)")
    parser.add_argument("--copy-timeout", type=float, default=240.0,
                        help="stop ansible.builtin.copy after this many seconds and report that as a lower bound")
    parser.add_argument("--no-copy-pipelining", dest="copy_pipelining", action="store_false",
                        help="run ansible.builtin.copy without ANSIBLE_PIPELINING (slower still)")
    parser.add_argument("--extra-reps", type=int, help="repetitions in the rss and rerun sections (default: --reps)")
    parser.add_argument("--size", type=parse_size, default=1 * GiB, help="size of the big file")
    parser.add_argument("--tree-images", type=parse_size, default=32 * MiB, help="size of each of the tree's 2 images")
    parser.add_argument("--small-files", type=int, default=300, help="small files in the vPod tree")
    parser.add_argument("--rtt", type=float, default=50.0, help="round-trip time of the emulated link, ms")
    parser.add_argument("--rate", type=parse_size, help="rate cap per direction of the emulated link, bytes/s")
    parser.add_argument("--extras", type=csv_list(ALL_EXTRAS), default=list(DEFAULT_EXTRAS),
                        help="verify (push defaults with verify: size beside the headline, big file), sha256 (and"
                        " with checksum_algorithm: sha256), rerun (no-op push of a synced tree vs a one-task"
                        " `command: true` playbook), rss (peak memory, small vs large file)")
    parser.add_argument("--sftp-server", choices=("external", "internal"), default="external",
                        help="the benchmark sshd's sftp subsystem: external = OpenSSH's sftp-server binary, started"
                        " through the target user's login shell (Debian's default); internal = internal-sftp"
                        " inside sshd, no shell (the outside lab's setting)")
    parser.add_argument("--rss-small", type=parse_size, default=256 * MiB)
    parser.add_argument("--rss-large", type=parse_size, default=4 * GiB)
    parser.add_argument("--rss-connections", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="also run one push of the big file under py-spy")
    parser.add_argument("--process-cpu", action="store_true",
                        help="CPU seconds by program (ssh, sshd, sftp-server, ...) for every run, from BSD process"
                             " accounting (root; Debian's acct package, which ./dev installs)")
    parser.add_argument("--profile-link", choices=LINK_SETTINGS, default="loopback")
    parser.add_argument("--profile-connections", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "bench" / "results")
    parser.add_argument("--tmpdir", type=Path, help="where the source and destination trees go (default $TMPDIR)")
    parser.add_argument("--target-user", metavar="USER",
                        help="log in to the benchmark's sshd as this existing local user instead of the current one "
                             "(as root: for a target whose login shell is not the current user's; see README)")
    parser.add_argument("--posix-collections", type=Path, default=REPO / "build" / "bench-collections",
                        help="collections path holding ansible.posix (./dev bench installs it there)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite RESULTS.md and the chart from the results.json in --out; run nothing")
    args = parser.parse_args(argv)
    if args.quick:
        given = {arg.split("=")[0].lstrip("-").replace("-", "_") for arg in (argv or sys.argv[1:])
                 if arg.startswith("--")}
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    args.copy_reps = min(args.copy_reps, args.reps)
    args.context_reps = min(args.context_reps, args.reps)
    try:
        args.push_vars = dict(item.split("=", 1) for item in args.push_vars)
    except ValueError:
        parser.error("--push-var takes NAME=VALUE")
    args.extra_reps = args.reps if args.extra_reps is None else args.extra_reps
    args.collections = None if args.report_only else collections_path()
    return args


def collections_path() -> str:
    for entry in os.environ.get("ANSIBLE_COLLECTIONS_PATH", "").split(os.pathsep):
        if entry and (Path(entry) / "ansible_collections" / "multipush" / "sftp").is_dir():
            return entry
    default = REPO / "build" / "collections" / "current"
    if (default / "ansible_collections" / "multipush" / "sftp").is_dir():
        return str(default)
    raise BenchError("the collection is not installed: run ./dev bench (it installs it into build/collections)")


def setup_problem(args: argparse.Namespace) -> str | None:
    """What is missing for this run (None: nothing)."""
    for tool in ("ssh", "scp", "sftp", "rsync"):
        if (tool in args.tools or tool == "ssh" or (tool == "rsync" and "synchronize" in args.tools)) \
                and not shutil.which(tool):
            return f"{tool} is not installed (./dev bench installs openssh-client and rsync)"
    if "synchronize" in args.tools and not (args.posix_collections / "ansible_collections/ansible/posix").is_dir():
        return f"ansible.posix is not in {args.posix_collections} (./dev bench installs it there)"
    if args.sftp_server == "external" and sftp_server_path() == "internal-sftp":
        return "no sftp-server binary for --sftp-server external (install openssh-sftp-server)"
    if args.process_cpu and accounting_unavailable():
        return f"--process-cpu: {accounting_unavailable()}"
    if args.target_user:
        problem = target_user_problem(args.target_user)
        if problem:
            return f"--target-user {args.target_user}: {problem}"
    return None


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def start_server(args: argparse.Namespace) -> SshServer:
    subsystem = "internal-sftp" if args.sftp_server == "internal" else sftp_server_path()
    options = {"Subsystem": f"sftp {subsystem}"}
    if args.target_user:
        return throwaway_server(user=args.target_user, options=options)
    return throwaway_server(options=options)


def settings_of(args: argparse.Namespace, argv: list[str] | None, server: SshServer) -> dict:
    return {
        "command": "./dev bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "workloads": args.workloads, "tools": args.tools, "links": args.links,
        "connections": ["default" if count is None else count for count in args.connections],
        "reps": args.reps, "context_reps": args.context_reps, "copy_reps": args.copy_reps,
        "copy_pipelining": args.copy_pipelining, "extra_reps": args.extra_reps, "size": args.size,
        "tree_images": args.tree_images, "copy_timeout": args.copy_timeout, "small_files": args.small_files,
        "rtt_ms": args.rtt, "rate_bytes_per_s": args.rate, "extras": args.extras, "wan_link": wan_name(args),
        "push_vars": args.push_vars, "target_user": server.user, "target_shell": pwd.getpwnam(server.user).pw_shell,
        "sftp_server": args.sftp_server, "sftp_subsystem": server.options["Subsystem"].split(" ", 1)[1],
        "ansible_posix": posix_version(args.posix_collections) if "synchronize" in args.tools else None,
    }


def posix_version(collections: Path) -> str:
    with contextlib.suppress(OSError, ValueError, KeyError):
        manifest = collections / "ansible_collections" / "ansible" / "posix" / "MANIFEST.json"
        return json.loads(manifest.read_text())["collection_info"]["version"]
    return "?"


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    if args.report_only:
        data = json.loads((args.out / "results.json").read_text())
        write_report(args.out, data)
        write_chart(args.out, data)
        log(f"rewrote {args.out / 'RESULTS.md'} and the chart from {args.out / 'results.json'}")
        return 0
    problem = setup_problem(args)
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupted)
    started = time.monotonic()
    base = args.tmpdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="multipush-bench-", dir=base))
    need = 3 * (args.size if "big" in args.workloads else 0) + 512 * MiB + \
        (2 * args.rss_large if "rss" in args.extras else 0)
    if shutil.disk_usage(workdir).free < need:
        print(f"bench: {workdir} has less than {need / GiB:.1f} GiB free", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
        return 2
    server = start_server(args)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    log(f"work directory {workdir}; results to {args.out}; logging in as {server.user};"
        f" Subsystem {server.options['Subsystem']}")
    if os.getloadavg()[0] > 1.0:
        log(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other work is running, the times"
            " will be noisy (compare the load and spread columns)")
    try:
        server.start()
        if args.target_user:
            open_to_target_user(server, workdir)
        outcome = Bench(args, workdir, server).run()
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    data = {"settings": settings_of(args, argv, server), "machine": machine, "loadavg_end": os.getloadavg(),
            "duration_s": round(time.monotonic() - started, 1), **outcome}
    (args.out / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    report = write_report(args.out, data)
    write_chart(args.out, data)
    log(f"wrote {report}, results.json and throughput.png in {args.out} ({data['duration_s'] / 60:.1f} min)")
    print(report.read_text())
    return 0 if all(run["ok"] for run in data["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
