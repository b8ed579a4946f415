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
import math
import re
from pathlib import Path

import pytest
import yaml

from tests.support.files import MIB, random_file, sha256

PATH_KEYS = ("src", "dest", "path")

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
        if args.get("verify", "checksum") == "checksum":
            assert all(entry["checksum"] for entry in result["files"])
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
