"""The examples users copy: the EXAMPLES of the modules and the journeys of docs/usage.md, run for real.

Each example runs as written with ansible-playbook against the test sshd. Only paths and hosts are
rewritten: every absolute path becomes the same path under a temporary directory (the controller and
the target are one machine here), relative paths are found in the play's files/ as they would be, and
the files an example expects to exist are made first (FIXTURES says what each one is). Expected
values written in an example (sizes, digests) are not rewritten: the fixtures are made to match them.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.files import MIB, random_file, sha256, tree_snapshot

BIN = Path(sys.executable).parent

PATH_KEYS = ("src", "dest", "path", "result_file")

# Paths used by the examples -> what the test puts there before the example runs (absolute paths are
# made under the temporary root; "files/..." next to the play). A path not listed here that an
# example reads makes the test fail and say so.
FIXTURES = {
    # push
    "/hol/lib/my-vpod": {"disks/disk1.vmdk": 3 * MIB + 17, "disks/disk2.vmdk": MIB, "vpod.json": b"{}\n"},
    "/images/disk1.vmdk": 2 * MIB + 5,
    "files/configs": {"app.conf": b"listen 8080\n", "app.conf.swp": b"swap", ".git/HEAD": b"ref: main\n",
                      "conf.d/extra.conf": b"x = 1\n"},
    # verify
    "/srv/images/disk.qcow2": 3 * MIB + 1,
    "/images/disk.qcow2": "/srv/images/disk.qcow2",  # the original of the copy: same bytes
    "/srv/data/a.bin": MIB,
    "/srv/data/b.bin": b"hello",
}
# Paths an example reads that must stay missing (the example shows how a missing file is reported).
MISSING = {"/srv/data/c.bin"}


def examples_of(collections_root: Path, module: str) -> list[dict]:
    """The EXAMPLES block of a module of the collection under test, as a list of tasks."""
    path = collections_root / "ansible_collections" / "multipush" / "sftp" / "plugins" / "modules" / f"{module}.py"
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "EXAMPLES" for t in node.targets):
            tasks = yaml.safe_load(node.value.value)
            assert isinstance(tasks, list) and tasks, f"{path}: EXAMPLES is not a list of tasks"
            return tasks
    raise AssertionError(f"{path} has no EXAMPLES")


def rewrite(value, root: Path, key: str | None = None):
    """The same structure with every absolute path in src/dest/path moved under root."""
    if isinstance(value, dict):
        return {k: rewrite(v, root, k) for k, v in value.items()}
    if isinstance(value, list):
        return [rewrite(item, root, key) for item in value]
    if key in PATH_KEYS and isinstance(value, str) and value.startswith("/"):
        return f"{root}{value}"
    return value


def read_paths(task: dict) -> list[tuple[str, str]]:
    """(module, path) for every path the task reads: src of push, path of verify and stat."""
    module = next(key for key in task if "." in key)
    args = task[module] or {}
    found = []
    if module == "multipush.sftp.push":
        found.append(args["src"])
    elif "path" in args:
        found.append(args["path"])
    for entry in args.get("files") or []:
        found.append(entry["path"])
    return [(module, path) for path in found if "{{" not in path]


def make_fixture(target: Path, spec, root: Path) -> None:
    if isinstance(spec, dict):
        target.mkdir(parents=True, exist_ok=True)
        for rel, content in spec.items():
            make_fixture(target / rel, content, root)
    elif isinstance(spec, bytes):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(spec)
    elif isinstance(spec, int):
        random_file(target, spec, seed=len(str(target)))
    else:  # a copy of another fixture
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(f"{root}{spec}").read_bytes())


def prepare(tasks: list[dict], play_dir: Path, root: Path) -> None:
    """Make the files the tasks (as written, before rewrite) read, in FIXTURES order (originals before copies)."""
    wanted = set()
    for task in tasks:
        for module, path in read_paths(task):
            name = path.rstrip("/") or "/"
            if not name.startswith("/"):
                name = f"files/{name}"
            # the fixture itself, one that holds it, or (for a directory) the fixtures inside it
            parents = [candidate for candidate in FIXTURES
                       if name == candidate or name.startswith(candidate + "/") or candidate.startswith(name + "/")]
            if not parents and name not in MISSING:
                raise AssertionError(f"{module} example {task['name']!r} reads {path}: give it a fixture in FIXTURES")
            wanted.update(parents)
    for name, spec in FIXTURES.items():
        if name in wanted:
            make_fixture(play_dir / name if name.startswith("files/") else Path(f"{root}{name}"), spec, root)


def as_play(tasks: list[dict]) -> tuple[str, list[str]]:
    """Task YAML for run_play, every task registered (keeping the example's own register names)."""
    registered = []
    for index, task in enumerate(tasks):
        task.setdefault("register", f"example_{index}")
        registered.append(task["register"])
    return yaml.safe_dump(tasks, sort_keys=False, width=1000), registered


def run_examples(run_play, tmp_path: Path, collections_root: Path, module: str):
    root = tmp_path / "root"
    examples = examples_of(collections_root, module)
    prepare(examples, tmp_path, root)
    tasks = [rewrite(task, root) for task in examples]
    text, registered = as_play(tasks)
    run = run_play(text)
    for task, name in zip(tasks, registered):
        assert name in run.results, f"example {task['name']!r} did not run\n{run!r}"
        result = run[name]
        assert not result.get("failed"), f"example {task['name']!r} failed: {result.get('msg')}\n{run!r}"
    assert run.rc == 0, run
    return tasks, run


def excluded(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    return any(
        fnmatch.fnmatch(rel, pattern) or any(fnmatch.fnmatch(part, pattern) for part in parts) for pattern in patterns
    )


def test_push_examples_run_as_written(run_play, tmp_path, collections_root):
    tasks, run = run_examples(run_play, tmp_path, collections_root, "push")
    pushes = [task for task in tasks if "multipush.sftp.push" in task]
    assert len(pushes) >= 3
    for task in pushes:
        args, result = task["multipush.sftp.push"], run[task["register"]]
        assert result["changed"] is True, task["name"]
        assert result["files_total"] > 0 and result["files_sent"] == result["files_total"], (task["name"], result)
        for entry in result["files"]:
            assert entry["status"] == "sent"
            assert sha256(Path(entry["dest"])) == sha256(Path(entry["src"])), entry
        patterns = args.get("exclude") or []
        if patterns:  # a directory's contents (trailing slash) with exclusions
            src = Path(args["src"]) if args["src"].startswith("/") else tmp_path / "files" / args["src"]
            dest = Path(args["dest"])
            assert [p for p in src.rglob("*") if excluded(str(p.relative_to(src)), patterns)], "nothing to exclude"
            assert not [p for p in dest.rglob("*") if excluded(str(p.relative_to(dest)), patterns)]
            assert {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()} == {
                str(p.relative_to(src)) for p in src.rglob("*")
                if p.is_file() and not excluded(str(p.relative_to(src)), patterns)}
        if args.get("verify", "checksum") == "checksum":  # files in ranges: their digest only on request
            assert all(entry["checksum"] for entry in result["files"]
                       if entry["ranges"] == 1 or args.get("whole_checksum"))
        if "connections" in args:
            assert result["connections"] <= args["connections"]


def test_verify_examples_run_as_written(run_play, tmp_path, collections_root):
    tasks, run = run_examples(run_play, tmp_path, collections_root, "verify")
    root = tmp_path / "root"
    image = root / "srv" / "images" / "disk.qcow2"
    first = run["image"]
    assert first["checksum"] == sha256(image)
    assert len(first["chunk_checksums"]) == math.ceil(image.stat().st_size / 67108864)
    batch = run["batch"]
    by_name = {Path(entry["path"]).name: entry for entry in batch["files"]}
    assert by_name["a.bin"]["size"] == MIB
    assert by_name["b.bin"]["checksum"] == hashlib.md5(b"hello").hexdigest()
    assert by_name["c.bin"]["exists"] is False
    shown = [run[task["register"]] for task in tasks if "ansible.builtin.debug" in task]
    assert shown[-1]["msg"] == [str(root / "srv" / "data" / "c.bin")]
    assert re.fullmatch(r"[0-9a-f]{64} \(1 ranges of 64 MiB\)", shown[0]["msg"]), shown[0]


def test_an_example_that_does_not_match_its_fixture_fails(run_play, tmp_path, collections_root):
    """The harness can fail: a verify example whose expected digest is wrong must be reported failed."""
    root = tmp_path / "root"
    wrong = [{"name": "Wrong digest", "multipush.sftp.verify": {
        "path": "/srv/data/b.bin", "checksum": hashlib.md5(b"other").hexdigest(), "checksum_algorithm": "md5"}}]
    prepare(wrong, tmp_path, root)
    tasks = [rewrite(task, root) for task in wrong]
    text, registered = as_play(tasks)
    run = run_play(text)
    assert run.rc == 2, run
    assert registered[0] not in run.results  # a failed task ends the play for the host before the results are saved
    assert "b.bin" in run.stdout and "expected" in run.stdout, run
    with pytest.raises(AssertionError, match="give it a fixture"):
        prepare([{"name": "Unknown", "multipush.sftp.verify": {"path": "/nowhere/x"}}], tmp_path, root)


# -- docs/usage.md: the three journeys ---------------------------------------------------------------


def usage_block(collections_root: Path, name: str) -> str:
    """The fenced block of docs/usage.md marked with <!-- example: NAME -->."""
    text = (collections_root / "ansible_collections" / "multipush" / "sftp" / "docs" / "usage.md").read_text()
    match = re.search(rf"<!-- example: {re.escape(name)} -->\s*```\w*\n(.*?)```", text, re.S)
    assert match, f"docs/usage.md has no block marked <!-- example: {name} -->"
    return match.group(1)


def command_of(block: str) -> list[str]:
    """The words of a one-command shell block (backslash continuations joined)."""
    return shlex.split(block.replace("\\\n", " "))


def swap(words: list[str], mapping: dict[str, str]) -> list[str]:
    """Replace whole words, and paths after -e NAME=, as given in mapping (path prefixes included)."""
    out = []
    for word in words:
        name, sep, value = word.partition("=")
        if sep and value.startswith("/") and word not in mapping:
            out.append(f"{name}={swap_path(value, mapping)}")
        else:
            out.append(mapping.get(word, word))
    return out


def swap_path(path: str, mapping: dict[str, str]) -> str:
    for old, new in mapping.items():
        if old.startswith("/") and (path == old or path.startswith(old.rstrip("/") + "/")):
            return new.rstrip("/") + path[len(old.rstrip("/")):]
    raise AssertionError(f"no test location for the path {path}")


def playbook(env: dict, words: list[str], cwd: Path) -> subprocess.CompletedProcess:
    assert words[0] == "ansible-playbook"
    return subprocess.run([str(BIN / "ansible-playbook"), *words[1:]], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL, check=False)


def recap(stdout: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host."""
    found = {}
    for line in stdout.split("PLAY RECAP", 1)[-1].splitlines():
        match = re.match(r"(\S+)\s+:\s+(.*)", line)
        if match:
            found[match.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2))}
    return found


def make_vpod(root: Path) -> Path:
    random_file(root / "disks" / "disk1.vmdk", 3 * MIB + 11, seed=21)
    random_file(root / "disks" / "disk2.vmdk", MIB, seed=22)
    (root / "vpod.json").write_text('{"name": "my-vpod"}\n')
    return root


def test_laptop_journey_check_then_push_then_nothing_to_do(sshd, ansible_env, tmp_path, collections_root):
    root = tmp_path / "root"
    vpod = make_vpod(root / "hol" / "lib" / "my-vpod")
    copy = root / "hol" / "lib" / "my-vpod-copy"
    # lvn-cat is the test sshd; the user is the one it accepts
    inventory = sshd.write_inventory(tmp_path / "hosts.ini", name="lvn-cat")
    mapping = {"lvn-cat,": str(inventory), "hol-mgr": sshd.user, "/hol": f"{root}/hol"}

    check = command_of(usage_block(collections_root, "laptop-check"))
    assert "--check" in check
    dry = playbook(ansible_env, swap(check, mapping), tmp_path)
    assert dry.returncode == 0, dry.stdout[-4000:] + dry.stderr
    assert not copy.exists(), "check mode wrote something"
    assert "disk1.vmdk" in dry.stdout  # --diff lists what would be sent

    push = playbook(ansible_env, swap(command_of(usage_block(collections_root, "laptop-push")), mapping), tmp_path)
    assert push.returncode == 0, push.stdout[-4000:] + push.stderr
    assert tree_snapshot(copy) == tree_snapshot(vpod)
    assert recap(push.stdout)["lvn-cat"]["failed"] == 0

    again = playbook(ansible_env, swap(check, mapping), tmp_path)
    assert again.returncode == 0, again.stdout[-4000:]
    assert recap(again.stdout)["lvn-cat"]["changed"] == 0, again.stdout[-3000:]


def pipeline_script(collections_root: Path, tmp_path: Path, root: Path, inventory: Path) -> Path:
    script = usage_block(collections_root, "pipeline-script")
    for old, new in (("/tmp/push-results", str(tmp_path / "push-results")), ("/build/out/", f"{root}/build/out/"),
                     ("/srv/app", f"{root}/srv/app"), ("inventory.ini", str(inventory))):
        assert old in script, f"the pipeline example no longer mentions {old}"
        script = script.replace(old, new)
    path = tmp_path / "deploy.sh"
    path.write_text(script)
    return path


def test_pipeline_journey_exit_codes_and_json_results(sshd, ansible_env, tmp_path, collections_root):
    root = tmp_path / "root"
    make_vpod(root / "build" / "out")
    good = tmp_path / "good.ini"
    sshd.write_inventory(good, name="web1")
    script = pipeline_script(collections_root, tmp_path, root, good)
    run = subprocess.run(["sh", str(script)], env=ansible_env, capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr
    assert "all hosts are up to date" in run.stdout
    result = json.loads((tmp_path / "push-results" / "web1.json").read_text())
    assert result["files_sent"] == 3 and result["changed"] is True
    assert f"web1.json: 3 sent, 0 skipped, {result['bytes_sent']} bytes" in run.stdout
    assert tree_snapshot(root / "srv" / "app") == tree_snapshot(root / "build" / "out")

    # One host whose key is not known: refused at once (nothing written) and reported unreachable, as
    # Ansible's ssh connection would; the other one is pushed
    mixed = tmp_path / "mixed.ini"
    mixed.write_text("[targets]\n" + sshd.inventory_line("web1") + "\n" + sshd.inventory_line(
        "web2", ansible_ssh_common_args="'-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes'") + "\n")
    script = pipeline_script(collections_root, tmp_path, root, mixed)
    run = subprocess.run(["sh", str(script)], env=ansible_env, capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL, check=False)
    assert run.returncode == 4, run.stdout[-4000:] + run.stderr
    assert "some hosts were unreachable" in run.stderr
    assert sorted(p.name for p in (tmp_path / "push-results").iterdir()) == ["web1.json", "web2.json"]
    assert "web1.json: 0 sent, 3 skipped, 0 bytes" in run.stdout
    assert "web2.json: unreachable: " in run.stdout and "not known" in run.stdout
    assert recap(run.stdout)["web2"]["unreachable"] == 1

    # A push that fails on a host (its destination is a file): exit 2, and that host's result file says why
    (root / "srv" / "blocked").write_text("a file where the tree should go")
    script = pipeline_script(collections_root, tmp_path, root, good)
    script.write_text(script.read_text().replace(f"dest={root}/srv/app", f"dest={root}/srv/blocked"))
    shutil.rmtree(tmp_path / "push-results", ignore_errors=True)
    run = subprocess.run(["sh", str(script)], env=ansible_env, capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL, check=False)
    assert run.returncode == 2, run.stdout[-4000:] + run.stderr
    assert "push failed on some hosts" in run.stderr
    failed = json.loads((tmp_path / "push-results" / "web1.json").read_text())
    assert failed["failed"] is True and "but src is a directory" in failed["msg"]
    assert "web1.json: failed: " in run.stdout


def test_fleet_journey_waves_throttle_and_every_host_pushed(sshd, ansible_env, tmp_path, collections_root):
    root = tmp_path / "root"
    image = random_file(root / "images" / "esxi-01-flat.vmdk", 2 * MIB + 3, seed=31)
    hosts = [f"lab{index}" for index in range(1, 5)]
    (tmp_path / "lab.ini").write_text("[lab_hosts]\n" + "\n".join(sshd.inventory_line(host) for host in hosts) + "\n")
    play = yaml.safe_load(usage_block(collections_root, "fleet-playbook"))
    push = play[0]["tasks"][0]["multipush.sftp.push"]
    push["src"] = f"{root}{push['src']}"
    # all test hosts share one filesystem: each gets its own copy of the destination tree
    push["dest"] = f"{root}/{{{{ inventory_hostname }}}}{push['dest']}"
    (tmp_path / "rollout.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    run = playbook(ansible_env, command_of(usage_block(collections_root, "fleet-command")), tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr
    for host in hosts:
        pushed = root / host / "vmfs" / "volumes" / "datastore1" / image.name
        assert sha256(pushed) == sha256(image), host
        assert f"{host}: 1 sent" in run.stdout
    counters = recap(run.stdout)
    assert sorted(counters) == hosts and all(c["failed"] == 0 for c in counters.values())
    # serial [1, "25%"] of 4 hosts: four waves, each announced by its own PLAY banner
    assert run.stdout.count("PLAY [Roll the ESXi image out to the lab hosts]") == 4
    # fanout: the controller seeds the first wave's host; each later wave is fed by a host of an earlier one
    assert "lab1: fan-out: fed by controller" in run.stdout
    assert sum(f"{host}: fan-out: fed by lab" in run.stdout for host in hosts[1:]) == 3, run.stdout[-4000:]
