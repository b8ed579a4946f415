"""Authentication as Ansible's ssh does it: ssh-agent keys, encrypted identity files (a passphrase, or
the agent holding the key), passwords for password and keyboard-interactive authentication.

Each test checks in sshd's log which method and which key were accepted, so a push that got in
some other way than the one under test fails. Ansible's own ssh needs sshpass for passwords: it is
installed on demand (the test is skipped, saying why, where that is impossible).
"""

from __future__ import annotations

import os
import shutil

import pytest

from ansible_collections.multipush.sftp.plugins.plugin_utils._session import open_session
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import SessionError
from ansible_collections.multipush.sftp.plugins.plugin_utils._sshconfig import resolve_spec
from tests.support.connections import (
    SshAgent, UserFactory, accepted, ensure_tool, fingerprint, shared_dir, write_inventory,
)
from tests.support.playenv import push_task
from tests.support.files import MIB, random_file, sha256
from tests.support.sshd import SshServer, generate_key

PASSWORD = "Tr0ub4dor&3-multipush"  # the test user's, made for this module only
PASSPHRASE = "correct horse battery staple"


@pytest.fixture(scope="module")
def keys_sshd(tmp_path_factory):
    """An sshd of its own: tests add keys to its authorized_keys."""
    server = SshServer(workdir=tmp_path_factory.mktemp("keys-sshd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def users():
    factory = UserFactory()
    yield factory
    factory.remove()


@pytest.fixture(scope="module")
def password_user(users):
    return users.user("pw", password=PASSWORD)


@pytest.fixture(scope="module")
def landing(password_user):
    """A directory outside pytest's root-only tmp tree, writable by the password user."""
    root = shared_dir("multipush-auth-")
    os.chown(root, password_user.uid, password_user.gid)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def env(ansible_env):
    ansible_env.pop("SSH_AUTH_SOCK", None)  # only the agent a test starts takes part
    return ansible_env


def _vars(server: SshServer, **extra) -> dict:
    values = {"ansible_host": server.host, "ansible_port": server.port, "ansible_user": server.user,
              "ansible_ssh_common_args": f"-o UserKnownHostsFile={server.known_hosts} -o StrictHostKeyChecking=yes",
              "ansible_python_interpreter": "/usr/bin/python3"}
    values.update(extra)
    return {key: value for key, value in values.items() if value is not None}


def _push(run_play, tmp_path, hostvars, env, dest_dir=None, **options):
    source = random_file(tmp_path / "src" / "file.bin", 3 * MIB + 1)
    dest = (dest_dir or tmp_path / "dst") / "file.bin"
    inventory = write_inventory(tmp_path / "inventory.yml", {"target": hostvars})
    options.setdefault("whole_checksum", True)  # the result's checksum proves the verification ran
    run = run_play(push_task(source, dest, connections=2, chunk_size="1M", **options), inventory=inventory, env=env)
    result = run["pushed"]
    assert run.rc == 0 and not result.get("failed"), run
    assert sha256(dest) == sha256(source)
    return result


def _authorize(server: SshServer, public_key) -> None:
    server.authorized_keys.write_text(server.authorized_keys.read_text() + public_key.read_text())


# --- keys -------------------------------------------------------------------------------------------


def test_ssh_agent_key_without_any_key_file(run_play, tmp_path, keys_sshd, env):
    key = generate_key(tmp_path / "agent_key")
    _authorize(keys_sshd, key.with_suffix(".pub"))
    agent = SshAgent(tmp_path)
    try:
        agent.add(key)
        key.unlink()  # only the agent has it now
        env.update(agent.env)
        before = len(keys_sshd.log_file.read_text())
        result = _push(run_play, tmp_path, _vars(keys_sshd), env)
    finally:
        agent.stop()
    assert result["files"][0]["checksum"]  # verified on the target, over the pool's connections
    logins = accepted(keys_sshd.log_file.read_text()[before:], "publickey")
    assert len(logins) >= result["connections"]
    assert all(fingerprint(key.with_suffix(".pub")) in line for line in logins), logins


def test_encrypted_key_file_with_ansible_private_key_passphrase(run_play, tmp_path, keys_sshd, env):
    key = generate_key(tmp_path / "locked_key", passphrase=PASSPHRASE)
    _authorize(keys_sshd, key.with_suffix(".pub"))
    (tmp_path / "locked_key.pub").unlink()  # nothing to read but the encrypted file
    before = len(keys_sshd.log_file.read_text())
    # Ansible's ssh cannot use an encrypted key file without an agent: no verify module (verify: size).
    result = _push(run_play, tmp_path, _vars(keys_sshd, ansible_ssh_private_key_file=str(key),
                                             ansible_private_key_passphrase=PASSPHRASE), env, verify="size")
    logins = accepted(keys_sshd.log_file.read_text()[before:], "publickey")
    assert len(logins) == result["connections"] == 2


def test_encrypted_key_file_held_by_the_agent_needs_no_passphrase(run_play, tmp_path, keys_sshd, env):
    key = generate_key(tmp_path / "agent_locked_key", passphrase=PASSPHRASE)
    _authorize(keys_sshd, key.with_suffix(".pub"))
    agent = SshAgent(tmp_path)
    try:
        agent.add(key, PASSPHRASE)
        env.update(agent.env)
        result = _push(run_play, tmp_path, _vars(keys_sshd, ansible_ssh_private_key_file=str(key)), env)
    finally:
        agent.stop()
    assert result["files"][0]["checksum"]


def test_encrypted_key_without_passphrase_or_agent_is_refused_with_the_remedy(tmp_path, keys_sshd, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    key = generate_key(tmp_path / "locked_key", passphrase=PASSPHRASE)
    spec = resolve_spec(keys_sshd.host, port=keys_sshd.port, user=keys_sshd.user, private_key_file=str(key),
                        ssh_args=(f"-o UserKnownHostsFile={keys_sshd.known_hosts}",), timeout=10)
    with pytest.raises(SessionError) as failure:
        open_session(spec)
    assert "is encrypted and no passphrase was given" in str(failure.value)
    assert "ssh-agent" in str(failure.value) and not failure.value.retryable
    spec.key_passphrase = "not the passphrase"
    with pytest.raises(SessionError, match="wrong passphrase") as failure:
        open_session(spec)
    assert "not the passphrase" not in str(failure.value)


def test_a_key_login_sends_no_none_request_first(tmp_path, monkeypatch):
    """ssh asks which methods the server takes (the "none" request) before offering a key; that is
    a round trip on every login that a refused key would answer just as well."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    server = SshServer(workdir=tmp_path / "debug-sshd", options={"LogLevel": "DEBUG1"})
    server.start()
    try:
        spec = resolve_spec(server.host, port=server.port, user=server.user, private_key_file=str(server.client_key),
                            ssh_args=(f"-o UserKnownHostsFile={server.known_hosts}",), timeout=10)
        transport, _sftp = open_session(spec)
        transport.close()
        log = server.log_file.read_text()
    finally:
        server.stop()
    methods = [line.split(" method ")[1].split()[0] for line in log.splitlines() if "userauth-request for user" in line]
    assert methods == ["publickey"], methods


@pytest.mark.parametrize("key_type", ["ed25519", "rsa"])
def test_a_key_login_sends_its_request_behind_the_service_request(key_type, keys_sshd, tmp_path, monkeypatch):
    """The userauth request goes out before the server's service accept can come back (a relay
    makes the round trip long): one round trip for both, not one each. An RSA key does the same once
    the server's signature algorithms are in (they come right after the key exchange), else it waits
    as before: either way it gets in, with one request."""
    import paramiko

    from ansible_collections.multipush.sftp.plugins.plugin_utils import _paramiko_compat
    from tests.support.relay import Relay

    if not _paramiko_compat.USE_PRIVATE:
        pytest.skip(f"Paramiko's public paths: {_paramiko_compat.WHY_PUBLIC}")
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    key = generate_key(tmp_path / f"id_{key_type}", key_type)
    with open(keys_sshd.authorized_keys, "a", encoding="ascii") as handle:
        handle.write(key.with_suffix(".pub").read_text())
    order = []
    real_send, real_read = paramiko.Transport._send_message, paramiko.Packetizer.read_message

    def sending(self, message):
        if message.asbytes()[:1] == bytes([paramiko.common.MSG_USERAUTH_REQUEST]):
            order.append("userauth request sent")
        return real_send(self, message)

    def reading(self):
        kind, message = real_read(self)
        if kind == paramiko.common.MSG_SERVICE_ACCEPT:
            order.append("service accepted")
        return kind, message

    monkeypatch.setattr(paramiko.Transport, "_send_message", sending)
    monkeypatch.setattr(paramiko.Packetizer, "read_message", reading)
    with Relay((keys_sshd.host, keys_sshd.port), rtt_ms=400) as relay:
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(relay.known_hosts_line(keys_sshd.known_hosts_line()))
        spec = resolve_spec(relay.host, port=relay.port, user=keys_sshd.user, private_key_file=str(key),
                            ssh_args=(f"-o UserKnownHostsFile={known_hosts}", "-o IdentitiesOnly=yes"), timeout=10)
        transport, _sftp = open_session(spec)
        transport.close()
    logins = accepted(keys_sshd.log_file.read_text(), "publickey", keys_sshd.user)
    assert any(fingerprint(key.with_suffix(".pub")) in line for line in logins), logins
    if key_type == "ed25519":
        assert order == ["userauth request sent", "service accepted"], order
    else:
        assert sorted(order) == ["service accepted", "userauth request sent"], order


# --- passwords --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def password_sshd(tmp_path_factory):
    server = SshServer(workdir=tmp_path_factory.mktemp("password-sshd"), options={"PasswordAuthentication": "yes"})
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def kbd_sshd(tmp_path_factory):
    """Keyboard-interactive only (through PAM, which OpenSSH needs for it); passwords refused."""
    server = SshServer(workdir=tmp_path_factory.mktemp("kbd-sshd"), options={
        "UsePAM": "yes", "KbdInteractiveAuthentication": "yes", "PasswordAuthentication": "no"})
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("server_name, method", [("password_sshd", "password"),
                                                 ("kbd_sshd", "keyboard-interactive/pam")])
def test_password_of_a_user(run_play, tmp_path, request, server_name, method, password_user, landing, env):
    ensure_tool("sshpass", "sshpass")  # Ansible's ssh types passwords with it (for the verify module)
    server = request.getfixturevalue(server_name)
    before = len(server.log_file.read_text())
    dest_dir = landing / method.replace("/", "-")
    result = _push(run_play, tmp_path, _vars(server, ansible_user=password_user.name, ansible_password=PASSWORD),
                   env, dest_dir=dest_dir)
    assert result["files"][0]["checksum"]
    assert (dest_dir / "file.bin").stat().st_uid == password_user.uid
    logins = accepted(server.log_file.read_text()[before:], user=password_user.name)
    assert len(logins) >= result["connections"] and all(line.startswith(f"Accepted {method} ") for line in logins)


def test_wrong_password_fails_at_once_naming_what_was_tried(password_sshd, password_user):
    spec = resolve_spec(password_sshd.host, port=password_sshd.port, user=password_user.name,
                        password="Wr0ng-Sentinel-31",
                        ssh_args=(f"-o UserKnownHostsFile={password_sshd.known_hosts}",), timeout=10)
    spec.look_for_keys = spec.allow_agent = False
    with pytest.raises(SessionError) as failure:
        open_session(spec)
    assert "tried: password" in str(failure.value) and not failure.value.retryable
    assert "Wr0ng-Sentinel-31" not in str(failure.value)


def test_identities_only_keeps_other_agent_keys_out(tmp_path, keys_sshd, monkeypatch):
    """The agent holds the only authorized key; the identity file is another key. Without
    IdentitiesOnly the agent key gets in (agent keys come first, as in ssh); with it, it is not offered."""
    authorized = generate_key(tmp_path / "authorized_key")
    _authorize(keys_sshd, authorized.with_suffix(".pub"))
    stranger = generate_key(tmp_path / "stranger_key")
    agent = SshAgent(tmp_path)
    try:
        agent.add(authorized)
        monkeypatch.setenv("SSH_AUTH_SOCK", agent.env["SSH_AUTH_SOCK"])
        args = f"-o UserKnownHostsFile={keys_sshd.known_hosts} -i {stranger}"
        spec = resolve_spec(keys_sshd.host, port=keys_sshd.port, user=keys_sshd.user, ssh_args=(args,), timeout=10)
        transport, _sftp = open_session(spec)
        transport.close()
        only = resolve_spec(keys_sshd.host, port=keys_sshd.port, user=keys_sshd.user, timeout=10,
                            ssh_args=(args + " -o IdentitiesOnly=yes",))
        with pytest.raises(SessionError) as failure:
            open_session(only)
    finally:
        agent.stop()
    assert f"(tried: key {stranger})" in str(failure.value)  # the agent's key was not offered
