"""The README's operator section, run as written, so that it cannot drift from what works (issue 23).

The blocks marked `<!-- operator: NAME -->` in README.md are extracted and run with bash from the
checkout, as a new operator would type them: a fresh HOME (nothing in ~/.ansible, no collections
path set, the checkout's .venv not on PATH), so `ansible-galaxy collection install` puts the
collection where Ansible looks by default and `ansible-doc` must find it there. The install block runs
verbatim. In the push block only what names the operator's world is replaced: the user (`-u hol-mgr`)
and the absolute paths (moved under a temporary directory); the host name `lvn-cat` stays and reaches
the test sshd through ~/.ssh/config, as a real operator's would.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.files import MIB, random_file, sha256, tree_snapshot

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def operator_blocks() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    return dict(re.findall(r"<!-- operator: (\w+) -->\n```sh\n(.*?)\n```", text, re.S))


def fresh_env(home: Path) -> dict:
    """The environment of a new operator: their own HOME, no Ansible settings, the checkout's venv off PATH."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("ANSIBLE_", "PYTEST", "VIRTUAL_ENV")) and key != "PYTHONPATH"}
    path = [entry for entry in env.get("PATH", "").split(os.pathsep)
            if entry and Path(entry).resolve() != VENV_BIN.resolve()]
    if not shutil.which("python3", path=os.pathsep.join(path)):
        path.append(str(Path(sys.base_prefix) / "bin"))  # ./dev needs a python3 to check the venv with
    env.update(HOME=str(home), PATH=os.pathsep.join(path), ANSIBLE_NOCOLOR="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_NO_INPUT="1")
    return env


def bash(script: str, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=timeout, check=False)


def test_readme_has_the_operator_blocks_and_names_the_tarball_of_this_version():
    blocks = operator_blocks()
    assert set(blocks) >= {"install", "push"}, blocks.keys()
    version = yaml.safe_load((REPO / "galaxy.yml").read_text())["version"]
    assert f"build/multipush-sftp-{version}.tar.gz" in blocks["install"], (
        f"README's install block must name the tarball ./dev build makes for version {version}")


def test_readme_install_then_push_as_written_from_a_fresh_home(tmp_path, sshd):
    blocks = operator_blocks()
    home = tmp_path / "home"
    home.mkdir()
    env = fresh_env(home)

    install = bash(blocks["install"], env)
    assert install.returncode == 0, f"{install.stdout[-4000:]}\n{install.stderr[-4000:]}"
    installed = home / ".ansible" / "collections" / "ansible_collections" / "multipush" / "sftp"
    assert (installed / "MANIFEST.json").is_file() and (installed / "requirements.txt").is_file()
    assert "multipush.sftp.push" in install.stdout and "OPTIONS" in install.stdout, install.stdout[-3000:]
    assert "was not found" not in install.stdout + install.stderr

    # The operator's ssh setup: lvn-cat is the test sshd; its host key is known.
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700)
    (ssh / "config").write_text(f"Host lvn-cat\n  HostName {sshd.host}\n  Port {sshd.port}\n"
                                f"  IdentityFile {sshd.client_key}\n  IdentitiesOnly yes\n")
    (ssh / "known_hosts").write_text(sshd.known_hosts_line())
    root = tmp_path / "root"
    source = root / "hol" / "lib" / "my-vpod"
    random_file(source / "disks" / "disk1.vmdk", 3 * MIB + 7)
    (source / "vpod.json").write_text("{}\n")
    command = blocks["push"].replace("-u hol-mgr", f"-u {sshd.user}").replace("=/hol/", f"={root}/hol/")
    assert "-i lvn-cat," in command and str(root) in command, command
    # the shell of the block that activated .venv is gone: the operator's shell still has it
    push = bash(f". .venv/bin/activate\n{command}", env)
    assert push.returncode == 0, f"{push.stdout[-4000:]}\n{push.stderr[-4000:]}"
    copy = root / "hol" / "lib" / "my-vpod-copy"
    assert tree_snapshot(copy) == tree_snapshot(source)
    assert sha256(copy / "disks" / "disk1.vmdk") == sha256(source / "disks" / "disk1.vmdk")
    assert f"{copy}: 2 sent, 0 skipped, 3.0 MiB in " in push.stdout, push.stdout[-3000:]


@pytest.mark.parametrize("name", ["install", "push"])
def test_operator_blocks_are_plain_commands(name):
    """Nothing in them that only works in this repository's CI (no ./dev test, no build/collections/<hash>)."""
    body = operator_blocks()[name]
    assert "build/collections/" not in body and "ANSIBLE_COLLECTIONS_PATH" not in body, body
