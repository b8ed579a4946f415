"""Pushes to SFTP-only servers (issue 19): OpenSSH with `ForceCommand internal-sftp`, and AsyncSSH.

Neither server runs commands: OpenSSH answers every exec request with "This service allows sftp
connections only." and exit status 1, AsyncSSH refuses the request. Whatever the push needs must
go over SFTP.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import paramiko
import pytest

from tests.support.files import MIB, leftovers, random_file, tree_snapshot
from tests.support.sshd import SshServer, sftp_server_path
from tests.support import playenv

# Every push of this module has its result saved also when the host is unreachable.
push_task = functools.partial(playenv.push_task, ignore_unreachable=True)

SERVERS = ["sftp_only_sshd", "asyncssh_sftp"]


def sftp_client(server) -> tuple[paramiko.Transport, paramiko.SFTPClient]:
    transport = paramiko.Transport((server.host, server.port))
    transport.start_client(timeout=15)
    known = paramiko.HostKeys(str(server.known_hosts))
    presented = transport.get_remote_server_key()
    assert known.check(f"[{server.host}]:{server.port}", presented), "the server's host key is not its known_hosts'"
    transport.auth_publickey(server.user, paramiko.Ed25519Key.from_private_key_file(str(server.client_key)))
    return transport, paramiko.SFTPClient.from_transport(transport)


def small_tree(root: Path) -> Path:
    """A tree with a file large enough to travel in ranges, small files, nesting and an empty directory."""
    random_file(root / "disks" / "disk.img", 3 * MIB + 7, seed=5)
    (root / "config" / "deep").mkdir(parents=True)
    (root / "config" / "deep" / "zero.bin").write_bytes(b"")
    (root / "config" / "a.cfg").write_text("a\n")
    (root / "empty").mkdir()
    os.symlink("disks/disk.img", root / "current.img")
    for index, path in enumerate(sorted(root.rglob("*"))):
        if not path.is_symlink():
            os.utime(path, (1_600_000_000 + index, 1_600_000_000 + index))
    return root


# --- the fixtures themselves ---------------------------------------------------------------------


@pytest.mark.parametrize("server_name", SERVERS)
def test_sftp_only_server_serves_sftp_and_runs_no_command(request, server_name, tmp_path):
    server = request.getfixturevalue(server_name)
    (tmp_path / "seen.txt").write_text("x")
    transport, sftp = sftp_client(server)
    try:
        assert "seen.txt" in sftp.listdir(str(tmp_path))
        channel = transport.open_session(timeout=15)
        channel.settimeout(15)
        try:
            channel.exec_command("echo ran > " + str(tmp_path / "ran"))
        except paramiko.SSHException:
            refused = True  # AsyncSSH: the exec request is refused outright
        else:  # OpenSSH's ForceCommand internal-sftp: the request is accepted, then fails
            said = channel.makefile().read() + channel.makefile_stderr().read()
            refused = channel.recv_exit_status() != 0
            assert b"sftp connections only" in said, said
        assert refused
        assert not (tmp_path / "ran").exists()
    finally:
        transport.close()


# --- pushes through ansible-playbook ------------------------------------------------------------


@pytest.mark.parametrize("server_name", SERVERS)
def test_push_of_a_new_tree_with_verify_size(request, server_name, run_play_on, tmp_path):
    """The destination and its parents do not exist yet: the survey must take a directory that
    opendir or readdir reports missing as missing (AsyncSSH reports it only at readdir)."""
    server = request.getfixturevalue(server_name)
    source = small_tree(tmp_path / "src")
    dest = tmp_path / "new" / "parent" / "copy"
    task = push_task(f"{source}/", dest, connections=3, chunk_size="1M", verify="size")
    run = run_play_on(server, task)
    result = run["pushed"]
    assert run.rc == 0 and not result.get("failed"), run
    assert result["files_sent"] == 3
    assert result["handshake_retries"] == 0
    assert tree_snapshot(dest) == tree_snapshot(source)
    assert leftovers(dest) == []

    again = run_play_on(server, task)["pushed"]
    assert not again.get("failed") and again["changed"] is False, again
    assert again["files_skipped"] == 3


# (The default options, verify: checksum, on SFTP-only servers: tests of their own follow here.)


# --- servers Paramiko cannot negotiate with (issue 19, item 5) ----------------------------------

NEGOTIATION_FAILURES = {
    # sshd_config lines: (what the message names, the sshd_config line it suggests)
    "cipher": ({"Ciphers": "chacha20-poly1305@openssh.com"},
               ["no cipher in common: the server offers chacha20-poly1305@openssh.com; Paramiko",
                "`Ciphers chacha20-poly1305@openssh.com,aes128-gcm@openssh.com`"]),
    "mac": ({"MACs": "umac-128-etm@openssh.com"},
            ["no MAC in common: the server offers umac-128-etm@openssh.com; Paramiko",
             "`MACs umac-128-etm@openssh.com,hmac-sha2-256-etm@openssh.com`"]),
    "kex": ({"KexAlgorithms": "sntrup761x25519-sha512@openssh.com"},
            ["no key exchange algorithm in common: the server offers sntrup761x25519-sha512@openssh.com; Paramiko",
             "`KexAlgorithms sntrup761x25519-sha512@openssh.com,curve25519-sha256@libssh.org`"]),
}


def connections_seen(server) -> int:
    """Connections the server has accepted so far, from its log."""
    text = server.log_file.read_text(errors="replace") if server.log_file.exists() else ""
    return text.count("Connection from ") + text.count("Accepted SSH client connection")


def one_file_push(tmp_path, settings: str) -> tuple[str, Path, Path]:
    """(task, dest, result file) of a push of one small file into a new directory, with `settings`
    (YAML lines of the module's options) added and the result saved whatever happens."""
    dest = tmp_path / "never" / "copy"
    result_file = tmp_path / "result.json"
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("a\n")
    task = (f"- name: Push\n  multipush.sftp.push:\n    src: '{source}/'\n    dest: '{dest}'\n    verify: size\n"
            f"{settings}    result_file: '{result_file}'\n")
    return task, dest, result_file


def assert_fails_fast_and_unreachable(run_play_on, server, tmp_path, words) -> None:
    task, dest, result_file = one_file_push(tmp_path, "    connections: 1\n    retries: 5\n    retry_delay: 0.1\n")
    before = connections_seen(server)
    run = run_play_on(server, task, timeout=300)
    assert run.rc == 4 and "UNREACHABLE!" in run.stdout, run  # as Ansible's ssh plugin: no login was possible
    message = json.loads(result_file.read_text())["msg"]
    for word in words + ["SSH negotiation with", f"Paramiko {paramiko.__version__} supports ",
                         "Nothing was written; not retried"]:
        assert word in message, f"{word!r} missing from {message!r}"
    assert "MaxStartups" not in message and "gave up after" not in message
    assert "Traceback" not in run.stdout + run.stderr, run
    # One handshake and the one connection that read the server's offer; every retry would add one.
    assert connections_seen(server) - before == 2
    assert not dest.parent.exists()


@pytest.mark.parametrize("kind", list(NEGOTIATION_FAILURES))
def test_no_algorithm_in_common_fails_at_once_naming_both_sides_and_the_fix(kind, run_play_on, tmp_path):
    options, words = NEGOTIATION_FAILURES[kind]
    with SshServer(workdir=tmp_path / "sshd", options=options) as server:
        assert_fails_fast_and_unreachable(run_play_on, server, tmp_path, words)


def test_no_cipher_in_common_with_a_server_that_is_not_openssh(run_play_on, tmp_path):
    from tests.support.asyncssh_server import AsyncSshServer

    options = {"encryption_algs": ["chacha20-poly1305@openssh.com"]}
    with AsyncSshServer(workdir=tmp_path / "asyncssh", options=options) as server:
        assert_fails_fast_and_unreachable(run_play_on, server, tmp_path, [
            "(server SSH-2.0-AsyncSSH_", "the server offers chacha20-poly1305@openssh.com; Paramiko",
            "let the server offer aes128-gcm@openssh.com too"])


@pytest.mark.parametrize("carrier", ["ProxyJump", "ProxyCommand"])
def test_the_offer_is_read_through_what_carries_the_connection(carrier, tmp_path):
    """Through a jump host or a ProxyCommand, the server's offer is read through the same carrier
    (in real life the target's port may be unreachable from the controller)."""
    from ansible_collections.multipush.sftp.plugins.plugin_utils._session import open_session
    from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import SessionError
    from ansible_collections.multipush.sftp.plugins.plugin_utils._sshconfig import resolve_spec
    from tests.support.connections import forwarded_to, server_config, ssh_config

    with SshServer(workdir=tmp_path / "jump", options={"LogLevel": "DEBUG"}) as jump, \
            SshServer(workdir=tmp_path / "sshd", options={"Ciphers": "chacha20-poly1305@openssh.com"}) as target:
        config = ssh_config(tmp_path / "ssh_config", {"mp-jump": server_config(jump, LogLevel="ERROR")})
        via = {"ProxyJump": "-J mp-jump",
               "ProxyCommand": f"-o 'ProxyCommand=ssh -F {config} -W %h:%p mp-jump'"}[carrier]
        spec = resolve_spec(target.host, port=target.port, user=target.user, private_key_file=str(target.client_key),
                            ssh_args=(f"-F {config}", via, f"-o UserKnownHostsFile={target.known_hosts}"), timeout=10)
        with pytest.raises(SessionError) as failure:
            open_session(spec)
        forwards = forwarded_to(jump.log_file.read_text())
    message = str(failure.value)
    assert not failure.value.retryable and failure.value.unreachable, message
    assert " via " in message, message
    assert "no cipher in common: the server offers chacha20-poly1305@openssh.com; Paramiko" in message, message
    assert forwards.count((target.host, target.port)) == 2  # the handshake and the probe, both through the jump


# --- a login whose session never becomes SFTP ----------------------------------------------------

SESSIONS_THAT_ARE_NOT_SFTP = {  # the target's sshd options, what the message says happened, a cause it names
    # Waits for good, as a startup file reading from stdin or a ForceCommand of the wrong program does.
    "silent": ({"ForceCommand": "/bin/sleep 300"}, "no SFTP answer within 3s", "ForceCommand"),
    # Prints before SFTP starts, as a chatty .bashrc does: the client reads text where a packet should be.
    "chatty": ({"ForceCommand": f"echo Welcome to the lab; exec {sftp_server_path()}"},
               "something that is not SFTP", "startup file"),
    "not installed": ({"Subsystem": "sftp /nonexistent/sftp-server"}, "(exit status 127)",
                      "names an installed sftp-server"),
    "no subsystem": ({"Subsystem": "backup /bin/true"}, "the session was closed before SFTP started",
                     "`Subsystem sftp` line"),
    "no sessions": ({"MaxSessions": "0"}, "the target refused a session", "MaxSessions above 0"),
}


@pytest.mark.parametrize("kind", list(SESSIONS_THAT_ARE_NOT_SFTP))
def test_a_login_whose_session_never_becomes_sftp_fails_the_task_at_once_naming_the_cause(kind, run_play_on, tmp_path):
    options, happened, cause = SESSIONS_THAT_ARE_NOT_SFTP[kind]
    task, dest, result_file = one_file_push(tmp_path, "    timeout: 3\n    retries: 2\n    retry_delay: 0.1\n")
    with SshServer(workdir=tmp_path / "sshd", options=options) as server:
        run = run_play_on(server, task, timeout=120)
        logins = server.log_file.read_text(errors="replace").count("Accepted publickey for ")
    assert logins == 1, "not retried: each try would fail the same way"
    # The host answered and logged us in: a failed task (rc 2), not an unreachable host (rc 4).
    assert run.rc == 2 and "UNREACHABLE!" not in run.stdout, run
    message = json.loads(result_file.read_text())["msg"]
    for word in [happened, cause, "cannot start SFTP on", "The login worked"]:
        assert word in message, f"{word!r} missing from {message!r}"
    assert "MaxStartups" not in message and "gave up after" not in message and "crashed" not in message
    assert "Traceback" not in run.stdout + run.stderr, run
    assert not dest.parent.exists()


# --- an SFTP server that refuses requests to everyone ----------------------------------------------

REFUSING_SERVERS = {"read-only": "-R", "no attributes": "-P fsetstat,setstat"}  # internal-sftp's options


@pytest.mark.parametrize("kind", list(REFUSING_SERVERS))
def test_a_server_that_refuses_writes_to_everyone_fails_naming_that_and_leaves_nothing(kind, run_play_on, tmp_path):
    flags = REFUSING_SERVERS[kind]
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "a.txt").write_text("previous version\n")
    result_file = tmp_path / "result.json"
    source = tmp_path / "src"
    random_file(source / "disk.img", 3 * MIB, seed=9)
    (source / "a.txt").write_text("a\n")
    task = (f"- name: Push\n  multipush.sftp.push:\n    src: '{source}/'\n    dest: '{dest}'\n"
            f"    chunk_size: 1M\n    result_file: '{result_file}'\n")
    with SshServer(workdir=tmp_path / "sshd", options={"Subsystem": f"sftp internal-sftp {flags}"}) as server:
        run = run_play_on(server, task, timeout=120)
    assert run.rc == 2 and "UNREACHABLE!" not in run.stdout, run
    message = json.loads(result_file.read_text())["msg"]
    for word in [".multipush.tmp'", "Permission denied", "the SFTP server refuses this request to everyone",
                 "read-only with -R", "-P list"]:
        assert word in message, f"{word!r} missing from {message!r}"
    # A temp the read-only server never let exist is not one it "could not remove".
    assert "could not remove temporary files" not in run.stdout, run.stdout
    assert leftovers(dest) == []
    assert (dest / "a.txt").read_text() == "previous version\n"


# --- servers that differ from OpenSSH's in what SFTP does -----------------------------------------


def quirky_server(tmp_path, **settings):
    from tests.support.asyncssh_server import AsyncSshServer
    return AsyncSshServer(workdir=tmp_path / "quirky", **settings)


def files_of(snapshot: dict) -> dict:
    return {path: entry for path, entry in snapshot.items() if entry[0] != "dir"}


def push_update_and_rerun(run_play_on, server, tmp_path) -> list[dict]:
    """A tree pushed with the defaults, then again after two files changed, then once more: the
    three results, each checked against the source."""
    source = small_tree(tmp_path / "src")
    dest = tmp_path / "copy"
    task = push_task(f"{source}/", dest, chunk_size="1M")
    results = []
    for step in ("new", "update", "again"):
        if step == "update":
            (source / "config" / "a.cfg").write_text("a, changed\n")
            random_file(source / "disks" / "disk.img", 3 * MIB + 7, seed=6)
        run = run_play_on(server, task, timeout=300)
        assert run.rc == 0 and not run["pushed"].get("failed"), run
        assert "Traceback" not in run.stdout + run.stderr, run
        # Directories that existed are left alone (their mtimes move with the renames inside them).
        assert files_of(tree_snapshot(dest)) == files_of(tree_snapshot(source)), step
        assert leftovers(dest) == [], step
        results.append(run["pushed"])
    assert results[0]["files_sent"] == 3 and results[1]["files_sent"] == 2, results
    assert results[2]["changed"] is False, results[2]
    return results


def test_a_server_without_posix_rename_that_will_not_rename_over_a_file_gets_updates(run_play_on, tmp_path):
    """SFTP version 3's rename fails when the new name exists, as most servers other than OpenSSH's do
    it, and posix-rename@openssh.com is unsupported there: a changed file still replaces the old one
    (moved aside under a temp name first), and nothing is left behind."""
    with quirky_server(tmp_path, quirks=("no_posix_rename",)) as server:
        push_update_and_rerun(run_play_on, server, tmp_path)
        log = server.log_file.read_text()
        assert "quirk: refused posix-rename" in log and "quirk: refused a rename over an existing file" in log, log


def test_a_server_without_fsetstat_gets_sizes_modes_and_mtimes_by_path(run_play_on, tmp_path):
    with quirky_server(tmp_path, quirks=("no_fsetstat",)) as server:
        push_update_and_rerun(run_play_on, server, tmp_path)


def test_a_server_that_takes_two_connections_at_a_time_gets_the_push_over_those(run_play_on, tmp_path):
    """A per-client connection limit (ProFTPD's MaxClientsPerHost, a firewall's): the logins beyond it
    are closed at once. The push goes on over the connections it has, and checks over them too."""
    with quirky_server(tmp_path, max_connections=2) as server:
        results = push_update_and_rerun(run_play_on, server, tmp_path)
        assert "quirk: closed a connection beyond 2" in server.log_file.read_text()
    for result in results[:2]:
        # The hashing login that the limit closes is tried once more, not `retries` (5) times with backoff.
        assert result["handshake_retries"] < 5, result
        assert result["remote_hashing"]["via"] == "sftp", result["remote_hashing"]
        assert any("hashing on the target" in warning for warning in result.get("warnings", [])), result


def test_a_server_that_writes_files_only_front_to_back_fails_naming_the_chunk_size_that_works(run_play_on, tmp_path):
    """Object-storage gateways refuse writes at any offset but the file's end, with a bare failure:
    the push fails naming what to set, leaves nothing, and with that setting every file goes whole."""
    source = small_tree(tmp_path / "src")
    dest = tmp_path / "copy"
    with quirky_server(tmp_path, quirks=("sequential_writes",)) as server:
        run = run_play_on(server, push_task(f"{source}/", dest, chunk_size="1M"), timeout=300)
        result = run["pushed"]
        assert result.get("failed") and "UNREACHABLE" not in run.stdout, run
        assert "random access writes are not supported" in result["msg"], result["msg"]
        assert "push with a `chunk_size` above the largest file's size" in result["msg"], result["msg"]
        assert leftovers(dest) == [] and not (dest / "disks" / "disk.img").exists(), (leftovers(dest), result)
        assert "quirk: refused a write at" in server.log_file.read_text()

        run = run_play_on(server, push_task(f"{source}/", dest, chunk_size="8M"), timeout=300)
        assert run.rc == 0 and not run["pushed"].get("failed"), run
        assert files_of(tree_snapshot(dest)) == files_of(tree_snapshot(source))
        assert leftovers(dest) == []


def test_a_server_without_symlinks_fails_naming_follow_and_exclude_and_follow_works(run_play_on, tmp_path):
    source = small_tree(tmp_path / "src")  # current.img is a symlink
    dest = tmp_path / "copy"
    with quirky_server(tmp_path, quirks=("no_symlink",)) as server:
        run = run_play_on(server, push_task(f"{source}/", dest, chunk_size="1M"), timeout=300)
        result = run["pushed"]
        assert result.get("failed") and "UNREACHABLE" not in run.stdout, run
        for words in ("create symlink", "symlinks not supported", "push with `follow: true`", "`exclude`"):
            assert words in result["msg"], (words, result["msg"])
        assert leftovers(dest) == [] and not (dest / "current.img").exists()

        run = run_play_on(server, push_task(f"{source}/", dest, chunk_size="1M", follow=True), timeout=300)
        assert run.rc == 0 and not run["pushed"].get("failed"), run
        assert (dest / "current.img").read_bytes() == (source / "disks" / "disk.img").read_bytes()
        assert not (dest / "current.img").is_symlink() and leftovers(dest) == []


def test_a_server_that_ignores_setstat_is_named_with_the_option_that_makes_reruns_idempotent(run_play_on, tmp_path):
    """SETSTAT answered OK and not done (an object-storage gateway told to ignore it): the files are
    pushed, a warning says re-runs would send everything again and why, and compare: checksum makes a
    re-run change nothing."""
    source = small_tree(tmp_path / "src")
    dest = tmp_path / "copy"
    with quirky_server(tmp_path, quirks=("mtime_ignored",)) as server:
        first = run_play_on(server, push_task(f"{source}/", dest, chunk_size="1M"), timeout=300)["pushed"]
        assert not first.get("failed") and first["files_sent"] == 3, first
        warned = [warning for warning in first.get("warnings", []) if "did not keep the modification time" in warning]
        assert warned and "push with `compare: checksum`" in warned[0], first.get("warnings")
        assert leftovers(dest) == []
        for path in ("disks/disk.img", "config/a.cfg"):
            assert (dest / path).read_bytes() == (source / path).read_bytes()

        again = run_play_on(server, push_task(f"{source}/", dest, chunk_size="1M", compare="checksum"),
                            timeout=300)["pushed"]
        assert not again.get("failed") and again["changed"] is False and again["files_sent"] == 0, again


def test_a_server_that_reports_no_file_types_fails_saying_so(run_play_on, tmp_path):
    """Attributes without permissions carry no file type: the push cannot tell a directory from a file
    on the target, and says what it saw rather than "a other"."""
    source = small_tree(tmp_path / "src")
    with quirky_server(tmp_path, quirks=("no_permissions",)) as server:
        run = run_play_on(server, push_task(f"{source}/", tmp_path / "copy"), timeout=300)
    result = run["pushed"]
    assert result.get("failed") and "UNREACHABLE" not in run.stdout, run
    assert "a special file (or one whose type the SFTP server did not report)" in result["msg"], result["msg"]
    assert not (tmp_path / "copy").exists()
