"""The operator's path after the quick start (issue 23), run as an operator would run it.

The collection's playbook with relative paths, leaving out dest, check mode with symlinks, the
output's one unit convention, the host key remedy on a fresh account, and verify's sizes: each with
ansible-playbook against a real sshd on loopback. Assertions are on results and the text's format,
never on durations.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.files import MIB, random_file, sha256
from tests.support.output_format import line_patterns
from tests.support.sshd import SshServer, sftp_server_path

# the output convention (tests/support/output_format.py); a real run's file names may hold spaces
PATTERNS = line_patterns("target", path=r"\S.*")
PROGRESS_LINE, FILE_LINE, DONE_LINE = PATTERNS.progress, PATTERNS.file, PATTERNS.done


def playbook(ansible_env: dict, inventory: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """ansible-playbook multipush.sftp.push (the collection's playbook), as an operator types it."""
    binary = Path(ansible_env["PATH"].split(os.pathsep)[0]) / "ansible-playbook"
    return subprocess.run([str(binary), "multipush.sftp.push", "-i", str(inventory), *args], cwd=cwd,
                          env=ansible_env, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
                          timeout=300)


def task(src, dest, register="pushed", **options) -> str:
    lines = [f"- name: Push\n  multipush.sftp.push:\n    src: '{src}'\n    dest: '{dest}'"]
    lines += [f"    {key}: {value}" for key, value in options.items()]
    lines.append(f"  register: {register}\n  ignore_errors: true\n  ignore_unreachable: true")
    return "\n".join(lines) + "\n"


# -- paths ------------------------------------------------------------------------------------------


def test_relative_src_of_the_collection_playbook_is_taken_from_the_current_directory(sshd, ansible_env, tmp_path):
    work = tmp_path / "work"
    random_file(work / "src" / "tree" / "disk.img", 2 * MIB + 1)
    (work / "src" / "tree" / "notes.txt").write_text("relative\n")
    inventory = sshd.write_inventory(tmp_path / "inventory.ini")
    results = tmp_path / "results"
    run = playbook(ansible_env, inventory, "-e", "src=src/tree/", "-e", f"dest={tmp_path}/copy",
                   "-e", f"result_dir={results}", cwd=work)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sha256(tmp_path / "copy" / "disk.img") == sha256(work / "src" / "tree" / "disk.img")
    assert (tmp_path / "copy" / "notes.txt").read_text() == "relative\n"
    result = json.loads((results / "target.json").read_text())
    assert {item["src"] for item in result["files"]} == {f"{work}/src/tree/disk.img", f"{work}/src/tree/notes.txt"}
    # the done line: where it landed and the result's summary, in the units of the progress lines
    assert f"{tmp_path}/copy: 2 sent, 0 skipped, 2.0 MiB in " in run.stdout, run.stdout
    assert " bytes in " not in run.stdout and "MB/s" not in run.stdout

    # without the trailing slash the directory itself goes into dest (rsync's rule), still from the cwd
    again = playbook(ansible_env, inventory, "-e", "src=src/tree", "-e", f"dest={tmp_path}/copy2", cwd=work)
    assert again.returncode == 0, again.stdout
    assert (tmp_path / "copy2" / "tree" / "notes.txt").read_text() == "relative\n"


def test_a_relative_src_missing_from_files_says_where_it_looked_and_no_option_push_lacks(run_play, tmp_path):
    run = run_play(task("no/such/tree/", f"{tmp_path}/dst"))
    result = run["pushed"]
    assert result.get("failed"), run
    message = result["msg"]
    assert "src 'no/such/tree/' was not found on the controller" in message, message
    assert f"(searched {tmp_path}/files/no/such/tree, {tmp_path}/no/such/tree)" in message, message
    assert "give an absolute path" in message
    assert "remote_src" not in message  # push has no such option
    assert not (tmp_path / "dst").exists()


def test_a_relative_dest_lands_in_the_login_directory_and_the_result_says_where(tmp_path, ansible_env):
    """sftp-server -d makes tmp_path/home the login directory, as $HOME would be."""
    home = tmp_path / "home"
    home.mkdir()
    server = SshServer(workdir=tmp_path / "sshd", options={"Subsystem": f"sftp {sftp_server_path()} -d {home}"})
    source = tmp_path / "report.txt"
    source.write_text("where did it go?\n")
    with server:
        inventory = server.write_inventory(tmp_path / "inventory.ini")
        results = tmp_path / "results"
        run = playbook(ansible_env, inventory, "-e", f"src={source}", "-e", "dest=incoming/report.txt",
                       "-e", "push_verify=size", "-e", f"result_dir={results}")
    assert run.returncode == 0, run.stdout
    assert (home / "incoming" / "report.txt").read_text() == "where did it go?\n"
    result = json.loads((results / "target.json").read_text())
    assert result["dest"] == f"{home}/incoming/report.txt"
    assert f"{home}/incoming/report.txt: 1 sent, 0 skipped, " in run.stdout, run.stdout


def test_leaving_out_dest_fails_first_with_one_clear_line(sshd, ansible_env, tmp_path):
    inventory = sshd.write_inventory(tmp_path / "inventory.ini")
    cases = ((["-e", f"src={tmp_path}"], "dest"), (["-e", f"dest={tmp_path}/d"], "src"), ([], "src and dest"))
    for given, missing in cases:
        run = playbook(ansible_env, inventory, *given)
        assert run.returncode == 2, run.stdout
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("[ERROR]")]
        assert len(errors) == 1, run.stdout + run.stderr
        assert errors[0].endswith("Give the source and destination: -e src=/local/path -e dest=/remote/path "
                                  f"(missing: {missing})"), errors
        assert "caused by" not in run.stdout + run.stderr
        assert "TASK [Push" not in run.stdout  # nothing else ran


# -- check mode -------------------------------------------------------------------------------------


def test_check_mode_lists_a_missing_symlink_even_when_it_is_the_only_difference(run_play, tmp_path):
    source = tmp_path / "src"
    (source / "releases" / "42").mkdir(parents=True)
    (source / "releases" / "42" / "app.bin").write_text("v42\n")
    (source / "current").symlink_to("releases/42")
    dest = tmp_path / "dst"
    first = run_play(task(f"{source}/", dest))["pushed"]
    assert not first.get("failed"), first
    assert first["links"] == [{"dest": f"{dest}/current", "target": "releases/42", "status": "created"}]
    assert os.readlink(dest / "current") == "releases/42"

    (dest / "current").unlink()
    run = run_play(task(f"{source}/", dest), extra_args=["--check", "--diff"])
    preview = run["pushed"]
    assert preview["changed"] is True
    assert preview["links"] == [{"dest": f"{dest}/current", "target": "releases/42", "status": "would_create"}]
    assert preview["summary"] == "would send 0 file(s) (0 B), 1 skipped, would create or change 1 link(s)"
    assert f"+ {dest}/current -> releases/42 (new link)" in run.stdout, run.stdout
    assert not os.path.lexists(dest / "current")  # check mode wrote nothing

    (dest / "current").symlink_to("releases/41")
    preview = run_play(task(f"{source}/", dest), extra_args=["--check", "--diff"])["pushed"]
    assert preview["links"][0]["status"] == "would_change"
    fixed = run_play(task(f"{source}/", dest))["pushed"]
    assert fixed["links"][0]["status"] == "changed" and os.readlink(dest / "current") == "releases/42"
    assert run_play(task(f"{source}/", dest))["pushed"]["links"][0]["status"] == "unchanged"


def test_collection_playbook_summary_in_check_mode_says_what_would_be_sent(sshd, ansible_env, tmp_path):
    random_file(tmp_path / "src" / "a.bin", MIB)
    (tmp_path / "src" / "b.txt").write_text("b\n")
    inventory = sshd.write_inventory(tmp_path / "inventory.ini")
    run = playbook(ansible_env, inventory, "-e", f"src={tmp_path}/src/", "-e", f"dest={tmp_path}/dst", "--check")
    assert run.returncode == 0, run.stdout
    assert f"{tmp_path}/dst: would send 2 file(s) (1.0 MiB), 0 skipped" in run.stdout, run.stdout
    assert not (tmp_path / "dst").exists()


# -- output -----------------------------------------------------------------------------------------


def test_progress_per_file_and_done_lines_share_one_format_even_for_a_short_push(run_play, tmp_path):
    random_file(tmp_path / "src" / "big.img", 3 * MIB)
    (tmp_path / "src" / "tiny.txt").write_text("14 bytes here\n")
    (tmp_path / "src" / "four").write_text("four")
    # the default progress_interval (5 s) is longer than this push
    run = run_play(task(f"{tmp_path}/src/", tmp_path / "dst", chunk_size="1M"), extra_args=["-v"])
    assert not run["pushed"].get("failed"), run
    lines = [line for line in run.stdout.splitlines() if line.startswith("target: ")]
    progress = [line for line in lines if PROGRESS_LINE.match(line)]
    per_file = [line for line in lines if line.startswith(("target: sent ", "target: resent ", "target: resumed "))]
    done = [line for line in lines if line.startswith("target: done: ")]
    assert progress and progress[-1].startswith("target: 100.0% 3.0 MiB of 3.0 MiB, "), lines
    assert len(per_file) == 3 and all(FILE_LINE.match(line) for line in per_file), per_file
    assert any(line.startswith(f"target: sent {tmp_path}/dst/tiny.txt (14 B in ") for line in per_file), per_file
    assert len(done) == 1 and DONE_LINE.match(done[0]), done
    assert done[0].startswith(f"target: done: {tmp_path}/dst: 3 sent, 0 skipped, 3.0 MiB in ")
    assert lines.index(progress[-1]) < lines.index(done[0]) == len(lines) - 1
    assert not [line for line in lines if " MB" in line or "MB/s" in line], lines  # one convention: MiB, MiB/s


# -- host keys --------------------------------------------------------------------------------------


def test_unknown_host_key_remedy_works_on_a_fresh_account_without_dot_ssh(run_play, sshd, tmp_path):
    known_hosts = tmp_path / "fresh-home" / ".ssh" / "known_hosts"  # neither directory exists yet
    args = f"'-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes'"
    source = tmp_path / "f.txt"
    source.write_text("x\n")
    refused = run_play(task(source, tmp_path / "dst" / "f.txt"), hostvars={"ansible_ssh_common_args": args})
    message = refused["pushed"]["msg"]
    assert "is not known" in message, message
    remedy = re.findall(r"`([^`]+)`", message)[0]
    assert remedy.startswith("ssh-keyscan ") and str(known_hosts) in remedy, remedy
    assert not known_hosts.parent.exists()
    subprocess.run(["bash", "-c", remedy], check=True, capture_output=True, timeout=60)
    assert f"[{sshd.host}]:{sshd.port} " in known_hosts.read_text()
    assert oct(known_hosts.parent.stat().st_mode & 0o777) == "0o700"
    accepted = run_play(task(source, tmp_path / "dst" / "f.txt"), hostvars={"ansible_ssh_common_args": args})
    assert not accepted["pushed"].get("failed") and not accepted["pushed"].get("unreachable"), accepted
    assert (tmp_path / "dst" / "f.txt").read_text() == "x\n"


# -- verify's sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", ["64M", "1M", "1048576"])
def test_verify_takes_chunk_size_with_units_as_push_does(run_play, tmp_path, chunk_size):
    path = random_file(tmp_path / "disk.img", 3 * MIB + 5)
    run = run_play(f"""\
- name: Verify with a size in units
  multipush.sftp.verify:
    path: {path}
    chunk_size: {chunk_size}
    checksum_algorithm: crc32
  register: verified
  ignore_errors: true
- name: Verify a batch with a size in units
  multipush.sftp.verify:
    files:
      - path: {path}
        chunk_size: {chunk_size}
    checksum_algorithm: crc32
  register: batch
  ignore_errors: true
""")
    expected = 1 if chunk_size == "64M" else 4
    assert not run["verified"].get("failed"), run
    assert len(run["verified"]["chunk_checksums"]) == expected
    assert len(run["batch"]["files"][0]["chunk_checksums"]) == expected
