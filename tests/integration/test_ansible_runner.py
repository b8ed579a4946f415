"""Where Ansible users scale out: ansible-runner (AWX, Automation Platform) and execution environments.

The push playbook runs through ansible-runner's Python API and its command line, against the test
sshd, and must return what ansible-playbook returns for the same push. ansible-builder must read
the collection's meta/execution-environment.yml (paramiko, the OpenSSH client), and the execution
environment definition in docs/usage.md must produce a build context (no container engine needed).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.files import MIB, random_file, sha256, tree_snapshot

ansible_runner = pytest.importorskip("ansible_runner", reason="ansible-runner is in requirements-dev.txt")

BIN = Path(sys.executable).parent
# Differ between two runs of the same push: durations and what depends on them.
# summary has the time; connections: auto sizes the pool by what it measures (the round trip, rates)
VOLATILE = {"seconds", "throughput_mb_s", "handshake_retries", "retries", "phases", "summary",
            "connections", "connections_reason", "round_trip_ms"}


def substance(result: dict) -> dict:
    """A push result without durations, retries and Ansible's own bookkeeping keys."""
    kept = {key: value for key, value in result.items()
            if key not in VOLATILE and not key.startswith("_ansible") and key not in ("invocation", "warnings")
            and not (key == "failed" and value is False)}  # a registered result says failed: false
    if "remote_hashing" in kept:
        kept["remote_hashing"] = {k: v for k, v in kept["remote_hashing"].items() if k != "seconds"}
    kept["files"] = sorted(({k: v for k, v in entry.items() if k not in VOLATILE} for entry in result["files"]),
                           key=lambda entry: entry["dest"])
    return kept


@pytest.fixture
def vpod(tmp_path) -> Path:
    root = tmp_path / "vpod"
    random_file(root / "disk1.vmdk", 6 * MIB + 1, seed=7)
    random_file(root / "sub" / "disk2.vmdk", MIB, seed=8)
    (root / "vpod.json").write_text('{"name": "my-vpod"}\n')
    return root


def push_vars(vpod: Path, dest: Path) -> dict:
    return {"src": f"{vpod}/", "dest": str(dest), "push_connections": 3, "push_chunk_size": "2M"}


def playbook_push(ansible_env: dict, inventory: Path, extravars: dict, result_dir: Path) -> dict:
    """The same push with ansible-playbook; its result as the playbook writes it (-e result_dir)."""
    args = [str(BIN / "ansible-playbook"), "multipush.sftp.push", "-i", str(inventory),
            "-e", json.dumps(dict(extravars, result_dir=str(result_dir)))]
    completed = subprocess.run(args, env=ansible_env, capture_output=True, text=True, timeout=600,
                               stdin=subprocess.DEVNULL, check=False)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    return json.loads((result_dir / "target.json").read_text())


def runner_env(ansible_env: dict) -> dict:
    """What ansible-runner passes on to ansible-playbook (it adds these to its own environment)."""
    keep = ("ANSIBLE_COLLECTIONS_PATH", "ANSIBLE_HOST_KEY_CHECKING", "ANSIBLE_PYTHON_INTERPRETER",
            "ANSIBLE_LOCAL_TEMP", "ANSIBLE_REMOTE_TEMP", "ANSIBLE_SSH_CONTROL_PATH_DIR", "ANSIBLE_NOCOLOR",
            "ANSIBLE_RETRY_FILES_ENABLED", "ANSIBLE_DEPRECATION_WARNINGS", "PATH")
    return {key: ansible_env[key] for key in keep if key in ansible_env}


def push_events(events) -> list[dict]:
    return [event for event in events
            if event.get("event") in ("runner_on_ok", "runner_on_failed")
            and event["event_data"].get("resolved_action", event["event_data"].get("task_action"))
            in ("multipush.sftp.push",)]


def test_ansible_runner_with_an_agent_key_returns_what_ansible_playbook_returns(sshd, ansible_env, tmp_path, vpod):
    inventory = sshd.write_inventory(tmp_path / "inventory.ini")
    dest = tmp_path / "remote" / "my-vpod"
    expected = playbook_push(ansible_env, inventory, push_vars(vpod, dest), tmp_path / "results")
    assert expected["files_sent"] == 3 and expected["changed"] is True
    shutil.rmtree(tmp_path / "remote")  # the same push again, from scratch, through ansible-runner

    # As AWX does with a machine credential: the key goes to ansible-runner, which loads it into an
    # ssh-agent for the run; the inventory names no key file.
    line = re.sub(r" ansible_ssh_private_key_file=\S+", "", sshd.inventory_line("target"))
    line = line.replace(" -o IdentitiesOnly=yes", "")
    assert "private_key" not in line and str(sshd.client_key) not in line
    (tmp_path / "agent.ini").write_text(f"[targets]\n{line}\n")
    private = tmp_path / "runner"
    private.mkdir()
    runner = ansible_runner.run(
        private_data_dir=str(private),
        playbook=str(Path(ansible_env["ANSIBLE_COLLECTIONS_PATH"]) / "ansible_collections" / "multipush" / "sftp"
                     / "playbooks" / "push.yml"),
        inventory=str(tmp_path / "agent.ini"),
        extravars=push_vars(vpod, dest),
        envvars=runner_env(ansible_env),
        ssh_key=sshd.client_key.read_text(),
        quiet=True,
        timeout=600,
    )
    assert runner.rc == 0 and runner.status == "successful", runner.stdout.read()[-4000:]
    assert runner.stats["ok"].get("target"), runner.stats
    assert not runner.stats["failures"] and not runner.stats["dark"], runner.stats
    (event,) = push_events(runner.events)
    assert event["event"] == "runner_on_ok" and event["event_data"]["host"] == "target"
    result = event["event_data"]["res"]
    assert substance(result) == substance(expected)
    assert tree_snapshot(dest) == tree_snapshot(vpod)
    assert sha256(dest / "disk1.vmdk") == sha256(vpod / "disk1.vmdk")
    # the job events ansible-runner stores for AWX carry the same result
    stored = [json.loads(path.read_text()) for path in (private / "artifacts").glob("*/job_events/*.json")]
    assert [substance(e["event_data"]["res"]) for e in push_events(stored)] == [substance(expected)]


def test_ansible_runner_command_line_with_a_private_data_dir(sshd, ansible_env, tmp_path, vpod, collections_root):
    """The layout of docs/usage.md (AWX's too): inventory/, env/extravars, env/envvars, project/push.yml."""
    private = tmp_path / "pdd"
    dest = tmp_path / "remote" / "cli"
    (private / "inventory").mkdir(parents=True)
    sshd.write_inventory(private / "inventory" / "hosts")
    (private / "env").mkdir()
    extravars = yaml.safe_load(usage_block(collections_root, "runner-extravars"))
    assert (extravars["src"], extravars["dest"]) == ("/build/out/", "/srv/app")
    extravars.update(src=f"{vpod}/", dest=str(dest))  # the test's paths
    (private / "env" / "extravars").write_text(yaml.safe_dump(extravars))
    (private / "env" / "envvars").write_text(yaml.safe_dump(runner_env(ansible_env)))
    (private / "project").mkdir()
    (private / "project" / "push.yml").write_text(usage_block(collections_root, "runner-project"))
    completed = subprocess.run(
        [str(BIN / "ansible-runner"), "run", str(private), "-p", "push.yml", "--ident", "first"],
        env=ansible_env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, check=False,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    artifacts = private / "artifacts" / "first"
    assert (artifacts / "rc").read_text() == "0" and (artifacts / "status").read_text() == "successful"
    events = [json.loads(path.read_text()) for path in (artifacts / "job_events").glob("*.json")]
    (event,) = push_events(events)
    assert event["event_data"]["res"]["files_sent"] == 3
    assert tree_snapshot(dest) == tree_snapshot(vpod)
    # a second run changes nothing, and says so
    completed = subprocess.run(
        [str(BIN / "ansible-runner"), "run", str(private), "-p", "push.yml", "--ident", "second"],
        env=ansible_env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, check=False,
    )
    assert completed.returncode == 0, completed.stdout[-4000:]
    events = [json.loads(path.read_text()) for path in (private / "artifacts" / "second" / "job_events").glob("*.json")]
    (event,) = push_events(events)
    result = event["event_data"]["res"]
    assert result["changed"] is False and result["files_skipped"] == 3 and result["bytes_sent"] == 0


def test_substance_ignores_timings_but_not_content():
    one = {"changed": True, "seconds": 1.0, "files": [{"dest": "/a", "bytes_sent": 5, "seconds": 0.1}]}
    two = {"changed": True, "seconds": 9.0, "files": [{"dest": "/a", "bytes_sent": 5, "seconds": 3.0}]}
    assert substance(one) == substance(two)
    two["files"][0]["bytes_sent"] = 4
    assert substance(one) != substance(two)


# -- execution environments -------------------------------------------------------------------------


def builder(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ansible-builder"), *args], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, check=False, cwd=cwd)


def test_ansible_builder_reads_the_collection_dependencies(collections_root):
    from ansible_builder.ee_schema import validate_schema

    collection = collections_root / "ansible_collections" / "multipush" / "sftp"
    validate_schema(yaml.safe_load((collection / "meta" / "execution-environment.yml").read_text()))
    completed = builder("introspect", "--sanitize", str(collections_root))
    assert completed.returncode == 0, completed.stderr
    found = yaml.safe_load(completed.stdout)
    paramiko = [line for line in found["python"] if line.startswith("paramiko")]
    assert paramiko and "from collection multipush.sftp" in paramiko[0], found
    assert any(line.startswith("openssh-client [platform:dpkg]") for line in found["system"]), found
    assert any(line.startswith("openssh-clients [platform:rpm]") for line in found["system"]), found


def usage_block(collections_root: Path, name: str) -> str:
    """A fenced block of docs/usage.md marked with <!-- example: NAME -->."""
    text = (collections_root / "ansible_collections" / "multipush" / "sftp" / "docs" / "usage.md").read_text()
    match = re.search(rf"<!-- example: {re.escape(name)} -->\s*```\w*\n(.*?)```", text, re.S)
    assert match, f"docs/usage.md has no block marked <!-- example: {name} -->"
    return match.group(1)


def test_execution_environment_definition_in_the_docs_builds_a_context(tmp_path, collections_root):
    from ansible_builder.ee_schema import validate_schema

    work = tmp_path / "ee"
    work.mkdir()
    text = usage_block(collections_root, "ee-definition")
    (work / "execution-environment.yml").write_text(text)
    definition = yaml.safe_load(text)
    validate_schema(yaml.safe_load(text))
    assert definition["version"] == 3
    assert [c["name"] for c in definition["dependencies"]["galaxy"]["collections"]] == ["multipush.sftp"]
    completed = builder("create", "-f", "execution-environment.yml", "-c", "context", "--output-filename",
                        "Containerfile", cwd=work)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    containerfile = (work / "context" / "Containerfile").read_text()
    assert "ansible-galaxy collection install" in containerfile
    assert "multipush.sftp" in (work / "context" / "_build" / "requirements.yml").read_text()
    assert "ansible-core>=2.16" in containerfile and "python3.11" in containerfile
    # Building the image itself needs podman or docker and a container registry: not done here.
