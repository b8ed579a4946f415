"""Support for the reliability tests: ansible-playbook runs that may fail, and target-side checks.

`PlayRunner` writes a one-task play around multipush.sftp.push (task arguments written as JSON,
so hostile strings reach the module exactly), runs it WITHOUT ignore_errors so the exit status is
the one a user sees, and returns the registered result (on success) or the parsed failure
(the `fatal: [...]: FAILED! => {...}` line, printed as JSON by the default callback).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.files import sha256
from tests.support.playenv import BIN, ansible_settings

FATAL_RE = re.compile(r"^(?:fatal|failed): \[[^\]]+\]: (?:FAILED!|UNREACHABLE!) => (\{.*\})\s*$", re.MULTILINE)


@dataclass
class PlayOutcome:
    rc: int
    stdout: str
    stderr: str
    result: dict | None  # the registered result when the task succeeded
    failure: dict | None  # the failed task's result when it failed

    @property
    def msg(self) -> str:
        return (self.failure or {}).get("msg", "")

    def __repr__(self) -> str:
        return f"<PlayOutcome rc={self.rc}>\n{self.stdout[-6000:]}\n{self.stderr[-3000:]}"


def parse_failure(stdout: str) -> dict | None:
    match = FATAL_RE.search(stdout)
    if not match:
        return None
    try:
        return json.loads(match.group(1))
    except ValueError:
        return {"msg": match.group(1)}


@dataclass
class PlayRunner:
    """ansible-playbook with one multipush.sftp.push task against one inventory host."""

    workdir: Path
    env: dict
    inventory_line: str
    runs: int = field(default=0)

    def write(self, args: dict, *, task_extra: dict | None = None) -> tuple[Path, Path]:
        """The play and inventory for one run; returns (playbook, result file)."""
        self.runs += 1
        run_dir = self.workdir / f"run{self.runs}"
        run_dir.mkdir(parents=True, exist_ok=True)
        result_file = run_dir / "result.json"
        inventory = run_dir / "inventory.ini"
        inventory.write_text("[targets]\n" + self.inventory_line + "\n")
        task = {"name": "Push", "multipush.sftp.push": args, "register": "pushed", **(task_extra or {})}
        save = {
            "name": "Save the result",
            "ansible.builtin.copy": {"content": "{{ pushed | to_json }}", "dest": str(result_file), "mode": "0600"},
            "delegate_to": "localhost",
            "check_mode": False,
            "diff": False,
        }
        play = [{"name": "Reliability test play", "hosts": "targets", "gather_facts": False, "tasks": [task, save]}]
        playbook = run_dir / "play.yml"
        playbook.write_text(json.dumps(play, indent=2))  # JSON is YAML: strings arrive exactly
        return playbook, result_file

    def command(self, playbook: Path, extra_args: list[str] | None = None) -> list[str]:
        return [str(BIN / "ansible-playbook"), "-i", str(playbook.parent / "inventory.ini"), str(playbook),
                *(extra_args or [])]

    def run(self, args: dict, *, extra_args: list[str] | None = None, env: dict | None = None,
            prefix: list[str] | None = None, timeout: float = 300) -> PlayOutcome:
        playbook, result_file = self.write(args)
        environment = dict(self.env, **(env or {}))
        completed = subprocess.run([*(prefix or []), *self.command(playbook, extra_args)], env=environment,
                                   capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                                   check=False)
        result = json.loads(result_file.read_text()) if result_file.exists() else None
        return PlayOutcome(completed.returncode, completed.stdout, completed.stderr, result,
                           parse_failure(completed.stdout))


def inventory_line(host: str, port: int, user: str, known_hosts: Path, key: Path | None = None,
                   name: str = "target", **extra: str) -> str:
    hostvars = {
        "ansible_host": host,
        "ansible_port": str(port),
        "ansible_user": user,
        "ansible_ssh_common_args": f"'-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes "
                                   "-o IdentitiesOnly=yes'",
        "ansible_python_interpreter": os.environ.get("MULTIPUSH_TARGET_PYTHON", sys.executable),
    }
    if key is not None:
        hostvars["ansible_ssh_private_key_file"] = str(key)
    hostvars.update(extra)
    return name + " " + " ".join(f"{k}={v}" for k, v in hostvars.items())


def ansible_env(tmp_path: Path, collections_root: Path, home: Path | None = None) -> dict:
    """Environment for ansible-playbook: the tested collection, host key checking on, a private HOME
    (so no ~/.ssh key, known_hosts entry or agent of the machine's user takes part)."""
    home = home or tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ANSIBLE_", "SSH_AUTH_SOCK"))}
    env.update(ansible_settings(tmp_path, collections_root))
    env.update({"HOME": str(home), "ANSIBLE_CALLBACK_RESULT_FORMAT": "json"})
    return env


def snapshot(root: Path) -> dict:
    """Every entry under root (names as bytes, so odd names compare exactly): kind, size, digest, mode."""
    found = {}
    if not root.exists():
        return found
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            rel = os.path.relpath(path, os.fsencode(root))
            if os.path.islink(path):
                found[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                found[rel] = ("dir", info.st_mode & 0o7777)
            else:
                found[rel] = ("file", info.st_size, sha256(Path(os.fsdecode(path))) if info.st_size < 2**26 else None,
                              info.st_mode & 0o7777)
    return found


def temp_files(root: Path) -> list[str]:
    """The push's temp files anywhere under root (names with newlines included)."""
    found = []
    for dirpath, _dirnames, filenames in os.walk(root):
        found.extend(os.path.join(dirpath, name) for name in filenames if name.endswith(".multipush.tmp"))
    return found


def process_group_alive(pgid: int) -> list[int]:
    """Pids still in process group pgid (from /proc), zombies excluded."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def processes_mentioning(text: str) -> dict[int, str]:
    """pid -> command line of every process whose command line contains `text`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
            if text in cmdline:
                found[int(entry.name)] = cmdline
    return found


def stop_ssh_control_masters(control_dir: Path) -> dict[int, str]:
    """End the ssh ControlPersist masters Ansible's ssh connection left under control_dir (they detach
    from the play's process group by design); returns what was running."""
    masters = processes_mentioning(str(control_dir))
    for pid in masters:
        try:
            os.kill(pid, signal.SIGKILL)  # a mux master waiting in its loop does not act on SIGTERM at once
        except ProcessLookupError:
            pass
    return masters


# --- what the engine under test can do (for xfail markers that follow the engine's progress) ------------


def connection_failure_rc() -> int:
    """ansible-playbook's exit status for a host that could not be connected to: 4 (UNREACHABLE) once the
    engine reports such failures as unreachable (EngineError(unreachable=...)), 2 (failed) before."""
    import inspect

    from ansible_collections.multipush.sftp.plugins.plugin_utils._engine import EngineError

    return 4 if "unreachable" in inspect.signature(EngineError.__init__).parameters else 2


def engine_loads_encrypted_keys() -> bool:
    """Whether the session code can load a passphrase-protected key with its passphrase."""
    import tempfile

    from ansible_collections.multipush.sftp.plugins.plugin_utils import _auth

    loader = getattr(_auth, "_load_key_file", None)
    if loader is None:
        return False
    with tempfile.TemporaryDirectory() as scratch:
        key = Path(scratch) / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "probe-phrase", "-f", str(key)], check=True)
        try:
            return loader(str(key), "probe-phrase") is not None
        except Exception:
            return False


def engine_reads_default_known_hosts() -> bool:
    """Whether ~/.ssh/known_hosts is consulted when no UserKnownHostsFile is given."""
    from ansible_collections.multipush.sftp.plugins.plugin_utils import _sshconfig

    return hasattr(_sshconfig, "DEFAULT_USER_KNOWN_HOSTS")
