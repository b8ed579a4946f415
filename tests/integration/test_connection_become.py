"""become: the push's sftp-server runs through sudo as the become user, so the files are theirs; owner
and group like copy's.

Test users are created for this module (useradd, sudoers drop-ins checked by visudo) and removed after
it: `nopw` may sudo without a password, `pw` only with its password, `nosudo` not at all, `owner` is an
unprivileged become user. They log in with a key. The destination tree lives outside pytest's
root-only tmp directory, in a root-owned directory the login users cannot write to.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from ansible_collections.multipush.sftp.plugins.plugin_utils._session import open_session
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import BecomeSpec, SessionError
from ansible_collections.multipush.sftp.plugins.plugin_utils._sshconfig import resolve_spec
from tests.support.connections import (
    UserFactory, authorized_keys_dir, ensure_tool, shared_dir, write_inventory,
)
from tests.support.playenv import push_task
from tests.support.files import MIB, random_file, crc32, sha256
from tests.support.sshd import SshServer

PASSWORD = "Sud0-Sentinel-pw-7731"  # the `pw` user's login and sudo password, made for this module


@pytest.fixture(scope="module")
def users():
    ensure_tool("sudo", "sudo")
    factory = UserFactory()
    yield factory
    factory.remove()


@pytest.fixture(scope="module")
def people(users):
    found = {"nopw": users.user("nopw"), "pw": users.user("pw", password=PASSWORD), "nosudo": users.user("nosudo"),
             "owner": users.user("owner")}
    users.allow_sudo(found["nopw"], "ALL=(ALL:ALL) NOPASSWD: ALL")
    users.allow_sudo(found["pw"], "ALL=(ALL:ALL) ALL")
    found["group"] = users.group("grp")
    return found


@pytest.fixture(scope="module")
def landing(people):
    """root-owned (0755): `root-only` is writable by root alone, `owner-only` by the `owner` user alone."""
    root = shared_dir("multipush-become-")
    (root / "root-only").mkdir(mode=0o755)
    (root / "owner-only").mkdir(mode=0o755)
    os.chown(root / "owner-only", people["owner"].uid, people["owner"].gid)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, people, landing):
    workdir = tmp_path_factory.mktemp("become-sshd")
    instance = SshServer(workdir=workdir)
    instance.prepare()  # makes the client key
    keys = authorized_keys_dir(landing / "keys", {people[role].name: instance.client_key.with_suffix(".pub")
                                                  for role in ("nopw", "pw", "nosudo")})
    instance.options = {"AuthorizedKeysFile": keys}
    instance.start()
    yield instance
    instance.stop()


def _host(server: SshServer, login, **extra) -> dict:
    values = {"ansible_host": server.host, "ansible_port": server.port, "ansible_user": login.name,
              "ansible_ssh_private_key_file": str(server.client_key),
              "ansible_ssh_common_args": f"-o UserKnownHostsFile={server.known_hosts} -o IdentitiesOnly=yes",
              "ansible_python_interpreter": "/usr/bin/python3"}
    values.update(extra)
    return values


def _tree(tmp_path: Path) -> Path:
    source = tmp_path / "tree"
    random_file(source / "big.img", 3 * MIB + 17, seed=4)
    random_file(source / "sub" / "small.txt", 1000, seed=5)
    return source


def _push(run_play, tmp_path, server, login, dest, task=None, hostvars=None, **options):
    inventory = write_inventory(tmp_path / "inventory.yml", {"target": _host(server, login, **(hostvars or {}))})
    source = _tree(tmp_path)
    run = run_play(push_task(f"{source}/", dest, task=task, connections=2, chunk_size="1M", whole_checksum=True,
                             **options), inventory=inventory)
    return run, source


def _owners(root: Path) -> set[tuple[int, int]]:
    return {(entry.lstat().st_uid, entry.lstat().st_gid) for entry in [root, *root.rglob("*")]}


def _same_tree(source: Path, dest: Path) -> None:
    for name in ("big.img", "sub/small.txt"):
        assert sha256(dest / name) == sha256(source / name)


def test_become_root_without_password(run_play, tmp_path, server, people, landing):
    dest = landing / "root-only" / "nopw"
    run, source = _push(run_play, tmp_path, server, people["nopw"], dest, task={"become": True})
    result = run["pushed"]
    assert run.rc == 0 and not result.get("failed"), run
    assert result["connections"] == 2
    expected = {crc32(source / "big.img"), crc32(source / "sub" / "small.txt")}
    assert {entry["checksum"] for entry in result["files"]} == expected
    _same_tree(source, dest)
    assert _owners(dest) == {(0, 0)}
    assert stat.S_IMODE((dest / "big.img").stat().st_mode) == stat.S_IMODE((source / "big.img").stat().st_mode)


def test_without_become_the_same_push_is_refused(run_play, tmp_path, server, people, landing):
    run, _source = _push(run_play, tmp_path, server, people["nopw"], landing / "root-only" / "refused")
    assert run["pushed"].get("failed"), run
    assert "ermission denied" in run["pushed"]["msg"]
    assert not (landing / "root-only" / "refused").exists()


def test_become_an_unprivileged_user(run_play, tmp_path, server, people, landing):
    owner = people["owner"]
    dest = landing / "owner-only" / "tree"
    run, source = _push(run_play, tmp_path, server, people["nopw"], dest,
                        task={"become": True, "become_user": owner.name})
    assert run.rc == 0 and not run["pushed"].get("failed"), run
    _same_tree(source, dest)
    assert _owners(dest) == {(owner.uid, owner.gid)}


def test_become_with_a_password(run_play, tmp_path, server, people, landing):
    dest = landing / "root-only" / "pw"
    run, source = _push(run_play, tmp_path, server, people["pw"], dest, task={"become": True},
                        hostvars={"ansible_become_password": PASSWORD})
    assert run.rc == 0 and not run["pushed"].get("failed"), run
    _same_tree(source, dest)
    assert _owners(dest) == {(0, 0)}
    assert PASSWORD not in run.stdout + run.stderr + str(run["pushed"])


def test_become_without_the_needed_password_says_so(run_play, tmp_path, server, people, landing):
    run, _source = _push(run_play, tmp_path, server, people["pw"], landing / "root-only" / "nopass",
                         task={"become": True, "ignore_unreachable": True})
    assert run["pushed"].get("failed") or run["pushed"].get("unreachable"), run
    assert "needs a password" in run["pushed"]["msg"] and "ansible_become_password" in run["pushed"]["msg"]
    assert not (landing / "root-only" / "nopass").exists()


def test_a_become_refusal_is_a_task_failure_not_unreachable(run_play, tmp_path, server, people, landing):
    run, _source = _push(run_play, tmp_path, server, people["pw"], landing / "root-only" / "nopass2",
                         task={"become": True, "ignore_unreachable": True})
    assert run["pushed"].get("failed") and not run["pushed"].get("unreachable"), run


def test_become_method_other_than_sudo_is_refused(run_play, tmp_path, server, people, landing):
    run, _source = _push(run_play, tmp_path, server, people["nopw"], landing / "root-only" / "su",
                         task={"become": True, "become_method": "su"})
    assert run["pushed"].get("failed"), run
    assert "become_method su is not supported" in run["pushed"]["msg"]
    assert not (landing / "root-only" / "su").exists()


def test_owner_and_group_like_copy(run_play, tmp_path, server, people, landing):
    owner, (group, gid) = people["owner"], people["group"]
    dest = landing / "root-only" / "owned"
    run, source = _push(run_play, tmp_path, server, people["nopw"], dest, task={"become": True},
                        owner=owner.name, group=group)
    assert run.rc == 0 and not run["pushed"].get("failed"), run
    _same_tree(source, dest)
    assert _owners(dest) == {(owner.uid, gid)}  # files and the directories the push made


def test_numeric_owner_alone_keeps_the_group(run_play, tmp_path, server, people, landing):
    owner = people["owner"]
    dest = landing / "root-only" / "numeric"
    run, _source = _push(run_play, tmp_path, server, people["nopw"], dest, task={"become": True},
                         owner=str(owner.uid))
    assert run.rc == 0 and not run["pushed"].get("failed"), run
    assert _owners(dest / "sub") == {(owner.uid, 0)}


# --- refusals, driven from Python (faster than a play each) ---------------------------------------------


def _spec(server: SshServer, login, become=None, **extra):
    spec = resolve_spec(server.host, port=server.port, user=login.name, private_key_file=str(server.client_key),
                        ssh_args=(f"-o UserKnownHostsFile={server.known_hosts}",), timeout=15, become=become)
    for name, value in extra.items():
        setattr(spec, name, value)
    return spec


def _refusal(spec) -> SessionError:
    with pytest.raises(SessionError) as failure:
        open_session(spec)
    assert not failure.value.retryable
    return failure.value


def test_wrong_become_password_is_refused_without_showing_it(server, people):
    error = _refusal(_spec(server, people["pw"], BecomeSpec(user="root", password="Wr0ng-Sentinel-become")))
    assert "refused the become password" in str(error) and "Wr0ng-Sentinel-become" not in str(error)


def test_user_without_sudo_rights_gets_sudos_reason(server, people):
    error = _refusal(_spec(server, people["nosudo"], BecomeSpec(user="root")))
    assert "become:" in str(error) and "sudo" in str(error)


def test_a_wrong_sftp_server_path_is_named(server, people):
    error = _refusal(_spec(server, people["nopw"], BecomeSpec(user="root", sftp_server="/nonexistent/sftp-server")))
    assert "/nonexistent/sftp-server" in str(error) or "sftp_server" in str(error)


def test_owner_without_become_is_refused_before_anything_is_written(server, people):
    error = _refusal(_spec(server, people["nopw"], owner=people["owner"].name))
    assert "only root can give files to another user" in str(error) and "become" in str(error)


def test_group_the_writer_is_not_in_is_refused(server, people):
    error = _refusal(_spec(server, people["nopw"], group=people["group"][0]))
    assert "is not a member" in str(error)


def test_unknown_owner_is_named(server, people):
    error = _refusal(_spec(server, people["nopw"], BecomeSpec(user="root"), owner="no-such-user-mp"))
    assert "owner='no-such-user-mp' does not exist" in str(error)


def test_own_user_and_own_group_need_no_become(server, people):
    login = people["nopw"]
    transport, sftp = open_session(_spec(server, login, owner=login.name, group=str(login.gid)))
    try:
        assert (sftp.multipush_uid, sftp.multipush_gid) == (login.uid, login.gid)
    finally:
        transport.close()


def test_an_sftp_only_account_cannot_become_and_is_told_why(tmp_path, server, people, landing):
    """ForceCommand internal-sftp runs SFTP whatever command is asked for: sudo never starts."""
    options = {"AuthorizedKeysFile": str(landing / "keys" / "%u"), "ForceCommand": "internal-sftp"}
    with SshServer(workdir=tmp_path / "sftp-only", options=options) as only:
        login = people["nopw"]
        plain = resolve_spec(only.host, port=only.port, user=login.name, private_key_file=str(server.client_key),
                             ssh_args=(f"-o UserKnownHostsFile={only.known_hosts}",), timeout=3)
        transport, sftp = open_session(plain)  # SFTP itself works for that account
        assert sftp.listdir(str(landing))
        transport.close()
        plain.become = BecomeSpec(user="root")
        error = _refusal(plain)
    assert "sftp-server" in str(error) and "ForceCommand internal-sftp" in str(error)
