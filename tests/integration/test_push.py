"""multipush.sftp.push end to end: ansible-playbook, the installed collection, a real sshd on loopback."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.files import MIB, leftovers, random_file, crc32, sha256, tree_snapshot
from tests.support import playenv

# Every push of this module has its result saved also when the host is unreachable.
push_task = functools.partial(playenv.push_task, ignore_unreachable=True)


def test_large_file_is_split_into_ranges_across_connections_and_arrives_identical(run_play, tmp_path):
    source = random_file(tmp_path / "src" / "disk.img", 40 * MIB + 12345)
    dest = tmp_path / "dst" / "disk.img"
    run = run_play(push_task(source, dest, connections=4, chunk_size="2M", whole_checksum=True))
    result = run["pushed"]
    assert run.rc == 0 and not result.get("failed"), run
    assert result["changed"] is True
    assert result["connections"] == 4
    (entry,) = result["files"]
    assert entry["ranges"] == 21
    assert entry["status"] == "sent"
    assert entry["bytes_sent"] == source.stat().st_size
    assert entry["checksum"] == crc32(source)
    assert result["cipher"] == "aes128-gcm@openssh.com"
    # The controller hashed with ISA-L where requirements.txt installed it, the target with zlib,
    # and every range still matched (status "sent", not "resent").
    assert result["crc32_library"] == ("isal" if importlib.util.find_spec("isal") else "zlib")
    assert result["write_size"] > 32768  # limits@openssh.com was honoured
    assert sha256(dest) == sha256(source)
    assert int(dest.stat().st_mtime) == int(source.stat().st_mtime)
    assert stat.S_IMODE(dest.stat().st_mode) == stat.S_IMODE(source.stat().st_mode)
    assert leftovers(dest.parent) == []


@pytest.fixture
def vpod(tmp_path) -> Path:
    root = tmp_path / "vpod"
    random_file(root / "disks" / "disk1.vmdk", 5 * MIB + 3, seed=2)
    random_file(root / "disks" / "disk2.vmdk", 3 * MIB, seed=3)
    (root / "config" / "deep" / "deeper").mkdir(parents=True)
    (root / "empty dir" / "also empty").mkdir(parents=True)
    (root / "config" / "with space.cfg").write_text("space\n")
    (root / "config" / "ünïcödé-ファイル.txt").write_text("unicode\n")
    (root / "config" / "$(touch pwned);`id`&|;'\".txt").write_text("metachar\n")
    (root / "config" / "-leading-dash").write_text("dash\n")
    (root / "config" / "deep" / "deeper" / "zero.bin").write_bytes(b"")
    (root / "config" / "exec.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "config" / "exec.sh", 0o751)
    os.chmod(root / "config" / "with space.cfg", 0o600)
    os.chmod(root / "config" / "deep", 0o750)
    os.symlink("disks/disk1.vmdk", root / "current.vmdk")
    for index, path in enumerate(sorted(root.rglob("*"))):
        if not path.is_symlink():
            os.utime(path, (1_600_000_000 + index, 1_600_000_000 + index))
    os.utime(root, (1_500_000_000, 1_500_000_000))
    return root


def test_tree_with_nested_empty_dirs_odd_names_modes_and_mtimes(run_play, tmp_path, vpod):
    dest = tmp_path / "remote" / "copy"
    run = run_play(push_task(f"{vpod}/", dest, connections=3, chunk_size="1M"))
    result = run["pushed"]
    assert run.rc == 0 and not result.get("failed"), run
    assert tree_snapshot(dest) == tree_snapshot(vpod)
    assert int(dest.stat().st_mtime) == 1_500_000_000
    assert result["files_total"] == 8 and result["files_sent"] == 8
    assert result["links_changed"] == 1
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    assert leftovers(dest) == []
    big = next(f for f in result["files"] if f["dest"].endswith("disk1.vmdk"))
    assert big["ranges"] == 6

    again = run_play(push_task(f"{vpod}/", dest, connections=3, chunk_size="1M"), )["pushed"]
    assert again["changed"] is False, again
    assert again["bytes_sent"] == 0
    assert again["files_skipped"] == 8
    assert {f["status"] for f in again["files"]} == {"skipped"}


def test_directory_without_trailing_slash_lands_inside_dest(run_play, tmp_path, vpod):
    dest = tmp_path / "into"
    dest.mkdir()
    result = run_play(push_task(vpod, dest))["pushed"]
    assert not result.get("failed"), result
    assert tree_snapshot(dest / "vpod") == tree_snapshot(vpod)


def test_same_size_edit_with_restored_mtime_skipped_by_default_and_resent_with_checksum(run_play, tmp_path):
    source = tmp_path / "src" / "settings.conf"
    source.parent.mkdir()
    source.write_text("value=1\n")
    os.utime(source, (1_600_000_000, 1_600_000_000))
    dest = tmp_path / "dst" / "settings.conf"
    assert not run_play(push_task(source, dest))["pushed"].get("failed")
    source.write_text("value=2\n")
    os.utime(source, (1_600_000_000, 1_600_000_000))

    quick = run_play(push_task(source, dest))["pushed"]
    assert quick["changed"] is False
    assert dest.read_text() == "value=1\n"

    thorough = run_play(push_task(source, dest, compare="checksum"))["pushed"]
    assert thorough["changed"] is True, thorough
    assert thorough["files"][0]["reason"] == "checksum"
    assert dest.read_text() == "value=2\n"
    assert run_play(push_task(source, dest, compare="checksum"))["pushed"]["changed"] is False


def test_check_mode_reports_and_sends_nothing(run_play, tmp_path, vpod):
    dest = tmp_path / "not-yet"
    run = run_play(push_task(f"{vpod}/", dest), extra_args=["--check", "--diff"])
    result = run["pushed"]
    assert run.rc == 0, run
    assert result["changed"] is True
    assert result["bytes_sent"] == 0
    assert {f["status"] for f in result["files"]} == {"would_send"}
    assert not dest.exists()
    assert "disk1.vmdk" in run.stdout  # the diff lists what would be added


def test_force_false_never_replaces_existing_files(run_play, tmp_path):
    source = tmp_path / "new.txt"
    source.write_text("new content")
    dest = tmp_path / "old.txt"
    dest.write_text("old")
    result = run_play(push_task(source, dest, force=False))["pushed"]
    assert result["changed"] is False
    assert result["files"][0]["reason"] == "exists"
    assert dest.read_text() == "old"


@pytest.mark.parametrize("verify", ["none", "size"])
def test_verify_modes_without_remote_hashing(run_play, tmp_path, verify):
    source = random_file(tmp_path / "data.bin", 3 * MIB + 1)
    dest = tmp_path / "out" / "data.bin"
    result = run_play(push_task(source, dest, verify=verify, chunk_size="1M"))["pushed"]
    assert not result.get("failed"), result
    assert result["files"][0]["checksum"] is None
    assert sha256(dest) == sha256(source)


def test_missing_src_fails_with_clear_message(run_play, tmp_path):
    run = run_play(push_task(tmp_path / "nope", tmp_path / "dst"))
    result = run["pushed"]
    assert result["failed"] is True
    assert "does not exist" in result["msg"] and "nope" in result["msg"]
    assert not (tmp_path / "dst").exists()


def test_unknown_host_key_is_refused_and_nothing_written(run_play, tmp_path, sshd):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    source = tmp_path / "f.txt"
    source.write_text("x")
    dest = tmp_path / "dst" / "f.txt"
    run = run_play(push_task(source, dest),
                   hostvars={"ansible_ssh_common_args": f"'-o UserKnownHostsFile={empty}'"})
    result = run["pushed"]
    assert result["unreachable"] is True  # as Ansible's ssh plugin reports a refused login
    assert "not known" in result["msg"] and "ssh-keyscan" in result["msg"]
    assert not (tmp_path / "dst").exists()


def test_changed_host_key_is_refused_and_nothing_written(run_play, tmp_path, sshd):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, blob = other.with_suffix(".pub").read_text().split()[:2]
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[{sshd.host}]:{sshd.port} {kind} {blob}\n")
    source = tmp_path / "f.txt"
    source.write_text("x")
    run = run_play(push_task(source, tmp_path / "dst" / "f.txt"),
                   hostvars={"ansible_ssh_common_args": f"'-o UserKnownHostsFile={wrong}'"})
    result = run["pushed"]
    assert result["unreachable"] is True  # as Ansible's ssh plugin reports a refused login
    assert "MISMATCH" in result["msg"] and "ssh-keygen -R" in result["msg"]
    assert not (tmp_path / "dst").exists()


def test_host_key_checking_off_accepts_unknown_key(run_play, tmp_path, ansible_env):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    source = tmp_path / "f.txt"
    source.write_text("x")
    env = dict(ansible_env, ANSIBLE_HOST_KEY_CHECKING="False")
    run = run_play(push_task(source, tmp_path / "dst" / "f.txt", verify="size"), env=env,
                   hostvars={"ansible_ssh_common_args": f"'-o UserKnownHostsFile={empty}'"})
    assert not run["pushed"].get("failed"), run
    assert (tmp_path / "dst" / "f.txt").read_text() == "x"


@pytest.fixture
def tiny_disk(tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_failed_remote_write_fails_the_task_and_leaves_nothing_half_written(run_play, tmp_path, tiny_disk):
    existing = tiny_disk / "image.bin"
    existing.write_bytes(b"previous version")
    source = random_file(tmp_path / "image.bin", 6 * MIB)
    run = run_play(push_task(source, existing, chunk_size="1M", connections=2))
    result = run["pushed"]
    assert result["failed"] is True, result
    assert "image.bin" in result["msg"]
    assert "bytes free" in result["msg"]
    assert existing.read_bytes() == b"previous version"
    assert leftovers(tiny_disk) == []


def test_full_disk_during_a_batch_of_small_files_fails_and_leaves_no_temp(run_play, tmp_path, tiny_disk):
    tree = tmp_path / "configs"
    for index in range(40):  # 4 MB of small files (travelling several to a job) for a 2 MB file system
        random_file(tree / f"conf{index:02}.cfg", 100 * 1024, seed=index)
    (tiny_disk / "configs").mkdir()
    (tiny_disk / "configs" / "conf00.cfg").write_text("previous version")
    run = run_play(push_task(f"{tree}/", tiny_disk / "configs", connections=2))
    result = run["pushed"]
    assert result["failed"] is True, result
    assert ".cfg" in result["msg"] and "bytes free" in result["msg"], result["msg"]
    assert leftovers(tiny_disk) == []
    # A batch that was written, read back and matched may be in place before another one ran out
    # of space: the old file is then replaced whole. Never by part of the new one.
    previous_or_new = (b"previous version", (tree / "conf00.cfg").read_bytes())
    assert (tiny_disk / "configs" / "conf00.cfg").read_bytes() in previous_or_new
    for path in (tiny_disk / "configs").iterdir():  # whatever did arrive is complete
        if path.name != "conf00.cfg":
            assert path.read_bytes() == (tree / path.name).read_bytes(), path


def test_password_never_appears_in_output_or_result(run_play, tmp_path):
    sentinel = "Sup3r-Secret-Sentinel-4711"
    source = random_file(tmp_path / "src.bin", 2 * MIB)
    run = run_play(push_task(source, tmp_path / "dst.bin", verify="size", chunk_size="1M"), extra_args=["-vvvv"],
                   hostvars={"ansible_password": sentinel})
    assert not run["pushed"].get("failed"), run
    assert "multipush.sftp.push" in run.stdout or "Push" in run.stdout  # the verbose output is really there
    assert sentinel not in run.stdout
    assert sentinel not in run.stderr
    assert sentinel not in str(run.results)


def test_live_progress_lines_reach_100_percent_with_per_file_detail_at_v(run_play, tmp_path):
    big = random_file(tmp_path / "src" / "big.img", 96 * MIB)
    for index in range(5):
        (tmp_path / "src" / f"small{index}.cfg").write_text("x" * (index * 100))
    run = run_play(push_task(f"{tmp_path}/src/", tmp_path / "dst", connections=1, request_size="32K",
                             chunk_size="8M", progress_interval=0.05), extra_args=["-v"])
    assert not run["pushed"].get("failed"), run
    lines = [line for line in run.stdout.splitlines() if line.startswith("target: ")]
    percents = [float(line.split("%")[0].split()[-1]) for line in lines if "% " in line and " of " in line]
    assert len(percents) >= 2, run.stdout
    assert percents == sorted(percents)
    assert percents[-1] == 100.0 and max(percents[:-1]) < 100.0
    assert "files 6/6" in [line for line in lines if "% " in line][-1]
    assert any(f"sent {tmp_path}/dst/big.img (96.0 MiB" in line for line in lines)
    assert lines[-1].startswith(f"target: done: {tmp_path}/dst: 6 sent, 0 skipped, 96.0 MiB in ")
    assert big.stat().st_size == (tmp_path / "dst" / "big.img").stat().st_size


def test_progress_interval_zero_is_silent(run_play, tmp_path):
    source = random_file(tmp_path / "one.bin", 4 * MIB)
    run = run_play(push_task(source, tmp_path / "out.bin", progress_interval=0), extra_args=["-v"])
    assert not run["pushed"].get("failed"), run
    assert not [line for line in run.stdout.splitlines() if line.startswith("target: ")]


def test_refused_login_makes_the_host_unreachable_exit_4(run_play, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    source = tmp_path / "f.txt"
    source.write_text("x")
    task = push_task(source, tmp_path / "dst" / "f.txt").replace("  ignore_unreachable: true\n", "")
    run = run_play(task, hostvars={"ansible_ssh_common_args": f"'-o UserKnownHostsFile={empty}'"})
    assert run.rc == 4, run  # ansible-playbook's exit status for unreachable hosts
    assert "UNREACHABLE" in run.stdout and "not known" in run.stdout


def test_collection_playbook_writes_a_json_result_per_host_even_on_failure(sshd, ansible_env, tmp_path):
    import json

    inventory = sshd.write_inventory(tmp_path / "inventory.ini")
    source = random_file(tmp_path / "src" / "a.bin", MIB)
    results = tmp_path / "results"

    def playbook(src, *extra, result_dir=results):
        return subprocess.run(
            [str(Path(ansible_env["PATH"].split(os.pathsep)[0]) / "ansible-playbook"), "multipush.sftp.push",
             "-i", str(inventory), "-e", f"src={src}", "-e", f"dest={tmp_path}/dst/", "-e", f"result_dir={result_dir}",
             *extra],
            env=ansible_env, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL, timeout=300)

    ok = playbook(source)
    assert ok.returncode == 0, ok.stdout
    assert json.loads((results / "target.json").read_text())["files_sent"] == 1
    assert [path.name for path in results.iterdir()] == ["target.json"]  # no temp file left beside it
    failed = playbook(tmp_path / "missing")
    assert failed.returncode == 2, failed.stdout
    written = json.loads((results / "target.json").read_text())
    assert written["failed"] is True and "does not exist" in written["msg"]

    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    unreachable = playbook(source, "-e", f"ansible_ssh_common_args='-o UserKnownHostsFile={empty}'")
    assert unreachable.returncode == 4, unreachable.stdout
    written = json.loads((results / "target.json").read_text())
    assert written["unreachable"] is True and "not known" in written["msg"]

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    unwritable = playbook(source, result_dir=blocked / "results")
    assert unwritable.returncode == 2, unwritable.stdout
    assert "could not write result_file" in unwritable.stdout and str(blocked / "results") in unwritable.stdout


def test_collection_playbook_without_src_or_dest_says_how_to_give_them(sshd, ansible_env, tmp_path):
    inventory = sshd.write_inventory(tmp_path / "inventory.ini")
    for given in (["-e", f"dest={tmp_path}/dst"], ["-e", f"src={tmp_path}"]):
        run = subprocess.run(
            [str(Path(ansible_env["PATH"].split(os.pathsep)[0]) / "ansible-playbook"), "multipush.sftp.push",
             "-i", str(inventory), *given],
            env=ansible_env, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL, timeout=300)
        assert run.returncode == 2, run.stdout
        assert "Give the source and destination: -e src=/local/path -e dest=/remote/path" in run.stdout, run.stdout
    assert not (tmp_path / "dst").exists()


# -- putting files in place -----------------------------------------------------------------------


def _rounds_of(monkeypatch) -> list:
    """Round trips of the pipelines used from now on: a round begins when a request follows a wait
    for replies (or is the first)."""
    from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp_pipeline import Pipeline

    rounds = [0]
    waiting = [True]
    real_send, real_wait = Pipeline.send, Pipeline.wait_one

    def send(self, *args, **kwargs):
        if waiting[0]:
            rounds[0] += 1
            waiting[0] = False
        return real_send(self, *args, **kwargs)

    def wait_one(self):
        waiting[0] = True
        return real_wait(self)

    monkeypatch.setattr(Pipeline, "send", send)
    monkeypatch.setattr(Pipeline, "wait_one", wait_one)
    return rounds


def _temps(directory: Path, count: int) -> list[dict]:
    files = []
    for index in range(count):
        temp = directory / f".f{index}.multipush.tmp"
        temp.write_text(f"file {index}\n")
        os.chmod(temp, 0o600)
        files.append({"temp": str(temp), "dest": str(directory / f"f{index}"), "mode": 0o640,
                      "mtime": 1_600_000_000 + index, "expect_size": None})
    return files


def test_files_go_in_place_with_their_attributes_in_one_round_trip(sshd, tmp_path, monkeypatch):
    """Without size checks or an owner to set, each file's setstat and its rename share one pipeline:
    one round trip for the lot, and every file reaches its name with its final mode and mtime."""
    from ansible_collections.multipush.sftp.plugins.plugin_utils._session import open_session
    from ansible_collections.multipush.sftp.plugins.plugin_utils._sftp import RemoteFiles
    from tests.support.targets import spec_for

    transport, sftp = open_session(spec_for(sshd))
    try:
        remote = RemoteFiles(transport, sftp)
        assert remote.write_size > 0  # the limits reply, asked at start, is in before counting
        files = _temps(tmp_path, 5)
        rounds = _rounds_of(monkeypatch)
        remote.finalize_many(files)
        assert rounds[0] == 1
        for index, item in enumerate(files):
            placed = Path(item["dest"]).stat()
            assert (stat.S_IMODE(placed.st_mode), int(placed.st_mtime)) == (0o640, 1_600_000_000 + index)
            assert not os.path.exists(item["temp"])

        checked = [dict(item, expect_size=len(f"file {index}\n")) for index, item in enumerate(_temps(tmp_path, 2))]
        rounds[0] = 0
        remote.finalize_many(checked)  # a size check comes back before any rename goes out
        assert rounds[0] == 2

        missing = _temps(tmp_path, 1)
        os.unlink(missing[0]["temp"])
        with pytest.raises(Exception, match=r"set mode/mtime of '.*\.f0\.multipush\.tmp' failed"):
            remote.finalize_many(missing)
    finally:
        transport.close()
