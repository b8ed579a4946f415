"""A throwaway OpenSSH server on loopback, with its own host key, user key and known_hosts.

Used by the pytest fixtures and by the demo (`./dev demo`). Everything lives in one
temporary directory; nothing outside it is touched except /run/sshd, which sshd's
privilege separation requires when it runs as root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin:" + os.environ.get("PATH", "")) or "/usr/sbin/sshd"
SFTP_SERVER_CANDIDATES = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def sftp_server_path() -> str:
    for candidate in SFTP_SERVER_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return "internal-sftp"


def generate_key(path: Path, key_type: str = "ed25519", passphrase: str = "") -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", key_type, "-N", passphrase, "-C", "multipush-test", "-f", str(path)],
        check=True,
    )
    return path


@dataclass
class LoopbackServer:
    """What every test server shares (OpenSSH here, AsyncSSH in asyncssh_server.py): its directory,
    address, user and keys, stopping its process, and the inventory line that makes Ansible and the
    push trust it and only its key. `options`: the server's own settings."""

    workdir: Path
    host: str = "127.0.0.1"
    port: int = 0
    user: str = field(default_factory=lambda: pwd.getpwuid(os.getuid()).pw_name)
    options: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def host_key(self) -> Path:
        return self.workdir / "ssh_host_ed25519_key"

    @property
    def client_key(self) -> Path:
        return self.workdir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "known_hosts"

    @property
    def authorized_keys(self) -> Path:
        return self.workdir / "authorized_keys"

    # what messages call the server; its log file is `log_file` (a property of each kind)
    name = "the server"

    def known_hosts_line(self) -> str:
        public = self.host_key.with_suffix(".pub").read_text().split()
        name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        return f"{name} {public[0]} {public[1]}\n"

    def prepare_keys(self) -> None:
        """Its private directory, host key, the client's key (the only one it accepts), a free port
        when none was given, and the known_hosts line that trusts it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        if not self.host_key.exists():
            generate_key(self.host_key)
        if not self.client_key.exists():
            generate_key(self.client_key)
        self.authorized_keys.write_text(self.client_key.with_suffix(".pub").read_text())
        if not self.port:
            self.port = free_port(self.host)
        self.known_hosts.write_text(self.known_hosts_line())

    def launch(self, command: list[str], timeout: float, **popen) -> None:
        """Start the server's process, its output into its log, and wait until it greets with SSH."""
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            **popen)
        self.wait_ready(timeout)

    def _log_tail(self) -> str:
        return self.log_file.read_text()[-2000:] if self.log_file.exists() else ""

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self._log_tail()}")
            with contextlib.suppress(OSError):
                with socket.create_connection((self.host, self.port), timeout=1) as probe:
                    probe.settimeout(2)
                    if probe.recv(4) == b"SSH-":
                        return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} on {self.host}:{self.port} not ready after {timeout}s: {self._log_tail()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def ssh_common_args(self) -> str:
        """What Ansible's own ssh connection needs to trust this server and only its key."""
        return f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"

    def inventory_line(self, name: str = "target", **extra: str) -> str:
        hostvars = {
            "ansible_host": self.host,
            "ansible_port": str(self.port),
            "ansible_user": self.user,
            "ansible_ssh_private_key_file": str(self.client_key),
            "ansible_ssh_common_args": f"'{self.ssh_common_args()}'",
            "ansible_python_interpreter": os.environ.get("MULTIPUSH_TARGET_PYTHON", sys.executable),
        }
        hostvars.update(extra)
        return name + " " + " ".join(f"{key}={value}" for key, value in hostvars.items())

    def write_inventory(self, path: Path, name: str = "target", **extra: str) -> Path:
        path.write_text("[targets]\n" + self.inventory_line(name, **extra) + "\n")
        return path

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class SshServer(LoopbackServer):
    """One running sshd. `options` are extra sshd_config lines (keyword -> value)."""

    name = "sshd"

    @property
    def config_file(self) -> Path:
        return self.workdir / "sshd_config"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "sshd.pid"

    @property
    def log_file(self) -> Path:
        return self.workdir / "sshd.log"

    def prepare(self) -> None:
        self.prepare_keys()
        self.write_config()

    def config_lines(self) -> list[str]:
        base = {
            "ListenAddress": f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}",
            "HostKey": str(self.host_key),
            "PidFile": str(self.pid_file),
            "AuthorizedKeysFile": str(self.authorized_keys),
            "StrictModes": "no",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "PubkeyAuthentication": "yes",
            "PermitRootLogin": "prohibit-password",
            "UsePAM": "no",
            "Subsystem": f"sftp {sftp_server_path()}",
            "MaxStartups": "100:30:200",
            "MaxSessions": "64",
            "LogLevel": "VERBOSE",
            "UseDNS": "no",
        }
        base.update(self.options)
        return [f"{key} {value}" for key, value in base.items() if value is not None]

    def write_config(self) -> None:
        self.config_file.write_text("\n".join(self.config_lines()) + "\n")

    def start(self, timeout: float = 15.0) -> "SshServer":
        self.prepare()
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        check = subprocess.run([SSHD, "-t", "-f", str(self.config_file)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"sshd rejected its test config {self.config_file}: {check.stderr.strip()}")
        self.launch([SSHD, "-D", "-e", "-f", str(self.config_file)], timeout)
        return self

    def session_pids(self) -> list[int]:
        """The per-connection sshd processes: children of the listening daemon."""
        children = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if self.process is not None and int(fields[1]) == self.process.pid:
                    children.append(int(entry.name))
        return children

    def reload(self) -> None:
        os.kill(self.process.pid, signal.SIGHUP)


def throwaway_server(**kwargs) -> SshServer:
    return SshServer(workdir=Path(tempfile.mkdtemp(prefix="multipush-sshd-")), **kwargs)
