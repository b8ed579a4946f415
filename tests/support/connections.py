"""Helpers for the connection tests: test users with sudo rules, an ssh-agent, ssh config files,
YAML inventories, system tools installed on demand, and readers of sshd's log.

Users, sudoers drop-ins and agents made here are removed by the same helper that made them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.waiting import wait_until

APT_TIMEOUT = 600


def ensure_tool(binary: str, package: str) -> str:
    """The path of `binary`, installing `package` with apt-get (as root) when it is missing;
    skips the test with the reason when that is impossible."""
    found = shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin:/bin:" + os.environ.get("PATH", ""))
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{binary} is not installed and cannot be installed here (needs root and apt-get): "
                    f"apt-get install {package}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300", package]
    attempt = subprocess.run(command, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT, check=False)
    if attempt.returncode != 0 and "Unable to locate" in attempt.stderr + attempt.stdout:
        subprocess.run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=300"], env=env, capture_output=True,
                       timeout=APT_TIMEOUT, check=False)
        attempt = subprocess.run(command, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT, check=False)
    found = shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if not found:
        pytest.skip(f"could not install {package} with apt-get: {(attempt.stderr or attempt.stdout)[-500:]}")
    return found


# --- users ------------------------------------------------------------------------------------------


@dataclass
class TestUser:
    name: str
    uid: int
    gid: int
    home: Path
    password: str | None = field(default=None, repr=False)


@dataclass
class UserFactory:
    """Creates local users (useradd) and sudoers rules for one test module; `remove()` undoes all."""

    prefix: str = field(default_factory=lambda: "mp" + secrets.token_hex(3))
    users: list[TestUser] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    sudoers: list[Path] = field(default_factory=list)

    def __post_init__(self):
        if os.geteuid() != 0 or not shutil.which("useradd"):
            pytest.skip("creating test users needs root and useradd")

    def user(self, role: str, password: str | None = None, groups: tuple[str, ...] = ()) -> TestUser:
        name = f"{self.prefix}{role}"[:32]
        command = ["useradd", "--create-home", "--shell", "/bin/sh", "--user-group"]
        if groups:
            command += ["--groups", ",".join(groups)]
        subprocess.run(command + [name], check=True, capture_output=True, timeout=60)
        entry = subprocess.run(["getent", "passwd", name], check=True, capture_output=True, text=True).stdout
        fields = entry.strip().split(":")
        user = TestUser(name=name, uid=int(fields[2]), gid=int(fields[3]), home=Path(fields[5]), password=password)
        self.users.append(user)
        if password is not None:
            subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True, capture_output=True,
                           timeout=60)
        else:  # a locked password ("!") would also lock key logins on some sshd builds: use "*"
            subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True, timeout=60)
        return user

    def group(self, role: str) -> tuple[str, int]:
        name = f"{self.prefix}{role}"[:32]
        subprocess.run(["groupadd", name], check=True, capture_output=True, timeout=60)
        self.groups.append(name)
        gid = int(subprocess.run(["getent", "group", name], check=True, capture_output=True,
                                 text=True).stdout.split(":")[2])
        return name, gid

    def allow_sudo(self, user: TestUser, rule: str) -> None:
        """A sudoers drop-in for user, e.g. rule='ALL=(ALL) NOPASSWD: ALL'; checked with visudo."""
        path = Path("/etc/sudoers.d") / f"{user.name}"
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_text(f"{user.name} {rule}\n")
        os.chmod(temp, 0o440)
        check = subprocess.run(["visudo", "-c", "-f", str(temp)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            temp.unlink()
            raise AssertionError(f"sudoers rule rejected by visudo: {check.stdout} {check.stderr}")
        temp.rename(path)
        self.sudoers.append(path)

    def remove(self) -> None:
        for path in self.sudoers:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for user in reversed(self.users):
            subprocess.run(["pkill", "-KILL", "-u", user.name], capture_output=True, check=False, timeout=30)
            subprocess.run(["userdel", "--remove", user.name], capture_output=True, check=False, timeout=60)
        for name in self.groups:
            subprocess.run(["groupdel", name], capture_output=True, check=False, timeout=60)


def authorized_keys_dir(path: Path, users: dict[str, Path]) -> str:
    """Per-user authorized_keys files readable by those users (sshd opens them as the user, so `path`
    must be reachable by them: make it under shared_dir()). Returns the AuthorizedKeysFile value."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)
    for name, public_key in users.items():
        (path / name).write_text(public_key.read_text())
        os.chmod(path / name, 0o644)
    return str(path / "%u")


def shared_dir(prefix: str) -> Path:
    """A directory outside pytest's owner-only tmp tree, reachable by the test users."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path


# --- ssh-agent --------------------------------------------------------------------------------------


class SshAgent:
    """A private ssh-agent on a socket in `workdir`; `add(key, passphrase)` loads a key into it."""

    def __init__(self, workdir: Path):
        self.socket = workdir / "agent.sock"
        self.process = subprocess.Popen(  # pylint: disable=consider-using-with
            ["ssh-agent", "-D", "-a", str(self.socket)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL)
        wait_until(self.socket.exists, 10, what="ssh-agent's socket")

    @property
    def env(self) -> dict:
        return {"SSH_AUTH_SOCK": str(self.socket)}

    def add(self, key: Path, passphrase: str = "") -> None:
        """ssh-add through SSH_ASKPASS so an encrypted key can be loaded without a terminal."""
        askpass = key.parent / f"{key.name}.askpass"
        askpass.write_text(f"#!/bin/sh\nprintf '%s\\n' '{passphrase}'\n")
        os.chmod(askpass, 0o700)
        env = dict(os.environ, **self.env, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
        try:
            subprocess.run(["ssh-add", str(key)], env=env, check=True, capture_output=True, timeout=30,
                           stdin=subprocess.DEVNULL)
        finally:
            askpass.unlink()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)


# --- files for ssh and ansible ------------------------------------------------------------------------


def ssh_config(path: Path, hosts: dict[str, dict], top: str = "") -> Path:
    """An ssh_config file: {alias: {Keyword: value or [values]}} in order, after the lines `top`."""
    lines = [top] if top else []
    for alias, options in hosts.items():
        lines.append(f"Host {alias}")
        for key, value in options.items():
            lines.extend(f"    {key} {item}" for item in (value if isinstance(value, list) else [value]))
    path.write_text("\n".join(lines) + "\n")
    return path


def server_config(server, **extra: str) -> dict[str, str]:
    """ssh_config keywords that reach a test SshServer with its user key and known_hosts."""
    options = {"HostName": server.host, "Port": str(server.port), "User": server.user,
               "IdentityFile": str(server.client_key), "IdentitiesOnly": "yes",
               "UserKnownHostsFile": str(server.known_hosts), "StrictHostKeyChecking": "yes"}
    options.update(extra)
    return options


def write_inventory(path: Path, hosts: dict[str, dict]) -> Path:
    """A YAML (JSON) inventory with every host in the group `targets`."""
    path.write_text(json.dumps({"targets": {"hosts": hosts}}, indent=1))
    return path


# --- sshd's log ---------------------------------------------------------------------------------------

FORWARD_RE = re.compile(r"server_request_direct_tcpip: originator \S+ port \d+, target (\S+) port (\d+)")


def forwarded_to(log_text: str) -> list[tuple[str, int]]:
    """(host, port) of every direct-tcpip forwarding in a LogLevel DEBUG sshd log."""
    return [(host, int(port)) for host, port in FORWARD_RE.findall(log_text)]


def accepted(log_text: str, method: str = "", user: str = "") -> list[str]:
    """Lines of successful logins ("Accepted <method> for <user> ..."), optionally filtered."""
    return [line for line in log_text.splitlines()
            if line.startswith(f"Accepted {method}") and (not user or f" for {user} from " in line)]


def fingerprint(public_key: Path) -> str:
    listing = subprocess.run(["ssh-keygen", "-l", "-f", str(public_key)], capture_output=True, text=True, check=True)
    return listing.stdout.split()[1]
