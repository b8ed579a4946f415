"""Benchmark: multipush.sftp.push against scp, sftp, rsync and ansible.builtin.copy, same source and target.

Run it with `./dev bench [options]` (see tests/bench/README.md). It starts a throwaway sshd on 127.0.0.1
and, for the emulated long link, a loopback relay in front of it (tests/support/relay.py) that adds a
round-trip time; every tool copies the same source to the same sshd, every copy is hash-checked, and the
destination is removed (and synced to disk) between runs. Results: RESULTS.md, results.json and a chart
in the output directory (default tests/bench/results/).

Also measured: the controller's peak memory for a push of a small and of a large file, the cost of
`verify: checksum` over `verify: size`, the time of a push of an already synced tree, and optionally one
push under py-spy (flame graph and the top functions).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import pwd
import re
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.demo import make_tree, parse_size  # noqa: E402
from tests.support.relay import Relay  # noqa: E402
from tests.support.sshd import SshServer, throwaway_server  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
BIN = Path(sys.executable).parent
ALL_TOOLS = ("scp", "sftp", "rsync", "copy", "push")
TOOL_LABELS = {"scp": "scp", "sftp": "sftp -b", "rsync": "rsync -a", "copy": "ansible.builtin.copy"}
ALL_WORKLOADS = ("big", "tree")
ALL_EXTRAS = ("rss", "verify", "rerun")
# The verify target compares the defaults (checksum with its default algorithm, crc32, against size);
# sha256 is measured beside them for users who choose it.
VERIFY_VARIANTS = ({"push_verify": "size"}, {"push_verify": "checksum"},
                   {"push_verify": "checksum", "push_checksum_algorithm": "sha256"})
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


def write_data(path: Path, size: int, seed: int) -> None:
    """Incompressible, distinct in every MiB, fast: a random MiB re-stamped with its block number."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = bytearray(hashlib.sha512(str(seed).encode()).digest() * (MiB // 64))
    block[64:] = os.urandom(MiB - 64)
    with open(path, "wb") as out:
        written = number = 0
        while written < size:
            block[:16] = f"blk{number:013d}".encode()
            take = min(MiB, size - written)
            out.write(memoryview(block)[:take])
            written += take
            number += 1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under root (a file: {'': sha256})."""
    if root.is_file():
        return {"": file_sha256(root)}
    found = {}
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            found[str(path.relative_to(root))] = file_sha256(path)
    return found


class Workload:
    def __init__(self, name: str, path: Path, description: str):
        self.name = name
        self.path = path  # a file, or a directory whose contents are copied
        self.description = description
        self.is_tree = path.is_dir()
        self.bytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if self.is_tree else \
            path.stat().st_size
        self.files = sum(1 for p in path.rglob("*") if p.is_file()) if self.is_tree else 1
        self.digests = tree_digests(path)


def make_workloads(names: list[str], source: Path, size: int, small_files: int) -> dict[str, Workload]:
    made = {}
    if "big" in names:
        path = source / "big.img"
        log(f"writing the big file: {size / MiB:.0f} MiB")
        write_data(path, size, seed=1)
        made["big"] = Workload("big", path, f"one {size / MiB:.0f} MiB file")
    if "tree" in names:
        root = source / "vpod"
        log(f"writing the vPod-like tree: 2 x 64 MiB images + {small_files} small files")
        make_tree(root, 64 * MiB, 64 * MiB, small_files)
        made["tree"] = Workload("tree", root, f"vPod tree: 2 x 64 MiB + {small_files} files of 0.1-64 KiB")
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
                 timeout: float = RUN_TIMEOUT) -> dict:
    """Run a command; wall seconds, exit code, output tail, the largest process's peak RSS, and
    (memory=True) the whole tree's peak memory.

    wait4() gives the largest single process of the tree for free (Linux folds reaped descendants
    into it). Polling /proc for the tree's RSS and PSS sums is not free: reading smaps_rollup walks
    every process's page tables under its mmap lock, ten times a second, and slowed a 5.5 s tree
    push by 0.5 s here. Timed comparisons therefore run without it; the rss section polls.
    """
    output = tempfile.TemporaryFile()
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
    finally:
        timer.cancel()
    seconds = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    output.seek(0)
    text = output.read().decode(errors="replace")
    output.close()
    result = {"seconds": seconds, "rc": process.returncode, "output": text[-4000:], "timed_out": timed_out.is_set(),
              "max_process_rss_mib": round(usage.ru_maxrss / 1024, 1)}
    if memory:
        result.update(tree_rss_mib=round(poller.peak_rss_kib / 1024, 1),
                      tree_pss_mib=round(poller.peak_pss_kib / 1024, 1),
                      tree_processes=poller.peak_processes)
    return result


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


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, server: SshServer):
        self.args = args
        self.workdir = workdir
        self.server = server
        self.dest_root = workdir / "dest"
        self.target_user = pwd.getpwnam(args.target_user) if args.target_user else None
        self.links: dict[str, tuple[int, Path, Path]] = {}  # link -> (port, known_hosts, inventory)
        self.relay: Relay | None = None
        self.runs: list[dict] = []
        self.copy_playbook = workdir / "copy.yml"
        self.copy_playbook.write_text(textwrap.dedent("""\
            - name: ansible.builtin.copy, as the benchmark's peer
              hosts: all
              gather_facts: false
              tasks:
                - name: Copy src to dest
                  ansible.builtin.copy:
                    src: "{{ src }}"
                    dest: "{{ dest }}"
                    mode: preserve
            """))

    # -- links ----------------------------------------------------------------------------------------------

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
            "ANSIBLE_REMOTE_TEMP": str(self.owned_by_target_user(base / "remote")),
            "ANSIBLE_DEPRECATION_WARNINGS": "0",
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        })
        return env

    # -- one copy -------------------------------------------------------------------------------------------

    def command_for(self, tool: str, workload: Workload, link: str, dest: Path, connections: int | None,
                    extra_vars: dict | None = None, tag: str = "") -> tuple[list[str], dict | None, Path | None]:
        port, _known, inventory = self.links[link]
        remote = f"{self.server.user}@{self.server.host}"
        src = str(workload.path)
        if tool == "scp":
            return ["scp", "-q", *self.ssh_options(link), "-P", str(port), *(["-r"] if workload.is_tree else []),
                    src, f"{remote}:{dest}"], None, None
        if tool == "sftp":
            batch = self.workdir / f"sftp-{tag}.batch"
            if workload.is_tree:
                batch.write_text(f"-mkdir {dest}\nput -r {src}/. {dest}\n")
            else:
                batch.write_text(f"put {src} {dest}\n")
            return ["sftp", "-q", *self.ssh_options(link), "-P", str(port), "-b", str(batch), remote], None, None
        if tool == "rsync":
            shell = shlex.join(["ssh", *self.ssh_options(link), "-p", str(port)])
            return ["rsync", "-a", "-e", shell, src + ("/" if workload.is_tree else ""),
                    f"{remote}:{dest}" + ("/" if workload.is_tree else "")], None, None
        env = self.ansible_env(tag)
        if tool == "copy":
            if self.args.copy_pipelining:  # fewer SSH round trips per file: the faster way to run copy
                env["ANSIBLE_PIPELINING"] = "True"
            return [str(BIN / "ansible-playbook"), "-i", str(inventory), str(self.copy_playbook),
                    "-e", f"src={src}" + ("/" if workload.is_tree else ""),
                    "-e", f"dest={dest}" + ("/" if workload.is_tree else "")], env, None
        if tool == "push":
            result_dir = self.workdir / "results" / tag
            variables = {"src": src + ("/" if workload.is_tree else ""), "dest": str(dest),
                         "result_dir": str(result_dir)}
            if connections:
                variables["push_connections"] = connections
            variables.update(extra_vars or {})
            command = [str(BIN / "ansible-playbook"), "multipush.sftp.push", "-i", str(inventory)]
            for key, value in variables.items():
                command += ["-e", f"{key}={value}"]
            return command, env, result_dir
        raise BenchError(f"unknown tool {tool}")

    def clean_dest(self) -> None:
        if self.dest_root.exists():
            shutil.rmtree(self.dest_root)
        self.owned_by_target_user(self.dest_root)
        os.sync()  # the last run's dirty pages must not be written back during the next one

    def owned_by_target_user(self, directory: Path) -> Path:
        """Make `directory` (on the target: this machine) and hand it to the target user, if any."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.target_user:
            os.chown(directory, self.target_user.pw_uid, self.target_user.pw_gid)
            for parent in directory.parents:  # created by us as root: the user must get through them
                if parent == self.workdir:
                    break
                os.chmod(parent, 0o711)
        return directory

    def check(self, workload: Workload, dest: Path) -> str | None:
        """None when dest holds exactly the workload's files (by sha256), else what differs."""
        if not dest.exists():
            return f"{dest} does not exist"
        got = tree_digests(dest) if workload.is_tree else {"": file_sha256(dest)}
        if workload.is_tree:
            got = {path: digest for path, digest in got.items() if not path.endswith(".multipush.tmp")}
        if got == workload.digests:
            return None
        missing = sorted(set(workload.digests) - set(got))
        differ = sorted(path for path in workload.digests if path in got and got[path] != workload.digests[path])
        extra = sorted(set(got) - set(workload.digests))
        return f"missing {missing[:3]} ({len(missing)}), differ {differ[:3]} ({len(differ)}), extra {extra[:3]}"

    def copy_once(self, tool: str, workload: Workload, link: str, connections: int | None = None, rep: int = 0,
                  clean: bool = True, extra_vars: dict | None = None, section: str = "main",
                  memory: bool = False, check: bool = True) -> dict:
        if clean:
            self.clean_dest()
        dest = self.dest_root / workload.name
        tag = f"{section}-{tool}{connections or ''}-{workload.name}-{link}-{rep}-{len(self.runs)}"
        command, env, result_dir = self.command_for(tool, workload, link, dest, connections, extra_vars, tag)
        load = os.getloadavg()[0]
        timeout = self.args.copy_timeout if tool == "copy" else RUN_TIMEOUT
        outcome = run_measured(command, env=env, cwd=self.workdir, memory=memory, timeout=timeout)
        record = {
            "section": section, "tool": tool, "connections": connections, "workload": workload.name, "link": link,
            "rep": rep, "seconds": round(outcome["seconds"], 3), "bytes": workload.bytes, "rc": outcome["rc"],
            "loadavg_1m_before": round(load, 2), "extra_vars": extra_vars or {},
        }
        for key in ("max_process_rss_mib", "tree_rss_mib", "tree_pss_mib", "tree_processes"):
            if key in outcome:
                record[key] = outcome[key]
        if result_dir is not None:
            path = result_dir / "target.json"
            if path.exists():
                pushed = json.loads(path.read_text())
                record["push"] = {key: pushed.get(key) for key in (
                    "seconds", "bytes_sent", "files_sent", "files_skipped", "throughput_mb_s", "connections",
                    "write_size", "cipher", "crc32_library", "retries", "handshake_retries", "changed")}
        problem = None
        if outcome["timed_out"]:
            record["censored"] = True  # stopped at the time limit: its time is a lower bound
            problem = f"stopped after {timeout:.0f} s (--copy-timeout): its time is at least that"
        elif outcome["rc"] != 0:
            problem = f"exit {outcome['rc']}: {outcome['output'][-1500:]}"
        elif check:
            problem = self.check(workload, dest)
        record["ok"] = problem is None
        if problem:
            record["problem"] = problem
        self.runs.append(record)
        label = tool_label(tool, connections)
        status = "ok" if problem is None else f"FAILED: {problem[:300]}"
        log(f"{section:7s} {label:22s} {workload.name:5s} {link:9s} rep {rep}: {outcome['seconds']:8.2f} s "
            f"{workload.bytes / outcome['seconds'] / 1e6:8.1f} MB/s  {status}")
        return record

    # -- sections -------------------------------------------------------------------------------------------

    def main_matrix(self, workloads: dict[str, Workload], links: list[str]) -> None:
        for link in links:
            for workload in workloads.values():
                for rep in range(self.args.reps):
                    for tool in self.args.tools:
                        if tool == "copy" and rep >= self.args.copy_reps:
                            continue
                        for connections in (self.args.connections if tool == "push" else [None]):
                            self.copy_once(tool, workload, link, connections, rep,
                                           extra_vars=self.args.push_vars if tool == "push" else None)

    def rss_section(self, link: str) -> None:
        """Controller peak memory: a small and a large file, same connections."""
        sizes = [("small", self.args.rss_small), ("large", self.args.rss_large)]
        for label, size in sizes:
            path = self.workdir / "source" / f"rss-{label}.img"
            log(f"rss: writing {size / MiB:.0f} MiB")
            write_data(path, size, seed=7)
            workload = Workload(f"rss-{label}", path, f"{size / MiB:.0f} MiB file")
            for rep in range(self.args.extra_reps):
                self.copy_once("push", workload, link, self.args.rss_connections, rep, section="rss", memory=True)
            path.unlink()
            self.clean_dest()

    def verify_section(self, workload: Workload, link: str) -> None:
        for rep in range(self.args.extra_reps):
            for extra_vars in VERIFY_VARIANTS:
                self.copy_once("push", workload, link, self.args.verify_connections, rep, section="verify",
                               extra_vars=dict(extra_vars))

    def rerun_section(self, workload: Workload, links: list[str]) -> None:
        for link in links:
            self.copy_once("push", workload, link, None, 0, section="rerun-1st")
            for rep in range(self.args.extra_reps):
                self.copy_once("push", workload, link, None, rep, clean=False, section="rerun")

    def profile_section(self, workload: Workload, link: str, out: Path) -> dict:
        """One push under py-spy: a flame graph (SVG) and the hottest functions (from raw stacks)."""
        py_spy = shutil.which("py-spy", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        if not py_spy:
            raise BenchError("py-spy is not installed (./dev bench installs tests/bench/requirements.txt)")
        found = {}
        for fmt, name in (("raw", "profile-stacks.txt"), ("flamegraph", "profile-flame.svg")):
            self.clean_dest()
            dest = self.dest_root / workload.name
            tag = f"profile-{fmt}"
            command, env, _result_dir = self.command_for("push", workload, link, dest, self.args.profile_connections,
                                                         None, tag)
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
        source = self.workdir / "source"
        workloads = make_workloads(args.workloads, source, args.size, args.small_files)
        self.add_link("loopback", self.server.port)
        if any(link != "loopback" for link in args.links) or "rerun" in args.extras:
            self.relay = Relay((self.server.host, self.server.port), rtt_ms=args.rtt,
                               rate_bytes_per_s=args.rate).start()
            self.add_link(wan_name(args), self.relay.port)
        links = [wan_name(args) if link == "wan" else link for link in args.links]
        profile = None
        try:
            if args.tools:
                self.main_matrix(workloads, links)
            if "verify" in args.extras and "big" in workloads:
                self.verify_section(workloads["big"], "loopback")
            if "rerun" in args.extras and "tree" in workloads:
                self.rerun_section(workloads["tree"], ["loopback", wan_name(args)])
            if "rss" in args.extras:
                self.rss_section("loopback")
            if args.profile:
                target = workloads.get("big") or next(iter(workloads.values()))
                profile = self.profile_section(target, args.profile_link if args.profile_link == "loopback"
                                               else wan_name(args), args.out)
        finally:
            relay_stats = self.relay.stats() if self.relay else None
            if self.relay:
                self.relay.stop()
        return {"workloads": {name: {"description": w.description, "bytes": w.bytes, "files": w.files}
                              for name, w in workloads.items()},
                "runs": self.runs, "relay": relay_stats, "profile": profile}


def wan_name(args) -> str:
    name = f"rtt{args.rtt:g}ms"
    return name + (f"-{args.rate / 1e6:g}MBps" if args.rate else "")


def tool_label(tool: str, connections: int | None) -> str:
    if tool == "push":
        return f"push -c {connections}" if connections else "push (default -c)"
    return TOOL_LABELS.get(tool, tool)


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


def median_rows(runs: list[dict], section: str = "main") -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        if run["section"] == section:
            groups.setdefault((run["workload"], run["link"], run["tool"], run["connections"] or 0), []).append(run)
    rows = []
    for (workload, link, tool, connections), items in groups.items():
        good = [item["seconds"] for item in items if item["ok"]]
        censored = [item["seconds"] for item in items if item.get("censored")]
        median = statistics.median(good) if good else None
        at_least = not good and bool(censored)
        if at_least:
            median = min(censored)
        transfer = [item["push"]["seconds"] for item in items if item["ok"] and item.get("push")]
        rows.append({
            "workload": workload, "link": link, "tool": tool, "connections": connections or None,
            "label": tool_label(tool, connections or None), "reps": len(good),
            "failed": len(items) - len(good) - len(censored), "at_least": at_least, "censored": len(censored),
            "seconds": median, "spread": (min(good), max(good)) if good else None,
            "mb_s": items[0]["bytes"] / median / 1e6 if median else None,
            "transfer_seconds": statistics.median(transfer) if transfer else None,
            "peak_rss_mib": max((item.get("max_process_rss_mib", 0) for item in items), default=None) or None,
            "load": statistics.median(item["loadavg_1m_before"] for item in items),
        })
    for row in rows:
        scp = next((other for other in rows if other["tool"] == "scp" and other["workload"] == row["workload"]
                    and other["link"] == row["link"]), None)
        row["vs_scp"] = scp["seconds"] / row["seconds"] if scp and scp["seconds"] and row["seconds"] else None
        if row["at_least"]:
            row["vs_scp_bound"] = True
    order = {tool: index for index, tool in enumerate(ALL_TOOLS)}
    rows.sort(key=lambda r: (r["link"] != "loopback", r["link"], r["workload"], order[r["tool"]],
                             r["connections"] or 0))
    return rows


def fmt(value, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def best_push(rows: list[dict], workload: str, link: str) -> dict | None:
    pushes = [r for r in rows if r["tool"] == "push" and r["workload"] == workload and r["link"] == link
              and r["seconds"]]
    return min(pushes, key=lambda r: r["seconds"]) if pushes else None


def find_row(rows, tool, workload, link):
    return next((r for r in rows if r["tool"] == tool and r["workload"] == workload and r["link"] == link
                 and r["seconds"]), None)


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def targets(rows: list[dict], runs: list[dict], wan: str) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each target of the benchmark that this run has data for."""
    return (_transfer_targets(rows, wan) + _memory_targets(runs) + _verify_targets(runs)
            + _rerun_targets(runs))


def _transfer_targets(rows: list[dict], wan: str) -> list[tuple[str, str, str]]:
    found = []
    push, scp = best_push(rows, "big", wan), find_row(rows, "scp", "big", wan)
    if push and scp:
        ratio = scp["seconds"] / push["seconds"]
        found.append((f"{wan} 1 big file: push >= 5x scp", f"{ratio:.2f}x ({push['label']})", _verdict(ratio >= 5)))
    push, rsync, copy = best_push(rows, "tree", wan), find_row(rows, "rsync", "tree", wan), \
        find_row(rows, "copy", "tree", wan)
    if push and rsync:
        ratio = rsync["seconds"] / push["seconds"]
        found.append((f"{wan} vPod tree: push faster than rsync", f"{ratio:.2f}x ({push['label']})",
                      _verdict(ratio > 1)))
    if push and copy:
        ratio = copy["seconds"] / push["seconds"]
        bound = ">= " if copy["at_least"] else ""  # copy was stopped at its time limit
        found.append((f"{wan} vPod tree: push >= 10x ansible.builtin.copy", f"{bound}{ratio:.2f}x ({push['label']})",
                      _verdict(ratio >= 10) if ratio >= 10 or not bound else "undecided (copy stopped early)"))
    push, scp = best_push(rows, "big", "loopback"), find_row(rows, "scp", "big", "loopback")
    if push and scp:
        ratio = scp["seconds"] / push["seconds"]
        found.append(("loopback big file: push >= scp", f"{ratio:.2f}x ({push['label']})", _verdict(ratio >= 1)))
    return found


def _memory_targets(runs: list[dict]) -> list[tuple[str, str, str]]:
    rss = {}
    for run in runs:
        if run["section"] == "rss" and run["ok"]:
            rss.setdefault(run["workload"], []).append(run["tree_pss_mib"])
    if "rss-small" not in rss or "rss-large" not in rss:
        return []
    # the median over the repetitions of each run's peak: one run's peak depends on which processes
    # happened to be alive at the same poll
    small, large = statistics.median(rss["rss-small"]), statistics.median(rss["rss-large"])
    return [("controller peak memory flat in file size (median peak PSS of the tree, large <= 1.2 x small)",
             f"{small:.0f} -> {large:.0f} MiB ({large / small:.2f}x; highest single peaks"
             f" {max(rss['rss-small']):.0f} -> {max(rss['rss-large']):.0f} MiB)",
             _verdict(large <= 1.2 * small))]


def _verify_targets(runs: list[dict]) -> list[tuple[str, str, str]]:
    verify = {}
    for run in runs:
        if run["section"] == "verify" and run["ok"]:
            mode = run["extra_vars"]["push_verify"]
            algorithm = run["extra_vars"].get("push_checksum_algorithm")
            verify.setdefault(f"{mode} {algorithm}" if algorithm else mode, []).append(run["seconds"])
    if "size" not in verify or "checksum" not in verify:
        return []
    size, checksum = statistics.median(verify["size"]), statistics.median(verify["checksum"])
    cost = 100 * (checksum / size - 1)
    found = [("verify: checksum <= 15% over verify: size (default algorithm, crc32)",
              f"{cost:+.1f}% ({size:.2f} -> {checksum:.2f} s)", _verdict(cost <= 15))]
    if "checksum sha256" in verify:
        sha256 = statistics.median(verify["checksum sha256"])
        found.append(("verify: checksum with checksum_algorithm: sha256, over verify: size (for information)",
                      f"{100 * (sha256 / size - 1):+.1f}% ({size:.2f} -> {sha256:.2f} s)", "-"))
    return found


def _rerun_targets(runs: list[dict]) -> list[tuple[str, str, str]]:
    reruns = {}
    for run in runs:
        if run["section"] == "rerun" and run["ok"]:
            reruns.setdefault(run["link"], []).append(run["seconds"])
    return [(f"re-run of a synced vPod tree < 3 s ({link})", f"{statistics.median(values):.2f} s",
             _verdict(statistics.median(values) < 3)) for link, values in reruns.items()]


def write_report(out: Path, data: dict) -> Path:
    rows = median_rows(data["runs"])
    wan = data["settings"]["wan_link"]
    lines = [
        "# multipush.sftp benchmark results",
        "",
        f"Command: `{data['settings']['command']}`  ",
        f"Date: {data['machine']['date']}; duration {data['duration_s'] / 60:.1f} min."
        + (f" Push variables in the main table: `{data['settings']['push_vars']}`."
           if data["settings"].get("push_vars") else " Push with its defaults (`verify: checksum`)."),
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    for key, value in data["machine"].items():
        lines.append(f"| {key} | {value} |")
    lines.append(f"| loadavg at end | {data['loadavg_end']} |")
    lines += [
        "",
        "The machine is shared (other test runs were active): numbers are medians; the spread column gives"
        " min-max of the repetitions. Seconds are wall-clock of the whole command (for Ansible tools: the whole"
        " `ansible-playbook` run, start-up and SSH set-up included); `transfer s` is push's own `seconds`;"
        " `load` is the median 1-minute load average just before the runs (2 cores: above 2, others were waiting"
        " for CPU too).",
        f" Links: `loopback` = straight to sshd on 127.0.0.1; `{wan}` = through the loopback relay"
        f" (tests/support/relay.py, {data['settings']['rtt_ms']:g} ms round trip"
        + (f", {data['settings']['rate_bytes_per_s'] / 1e6:g} MB/s per direction" if data['settings']
           ['rate_bytes_per_s'] else ", no rate cap") + ")."
        + (f" Every tool logs in as `{data['settings']['target_user']}`." if data['settings'].get('target_user')
           else ""),
        " MB = 10^6 bytes. `vs scp` = scp's seconds / this tool's seconds (higher is faster).",
        "",
        "## Workloads",
        "",
    ]
    for name, workload in data["workloads"].items():
        lines.append(f"- `{name}`: {workload['description']} ({workload['files']} files,"
                     f" {workload['bytes'] / 1e6:.1f} MB)")
    lines += ["", "## Results", "",
              "| tool | workload | link | seconds | spread | MB/s | vs scp | transfer s | peak RSS MiB | reps | load |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        spread = f"{row['spread'][0]:.2f}-{row['spread'][1]:.2f}" if row["spread"] else "-"
        reps = f"{row['reps']}" + (f" ({row['failed']} failed)" if row["failed"] else "") + \
            (f" ({row['censored']} stopped at the time limit)" if row["censored"] else "")
        seconds = (">" if row["at_least"] else "") + fmt(row["seconds"])
        mb_s = ("<" if row["at_least"] else "") + fmt(row["mb_s"], 1)
        vs_scp = ("<" if row["at_least"] else "") + fmt(row["vs_scp"], 2, "x")
        lines.append(f"| {row['label']} | {row['workload']} | {row['link']} | {seconds} | {spread} |"
                     f" {mb_s} | {vs_scp} | {fmt(row['transfer_seconds'])} |"
                     f" {fmt(row['peak_rss_mib'], 0)} | {reps} | {row['load']:.1f} |")
    found = targets(rows, data["runs"], wan)
    if found:
        lines += ["", "## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {target} | {measured} | {verdict} |" for target, measured, verdict in found]
    sections = {
        "rss": "## Controller memory (push, whole ansible-playbook process tree)",
        "verify": "## verify: checksum vs size",
        "rerun": "## Re-run of an already synced tree",
    }
    for section, title in sections.items():
        runs = [run for run in data["runs"] if run["section"] == section]
        if not runs:
            continue
        lines += ["", title, "",
                  "| workload | link | extra | rep | seconds | transfer s | tree RSS MiB | tree PSS MiB"
                  " | largest process MiB | processes | ok |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for run in runs:
            extra = " ".join(f"{k}={v}" for k, v in run["extra_vars"].items()) \
                or f"-c {run['connections'] or 'default'}"
            lines.append(f"| {run['workload']} | {run['link']} | {extra} | {run['rep']} | {run['seconds']:.2f} |"
                         f" {fmt((run.get('push') or {}).get('seconds'))} | {fmt(run.get('tree_rss_mib'), 0)} |"
                         f" {fmt(run.get('tree_pss_mib'), 0)} | {fmt(run.get('max_process_rss_mib'), 0)} |"
                         f" {run.get('tree_processes', '-')} | {'yes' if run['ok'] else 'NO'} |")
    if data.get("profile"):
        profile = data["profile"]
        lines += ["", "## Profile (py-spy, one push, all processes of the ansible-playbook tree)", "",
                  f"{profile['samples']} samples; flame graph: `profile-flame.svg`; raw stacks: `profile-stacks.txt`.",
                  "", "Hottest functions by own time (innermost frame):", "",
                  "| function | % of samples |", "|---|---:|"]
        lines += [f"| `{item['function']}` | {item['percent']} |" for item in profile["self"][:15]]
        lines += ["", "By time including callees:", "", "| function | % of samples |", "|---|---:|"]
        lines += [f"| `{item['function']}` | {item['percent']} |" for item in profile["total"][:15]]
    failed = [run for run in data["runs"] if not run["ok"]]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {tool_label(run['tool'], run['connections'])} {run['workload']} {run['link']} rep {run['rep']}:"
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
        axis.set_xticklabels([row["label"].replace("ansible.builtin.", "ansible ") for row in items], rotation=45,
                             ha="right", fontsize=8)
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


def int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("connection counts must be 1 or more")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./dev bench", description=__doc__.split("\n\n", maxsplit=1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="256 MiB, 1 rep, loopback only, push -c 1,4, no ansible.builtin.copy (minutes per"
                        " tree), no extras: under 2 minutes")
    parser.add_argument("--workloads", type=csv_list(ALL_WORKLOADS), default=list(ALL_WORKLOADS))
    parser.add_argument("--tools", type=csv_list(ALL_TOOLS), default=list(ALL_TOOLS),
                        help="scp,sftp,rsync,copy,push (copy = ansible.builtin.copy); empty: extras only")
    parser.add_argument("--links", type=csv_list(("loopback", "wan")), default=["loopback", "wan"])
    parser.add_argument("--connections", type=int_list, default=[1, 2, 4, 8, 16], help="push connection counts")
    parser.add_argument("--push-var", dest="push_vars", action="append", default=[], metavar="NAME=VALUE",
                        help="extra variable for the push playbook in the main table, e.g. push_verify=size")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each copy (median reported)")
    parser.add_argument("--copy-reps", type=int, default=1,
                        help="repetitions for ansible.builtin.copy (slow: minutes per tree)")
    parser.add_argument("--copy-timeout", type=float, default=240.0,
                        help="stop ansible.builtin.copy after this many seconds and report that as a lower bound")
    parser.add_argument("--no-copy-pipelining", dest="copy_pipelining", action="store_false",
                        help="run ansible.builtin.copy without ANSIBLE_PIPELINING (slower still)")
    parser.add_argument("--extra-reps", type=int, help="repetitions in the rss/verify/rerun sections (default: --reps)")
    parser.add_argument("--size", type=parse_size, default=1 * GiB, help="size of the big file")
    parser.add_argument("--small-files", type=int, default=300, help="small files in the vPod tree")
    parser.add_argument("--rtt", type=float, default=50.0, help="round-trip time of the emulated link, ms")
    parser.add_argument("--rate", type=parse_size, help="rate cap per direction of the emulated link, bytes/s")
    parser.add_argument("--extras", type=csv_list(ALL_EXTRAS), default=list(ALL_EXTRAS),
                        help="rss (peak memory, small vs large file), verify (checksum vs size), rerun (synced tree)")
    parser.add_argument("--rss-small", type=parse_size, default=256 * MiB)
    parser.add_argument("--rss-large", type=parse_size, default=4 * GiB)
    parser.add_argument("--rss-connections", type=int, default=8)
    parser.add_argument("--verify-connections", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="also run one push of the big file under py-spy")
    parser.add_argument("--profile-link", choices=("loopback", "wan"), default="loopback")
    parser.add_argument("--profile-connections", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "bench" / "results")
    parser.add_argument("--tmpdir", type=Path, help="where the source and destination trees go (default $TMPDIR)")
    parser.add_argument("--target-user", metavar="USER",
                        help="log in to the benchmark's sshd as this existing local user instead of the current one "
                             "(as root: for a target whose login shell is not the current user's; see README)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite RESULTS.md and the chart from the results.json in --out; run nothing")
    args = parser.parse_args(argv)
    if args.quick:
        defaults = {"size": 256 * MiB, "reps": 1, "links": ["loopback"], "connections": [1, 4], "extras": [],
                    "tools": ["scp", "sftp", "rsync", "push"]}
        given = {arg.split("=")[0].lstrip("-").replace("-", "_") for arg in (argv or sys.argv[1:])
                 if arg.startswith("--")}
        for key, value in defaults.items():
            if key not in given:
                setattr(args, key, value)
    args.copy_reps = min(args.copy_reps, args.reps)
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


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    for tool in ("ssh", "scp", "sftp", "rsync"):
        if (tool in args.tools or tool == "ssh") and not shutil.which(tool):
            print(f"bench: {tool} is not installed (./dev bench installs openssh-client and rsync)", file=sys.stderr)
            return 2
    if args.report_only:
        data = json.loads((args.out / "results.json").read_text())
        write_report(args.out, data)
        write_chart(args.out, data)
        log(f"rewrote {args.out / 'RESULTS.md'} and the chart from {args.out / 'results.json'}")
        return 0
    signal.signal(signal.SIGTERM, _interrupted)
    started = time.monotonic()
    base = args.tmpdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="multipush-bench-", dir=base))
    need = 3 * (args.size if "big" in args.workloads else 0) + 512 * MiB + \
        (2 * args.rss_large if "rss" in args.extras else 0)
    if shutil.disk_usage(workdir).free < need:
        print(f"bench: {workdir} has less than {need / GiB:.1f} GiB free", file=sys.stderr)
        return 2
    if args.target_user:
        problem = target_user_problem(args.target_user)
        if problem:
            print(f"bench: --target-user {args.target_user}: {problem}", file=sys.stderr)
            shutil.rmtree(workdir, ignore_errors=True)
            return 2
        server = throwaway_server(user=args.target_user)
    else:
        server = throwaway_server()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    log(f"work directory {workdir}; results to {out}")
    try:
        server.start()
        if args.target_user:
            open_to_target_user(server, workdir)
        bench = Bench(args, workdir, server)
        outcome = bench.run()
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
    data = {
        "settings": {
            "command": "./dev bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "workloads": args.workloads, "tools": args.tools, "links": args.links, "connections": args.connections,
            "reps": args.reps, "copy_reps": args.copy_reps, "copy_pipelining": args.copy_pipelining,
            "extra_reps": args.extra_reps, "size": args.size, "copy_timeout": args.copy_timeout,
            "small_files": args.small_files, "rtt_ms": args.rtt, "rate_bytes_per_s": args.rate,
            "extras": args.extras, "wan_link": wan_name(args), "push_vars": args.push_vars,
            "target_user": server.user,
        },
        "machine": machine,
        "loadavg_end": os.getloadavg(),
        "duration_s": round(time.monotonic() - started, 1),
        **outcome,
    }
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    report = write_report(out, data)
    write_chart(out, data)
    log(f"wrote {report}, results.json and throughput.png in {out} ({data['duration_s'] / 60:.1f} min)")
    print(report.read_text())
    return 0 if all(run["ok"] for run in data["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
