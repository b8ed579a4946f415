"""Shared fixtures: the collection on Ansible's path, a real sshd on loopback, playbook runs.

Runs under pytest-ansible (which puts the checkout, or with --ansible-unit-inject-only the
installed collection from ANSIBLE_COLLECTIONS_PATH, on the collection path) and under plain
pytest, where this file builds the same ansible_collections/ layout itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # makes tests.support importable under plain pytest

from tests.support.playenv import BIN, ansible_settings  # noqa: E402
from tests.support.sshd import SshServer  # noqa: E402


def _collections_root() -> Path:
    """The directory holding ansible_collections/multipush/sftp that tests run against."""
    for entry in os.environ.get("ANSIBLE_COLLECTIONS_PATH", "").split(os.pathsep):
        if entry and (Path(entry) / "ansible_collections" / "multipush" / "sftp" / "galaxy.yml").exists():
            return Path(entry)
        if entry and (Path(entry) / "ansible_collections" / "multipush" / "sftp" / "MANIFEST.json").exists():
            return Path(entry)
    farm = REPO / "tests" / "output" / "collections"
    target = farm / "ansible_collections" / "multipush" / "sftp"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(REPO)
    return farm


COLLECTIONS_ROOT = _collections_root()
if str(COLLECTIONS_ROOT) not in sys.path:
    sys.path.insert(0, str(COLLECTIONS_ROOT))


@pytest.fixture(scope="session")
def collections_root() -> Path:
    return COLLECTIONS_ROOT


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> SshServer:
    """A real OpenSSH server on 127.0.0.1 with temporary host and user keys."""
    server = SshServer(workdir=tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def ansible_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(ansible_settings(tmp_path, COLLECTIONS_ROOT))
    return env


class PlaybookRun:
    def __init__(self, completed: subprocess.CompletedProcess, results: dict):
        self.rc = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr
        self.results = results

    def __getitem__(self, name: str) -> dict:
        return self.results[name]

    def __repr__(self) -> str:
        return f"<PlaybookRun rc={self.rc}>\n{self.stdout[-6000:]}\n{self.stderr[-3000:]}"


@pytest.fixture
def run_play(tmp_path: Path, sshd: SshServer, ansible_env: dict):
    """Run tasks against the test sshd with ansible-playbook; return rc, output and registered results.

    Every task given with `register: NAME` has its result saved to JSON (failed or not), so tests
    assert on the real module/action result rather than on the text output.
    """

    def run(tasks: str, *, extra_args: list[str] | None = None, inventory: Path | None = None,
            env: dict | None = None, hostvars: dict | None = None, timeout: float = 600) -> PlaybookRun:
        inventory = inventory or sshd.write_inventory(tmp_path / "inventory.ini", **(hostvars or {}))
        results_dir = tmp_path / "results"
        results_dir.mkdir(exist_ok=True)
        names = [line.split(":", 1)[1].strip() for line in tasks.splitlines() if line.strip().startswith("register:")]
        save = "\n".join(
            textwrap.dedent(
                f"""\
                - name: Save {name}
                  ansible.builtin.copy:
                    content: "{{{{ {name} | default({{}}) | to_json }}}}"
                    dest: "{results_dir}/{name}.json"
                    mode: "0644"
                  delegate_to: localhost
                  check_mode: false
                  diff: false
                """
            )
            for name in names
        )
        playbook = tmp_path / "play.yml"
        playbook.write_text(
            "- name: Test play\n  hosts: targets\n  gather_facts: false\n  tasks:\n"
            + textwrap.indent(textwrap.dedent(tasks), "    ")
            + "\n  post_tasks:\n" + textwrap.indent(save, "    ") + "\n"
        )
        command = [str(BIN / "ansible-playbook"), "-i", str(inventory), str(playbook), *(extra_args or [])]
        completed = subprocess.run(
            command, env=env or ansible_env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
            check=False,
        )
        results = {path.stem: json.loads(path.read_text()) for path in results_dir.glob("*.json")}
        return PlaybookRun(completed, results)

    return run


# --- SFTP-only servers (issue 19): no shell, no exec, only the sftp subsystem --------------------


@pytest.fixture(scope="session")
def sftp_only_sshd(tmp_path_factory) -> SshServer:
    """OpenSSH with `ForceCommand internal-sftp`: every session is SFTP; an exec request gets
    "This service allows sftp connections only." and exit status 1."""
    server = SshServer(workdir=tmp_path_factory.mktemp("sftp-only-sshd"), options={"ForceCommand": "internal-sftp"})
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def asyncssh_sftp(tmp_path_factory):
    """An SFTP server that is not OpenSSH (AsyncSSH, in a subprocess): SFTP only, exec and shell refused.
    Same interface as SshServer (host, port, user, client_key, known_hosts, write_inventory, ...)."""
    from tests.support.asyncssh_server import AsyncSshServer

    server = AsyncSshServer(workdir=tmp_path_factory.mktemp("asyncssh-sftp"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def run_play_on(tmp_path: Path, run_play):
    """run_play against another server: run_play_on(server, tasks, hostvars=..., **run_play's keywords).
    The inventory is server.write_inventory(...) with the same host name, `target`."""

    def run(server, tasks: str, *, hostvars: dict | None = None, **kwargs) -> PlaybookRun:
        inventory = server.write_inventory(tmp_path / f"inventory-{server.port}.ini", **(hostvars or {}))
        return run_play(tasks, inventory=inventory, **kwargs)

    return run
