"""Where the push behaves like ansible.builtin.copy (issue 19): the metadata of directories it did not
create, symlinked destination directories, and why a file was skipped. ansible-playbook against a real sshd.

The SSH user of these tests is root, so owner and group can be given without become.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.playenv import push_task
from tests.support.files import leftovers, sha256

OLD = 1_400_000_000  # mtime of what already exists on the target
SRC_TIME = 1_600_000_000  # mtime of the source tree
OWNER, GROUP = 4242, 4343  # owner of what already exists on the target
NEW_OWNER, NEW_GROUP = 5151, 5252  # owner and group the push is given


def _meta(path: Path) -> tuple[int, int, int, int]:
    info = path.lstat()
    return stat.S_IMODE(info.st_mode), int(info.st_mtime), info.st_uid, info.st_gid


def _existing_dir(path: Path, mode: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, OWNER, GROUP)
    os.chmod(path, mode)  # after chown, which clears set-id bits
    os.utime(path, (OLD, OLD))
    return path


def _source(tmp_path: Path) -> Path:
    """src/ (0700) with an existing-on-target subdirectory `shared` (0755), a new one `fresh` (0750)."""
    root = tmp_path / "src"
    (root / "shared").mkdir(parents=True)
    (root / "fresh" / "inner").mkdir(parents=True)
    (root / "top.txt").write_text("top\n")
    (root / "shared" / "a.txt").write_text("a\n")
    (root / "fresh" / "inner" / "b.txt").write_text("b\n")
    for mode, path in ((0o755, root / "shared"), (0o750, root / "fresh"), (0o700, root / "fresh" / "inner"),
                       (0o700, root)):
        os.chmod(path, mode)
    for path in [*root.rglob("*"), root]:
        os.utime(path, (SRC_TIME, SRC_TIME))
    return root


def usage_block(collections_root: Path, name: str) -> str:
    """The fenced block of docs/usage.md marked with <!-- example: NAME -->."""
    text = (collections_root / "ansible_collections" / "multipush" / "sftp" / "docs" / "usage.md").read_text()
    match = re.search(rf"<!-- example: {re.escape(name)} -->\s*```\w*\n(.*?)```", text, re.S)
    assert match, f"docs/usage.md has no block marked <!-- example: {name} -->"
    return match.group(1)


def _ok(run, name: str = "pushed") -> dict:
    result = run[name]
    assert run.rc == 0 and not result.get("failed"), run
    return result


# --- 1. directories that existed before the push keep their own metadata --------------------------------


def test_existing_dest_and_subdirectories_keep_mode_mtime_owner_and_group(run_play, tmp_path):
    source = _source(tmp_path)
    landing = _existing_dir(tmp_path / "landing", 0o755)
    dest = _existing_dir(landing / "tmp-like", 0o1777)  # like /tmp: sticky, world-writable
    shared = _existing_dir(dest / "shared", 0o2770)  # a subdirectory of the tree that exists already
    before = {path: _meta(path) for path in (landing, dest, shared)}

    result = _ok(run_play(push_task(f"{source}/", dest, owner=str(NEW_OWNER), group=str(NEW_GROUP))))
    assert result["changed"] is True and result["files_sent"] == 3
    for path in (landing, dest, shared):
        mode, mtime, uid, gid = _meta(path)
        assert (mode, uid, gid) == (before[path][0], OWNER, GROUP), path
        assert mtime != SRC_TIME, path  # never set to the source's (writing into it moves it, as with copy)
    # the directories the push created get the source's mode and mtime, and the owner and group given
    assert _meta(dest / "fresh") == (0o750, SRC_TIME, NEW_OWNER, NEW_GROUP)
    assert _meta(dest / "fresh" / "inner") == (0o700, SRC_TIME, NEW_OWNER, NEW_GROUP)
    assert _meta(dest / "top.txt")[2:] == (NEW_OWNER, NEW_GROUP)
    assert (dest / "shared" / "a.txt").read_text() == "a\n"

    # A re-run that skips everything changes nothing at all, mtimes included.
    settled = {path: _meta(path) for path in (landing, dest, shared, dest / "fresh", dest / "fresh" / "inner")}
    again = _ok(run_play(push_task(f"{source}/", dest, owner=str(NEW_OWNER), group=str(NEW_GROUP))))
    assert again["changed"] is False and again["files_skipped"] == 3, again
    assert {path: _meta(path) for path in settled} == settled


def test_a_rerun_leaves_a_dest_it_created_alone_once_it_was_changed(run_play, tmp_path):
    source = _source(tmp_path)
    dest = tmp_path / "made" / "tree"
    _ok(run_play(push_task(f"{source}/", dest)))
    assert _meta(dest)[:2] == (0o700, SRC_TIME)  # created by the push: the source's mode and mtime
    assert _meta(tmp_path / "made")[0] == 0o755  # a parent it created
    # Someone opens the directory up afterwards: a push with nothing to send must not undo it.
    os.chmod(dest, 0o1777)
    os.chmod(dest / "fresh", 0o755)
    os.utime(dest, (OLD, OLD))
    kept = {path: _meta(path) for path in (dest, dest / "fresh")}
    again = _ok(run_play(push_task(f"{source}/", dest)))
    assert again["changed"] is False, again
    assert {path: _meta(path) for path in kept} == kept
    # and one that does send a file changes no mode either
    (source / "top.txt").write_text("top, edited\n")
    edited = _ok(run_play(push_task(f"{source}/", dest)))
    assert edited["files_sent"] == 1, edited
    assert _meta(dest)[0] == 0o1777 and _meta(dest / "fresh")[0] == 0o755


def test_parents_the_push_creates_get_owner_and_group_existing_ones_do_not(run_play, tmp_path):
    source = _source(tmp_path)
    landing = _existing_dir(tmp_path / "landing", 0o775)
    dest = landing / "new" / "deeper" / "tree"
    _ok(run_play(push_task(f"{source}/", dest, owner=str(NEW_OWNER), group=str(NEW_GROUP))))
    assert _meta(landing)[0] == 0o775 and _meta(landing)[2:] == (OWNER, GROUP)
    for parent in (landing / "new", landing / "new" / "deeper"):
        assert _meta(parent)[0] == 0o755 and _meta(parent)[2:] == (NEW_OWNER, NEW_GROUP), parent
    assert _meta(dest) == (0o700, SRC_TIME, NEW_OWNER, NEW_GROUP)


def test_directories_made_by_a_push_that_then_failed_already_have_owner_and_group(run_play, tmp_path):
    """A re-run takes them for existing directories and leaves them alone, so they must be right at once."""
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    source = _source(tmp_path)
    dest = tmp_path / "dest"
    (dest / "shared").mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(dest / "shared")],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")
    try:
        run = run_play(push_task(f"{source}/", dest, owner=str(NEW_OWNER), group=str(NEW_GROUP)))
    finally:
        subprocess.run(["umount", str(dest / "shared")], check=False)
    assert run["pushed"].get("failed") and "read-only" in run["pushed"]["msg"].lower(), run
    for made, mode in ((dest / "fresh", 0o750), (dest / "fresh" / "inner", 0o700)):
        assert _meta(made)[2:] == (NEW_OWNER, NEW_GROUP), made
        assert _meta(made)[:2] == (mode, SRC_TIME), made  # settled after the failure, as on success


# --- 2. symlinked directories are written through; links where files go -------------------------------


def _release_layout(tmp_path: Path) -> tuple[Path, Path]:
    """app/current -> releases/42 (relative), the release directory existing and owned by someone."""
    app = tmp_path / "app"
    release = _existing_dir(app / "releases" / "42", 0o2775)
    os.symlink("releases/42", app / "current")
    return app / "current", release


def test_dest_a_link_to_a_directory_is_written_through_and_stays_a_link(run_play, tmp_path):
    source = _source(tmp_path)
    current, release = _release_layout(tmp_path)
    before = _meta(release)
    run = run_play(push_task(f"{source}/", current, register="preview", task={"check_mode": True})
                   + push_task(f"{source}/", current))
    preview = _ok(run, "preview")
    assert {entry["status"] for entry in preview["files"]} == {"would_send"} and preview["dirs_created"] == 3
    result = _ok(run)
    assert result["changed"] is True and result["files_sent"] == 3 and result["dirs_created"] == 3
    assert current.is_symlink() and os.readlink(current) == "releases/42"
    assert (release / "top.txt").read_text() == "top\n"
    assert (release / "fresh" / "inner" / "b.txt").read_text() == "b\n"
    assert _meta(release)[0] == before[0] and _meta(release)[2:] == before[2:]
    assert leftovers(release) == []
    again = _ok(run_play(push_task(f"{source}/", current)))
    assert again["changed"] is False and again["files_skipped"] == 3, again
    assert current.is_symlink()


def test_a_directory_src_and_a_single_file_go_into_a_linked_dest(run_play, tmp_path):
    source = _source(tmp_path)
    current, release = _release_layout(tmp_path)
    one = tmp_path / "one.txt"
    one.write_text("one\n")
    run = run_play(push_task(source, current, register="tree") + push_task(one, current, register="single"))
    _ok(run, "tree")
    _ok(run, "single")
    assert (release / "src" / "top.txt").read_text() == "top\n"  # no trailing slash: src itself inside dest
    assert _meta(release / "src")[:2] == (0o700, SRC_TIME)
    assert (release / "one.txt").read_text() == "one\n"
    assert current.is_symlink() and os.readlink(current) == "releases/42"


def test_a_directory_inside_dest_that_is_a_link_is_written_through(run_play, tmp_path):
    source = _source(tmp_path)
    outside = _existing_dir(tmp_path / "elsewhere" / "shared-data", 0o750)
    dest = tmp_path / "site"
    dest.mkdir()
    os.symlink(str(outside), dest / "shared")
    os.symlink("../elsewhere/shared-data", dest / "fresh")  # a relative one for the directory with a subdirectory
    result = _ok(run_play(push_task(f"{source}/", dest)))
    assert result["files_sent"] == 3
    for name in ("shared", "fresh"):
        assert (dest / name).is_symlink(), name
    assert (outside / "a.txt").read_text() == "a\n"
    assert (outside / "inner" / "b.txt").read_text() == "b\n"
    assert _meta(outside)[0] == 0o750 and _meta(outside)[2:] == (OWNER, GROUP)
    assert _meta(outside / "inner")[:2] == (0o700, SRC_TIME)  # created by the push
    again = _ok(run_play(push_task(f"{source}/", dest)))
    assert again["changed"] is False, again


def test_a_link_that_does_not_lead_to_a_directory_where_one_is_needed_is_refused_by_name(run_play, tmp_path):
    source = _source(tmp_path)
    dangling = tmp_path / "dangling-site"
    dangling.mkdir()
    os.symlink("nowhere", dangling / "shared")
    to_file = tmp_path / "file-site"
    to_file.mkdir()
    (tmp_path / "a-file").write_text("keep me\n")
    os.symlink(str(tmp_path / "a-file"), to_file / "fresh")
    dest_link = tmp_path / "dest-link"
    os.symlink("missing-dir", dest_link)
    run = run_play(push_task(f"{source}/", dangling, register="dangling")
                   + push_task(f"{source}/", to_file, register="to_file")
                   + push_task(source, dest_link, register="dest_link"))
    for name, path in (("dangling", dangling / "shared"), ("to_file", to_file / "fresh"), ("dest_link", dest_link)):
        result = run[name]
        assert result.get("failed"), (name, result)
        assert str(path) in result["msg"] and "symlink" in result["msg"], (name, result["msg"])
        assert "directory" in result["msg"], (name, result["msg"])
    assert (tmp_path / "a-file").read_text() == "keep me\n"
    assert os.readlink(dangling / "shared") == "nowhere" and not (dangling / "top.txt").exists()
    assert os.readlink(dest_link) == "missing-dir"


def test_a_link_where_a_file_goes_is_replaced_with_force_and_kept_without(run_play, tmp_path):
    source = tmp_path / "config.txt"
    source.write_text("new\n")
    target = tmp_path / "real-config.txt"
    target.write_text("the link's target, never written through\n")
    kept, replaced = tmp_path / "kept", tmp_path / "replaced"
    for where in (kept, replaced, tmp_path / "kept-as-dest", tmp_path / "replaced-as-dest"):
        where.mkdir()
        os.symlink(str(target), where / "config.txt")
    run = run_play(push_task(source, f"{kept}/", register="kept", force=False)
                   + push_task(source, f"{replaced}/", register="replaced")
                   # dest itself the link (it used to be refused whatever force said)
                   + push_task(source, replaced.with_name("kept-as-dest") / "config.txt", register="kept_dest",
                               force=False)
                   + push_task(source, replaced.with_name("replaced-as-dest") / "config.txt",
                               register="replaced_dest"))
    for name in ("kept", "kept_dest"):
        assert _ok(run, name)["files"][0]["reason"] == "exists" and run[name]["changed"] is False, name
    for name in ("replaced", "replaced_dest"):
        assert _ok(run, name)["files"][0]["reason"] == "type", name
    for where in (kept, tmp_path / "kept-as-dest"):
        assert (where / "config.txt").is_symlink()
    for where in (replaced, tmp_path / "replaced-as-dest"):
        assert not (where / "config.txt").is_symlink() and (where / "config.txt").read_text() == "new\n"
    assert target.read_text() == "the link's target, never written through\n"


# --- 2. why a file was skipped ----------------------------------------------------------------------------


def test_a_skipped_file_says_why_and_the_documented_compare_checksum_finds_a_same_size_same_mtime_edit(
        run_play, tmp_path, collections_root):
    source = tmp_path / "build" / "config"
    source.mkdir(parents=True)
    conf = source / "settings.conf"
    conf.write_text("value=1\n")
    os.utime(conf, (SRC_TIME, SRC_TIME))
    dest = tmp_path / "etc" / "myapp"
    _ok(run_play(push_task(f"{source}/", dest)))
    conf.write_text("value=2\n")  # same size, mtime restored
    os.utime(conf, (SRC_TIME, SRC_TIME))
    # docs/usage.md's example, as written there but for the paths
    example = usage_block(collections_root, "compare-checksum")
    assert "compare: checksum" in example
    example = example.replace("/build/config/", f"{source}/").replace("/etc/myapp", str(dest))
    run = run_play(push_task(f"{source}/", dest, register="quick")
                   + example + "  register: thorough\n  ignore_errors: true\n"
                   + push_task(f"{source}/", dest, register="settled", compare="checksum"))
    quick = _ok(run, "quick")
    assert quick["changed"] is False and quick["files"][0]["status"] == "skipped"
    assert quick["files"][0]["reason"] == "same size and mtime"
    thorough = _ok(run, "thorough")
    assert thorough["changed"] is True and thorough["files"][0]["reason"] == "checksum"
    settled = _ok(run, "settled")
    assert settled["changed"] is False and settled["files"][0]["reason"] == "same checksum"
    assert sha256(dest / "settings.conf") == sha256(conf)
