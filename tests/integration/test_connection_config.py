"""How the push finds its way to a host: ssh config files, the ssh arguments of the inventory, their
precedence (OpenSSH's: Ansible's own options, then the command line, then the first value found in
the files), IPv6, names with several addresses, host key policies and keepalives.

The resolution tests run `resolve_spec` on written config files (no network); the others connect
to real sshd instances on loopback.
"""

from __future__ import annotations

import socket

import pytest

from ansible_collections.multipush.sftp.plugins.plugin_utils import _session
from ansible_collections.multipush.sftp.plugins.plugin_utils._arguments import PushOptions
from ansible_collections.multipush.sftp.plugins.plugin_utils._push import Push
from ansible_collections.multipush.sftp.plugins.plugin_utils._session import open_session
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import SessionError
from ansible_collections.multipush.sftp.plugins.plugin_utils._sshconfig import parse_jump, resolve_spec
from tests.support.connections import server_config, ssh_config, write_inventory
from tests.support.playenv import push_task
from tests.support.files import MIB, random_file, crc32, sha256
from tests.support.sshd import SshServer, free_port, generate_key
from tests.support.waiting import wait_until

# --- resolution ---------------------------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "extra.conf").write_text("Host included\n    HostName 10.9.9.9\n    Port 2299\n")
    return ssh_config(tmp_path / "ssh_config", {
        "web": {"HostName": "192.0.2.10", "Port": "2201", "User": "deploy",
                "IdentityFile": [str(tmp_path / "k1"), str(tmp_path / "k2")], "IdentitiesOnly": "yes",
                "UserKnownHostsFile": f"{tmp_path}/kh1 {tmp_path}/kh2", "StrictHostKeyChecking": "yes",
                "ConnectTimeout": "4", "ServerAliveInterval": "9", "AddressFamily": "inet6",
                "HostKeyAlias": "web-key"},
        "behind": {"HostName": "192.0.2.20", "ProxyJump": "hop1,ops@hop2:2222"},
        "hop1": {"HostName": "192.0.2.1", "User": "jumper", "Port": "2022", "UserKnownHostsFile": "/hop1/kh",
                 "IdentityFile": "/hop1/key"},
        "hop2": {"HostName": "192.0.2.2", "User": "nobody"},
        "cmd": {"ProxyCommand": "nc -q0 %h %p # user %r alias %n 100%%", "Port": "2300"},
        "noproxy": {"ProxyCommand": "none"},
        "*": {"StrictHostKeyChecking": "accept-new", "ProxyJump": "hop1", "IdentityAgent": "none"},
    }, top=f"Include {tmp_path}/conf.d/*.conf")


def test_the_config_file_gives_every_setting_of_its_host(config_file, tmp_path):
    spec = resolve_spec("web", ssh_args=(f"-F {config_file}",))
    assert (spec.host, spec.port, spec.user, spec.alias) == ("192.0.2.10", 2201, "deploy", "web")
    assert [spec.private_key_file, *spec.identity_files] == [str(tmp_path / "k1"), str(tmp_path / "k2")]
    assert spec.identities_only and not spec.look_for_keys and not spec.allow_agent
    assert spec.known_hosts_files[:2] == [f"{tmp_path}/kh1", f"{tmp_path}/kh2"]
    assert spec.host_key_checking and not spec.accept_new_host_keys
    assert (spec.connect_timeout, spec.keepalive, spec.address_family) == (4.0, 9, "inet6")
    assert spec.host_key_name == "[web-key]:2201"
    assert spec.jump is not None and spec.jump.host == "192.0.2.1"  # from "Host *": first value wins elsewhere


def test_ansible_options_then_command_line_then_file(config_file, tmp_path):
    """ansible_port/ansible_user/key file come first on ssh's command line, then ssh_args options."""
    args = (f"-F {config_file} -o Port=2400 -l cli-user -i {tmp_path}/cli-key", "-o Port=2500 -o User=later")
    from_args = resolve_spec("web", ssh_args=args)
    assert (from_args.port, from_args.user) == (2400, "cli-user")  # first -o/-l wins, the file comes last
    assert from_args.private_key_file == f"{tmp_path}/cli-key"
    assert from_args.identity_files == [str(tmp_path / "k1"), str(tmp_path / "k2")]  # IdentityFile adds up
    explicit = resolve_spec("web", ssh_args=args, port=2600, user="ansible-user",
                            private_key_file=f"{tmp_path}/ansible-key", host_key_checking=False)
    assert (explicit.port, explicit.user) == (2600, "ansible-user")
    assert explicit.private_key_file == f"{tmp_path}/ansible-key"
    assert explicit.identity_files[0] == f"{tmp_path}/cli-key"
    assert not explicit.host_key_checking  # ANSIBLE_HOST_KEY_CHECKING=False beats StrictHostKeyChecking yes
    stricter = resolve_spec("web", ssh_args=(f"-F {config_file} -o StrictHostKeyChecking=no",))
    assert not stricter.host_key_checking


def test_proxyjump_hops_are_resolved_each_with_its_own_config(config_file):
    spec = resolve_spec("behind", ssh_args=(f"-F {config_file} -o UserKnownHostsFile=/target/kh",), port=2201)
    hop2 = spec.jump
    hop1 = hop2.jump
    assert (hop2.host, hop2.port, hop2.user) == ("192.0.2.2", 2222, "ops")  # the hop string beats the file
    assert (hop1.host, hop1.port, hop1.user, hop1.private_key_file) == ("192.0.2.1", 2022, "jumper", "/hop1/key")
    assert hop1.known_hosts_files[0] == "/hop1/kh"
    # like the `ssh -W` OpenSSH runs per hop: -o options of the command line do not reach the hops
    assert spec.known_hosts_files[0] == "/target/kh" and "/target/kh" not in hop2.known_hosts_files
    assert hop1.jump is None  # hop1's own "Host *" ProxyJump hop1 would loop; ssh stops there too
    assert spec.describe().endswith(":2201 via ops@192.0.2.2:2222 via jumper@192.0.2.1:2022")


def test_dash_j_and_proxycommand_on_the_command_line_win_over_the_file(config_file):
    jumped = resolve_spec("cmd", ssh_args=(f"-F {config_file} -J alice@[::1]:2200",))
    assert jumped.proxy_command is None
    assert (jumped.jump.host, jumped.jump.port, jumped.jump.user) == ("::1", 2200, "alice")
    commanded = resolve_spec("behind", ssh_args=(f"-F {config_file}", "-o 'ProxyCommand=socat - TCP:%h:%p'"))
    assert commanded.jump is None and commanded.proxy_command == "socat - TCP:192.0.2.20:22"


def test_proxycommand_tokens_use_the_effective_port_and_user(config_file):
    spec = resolve_spec("cmd", ssh_args=(f"-F {config_file}",), port=2500, user="bob")
    assert spec.proxy_command == "nc -q0 cmd 2500 # user bob alias cmd 100%"
    assert spec.jump is None  # the host's ProxyCommand came first; "Host *"'s ProxyJump does not apply
    assert resolve_spec("noproxy", ssh_args=(f"-F {config_file}",)).proxy_command is None


def test_include_and_accept_new(config_file):
    spec = resolve_spec("included", ssh_args=(f"-F {config_file}",))
    assert (spec.host, spec.port) == ("10.9.9.9", 2299)
    assert spec.accept_new_host_keys and spec.host_key_checking


def test_without_dash_f_the_users_config_is_read_from_home(tmp_path, monkeypatch):
    (tmp_path / ".ssh").mkdir()
    ssh_config(tmp_path / ".ssh" / "config", {"homehost": {"HostName": "192.0.2.77", "Port": "2777"}})
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = resolve_spec("homehost")
    assert (spec.host, spec.port) == ("192.0.2.77", 2777)
    assert spec.known_hosts_files[0] == f"{tmp_path}/.ssh/known_hosts"


def test_a_missing_dash_f_file_is_an_error(tmp_path):
    with pytest.raises(SessionError, match="does not exist"):
        resolve_spec("x", ssh_args=(f"-F {tmp_path}/nope",))


@pytest.mark.parametrize("text, expected", [
    ("host", ("host", None, None)),
    ("user@host:2200", ("host", 2200, "user")),
    ("ssh://user@host:2201", ("host", 2201, "user")),
    ("[::1]:2202", ("::1", 2202, None)),
    ("me@[fe80::1]", ("fe80::1", None, "me")),
])
def test_jump_hop_syntax(text, expected):
    assert parse_jump(text) == expected


# --- connecting ---------------------------------------------------------------------------------


def _python_spec(server: SshServer, **extra):
    return resolve_spec(server.host, port=server.port, user=server.user, private_key_file=str(server.client_key),
                        ssh_args=(f"-o UserKnownHostsFile={server.known_hosts}",) + extra.pop("ssh_args", ()),
                        timeout=10, **extra)


def test_playbook_reaches_an_alias_of_the_ssh_config_file(run_play, sshd, tmp_path):
    """Nothing but ansible_host (an alias) and `-F file`: both Ansible's ssh (verify module) and the
    push find HostName, Port, User, IdentityFile, known_hosts, timeouts in the file."""
    config = ssh_config(tmp_path / "ssh_config", {"mp-alias": server_config(
        sshd, ConnectTimeout="5", ServerAliveInterval="15")})
    inventory = write_inventory(tmp_path / "inventory.yml", {"target": {
        "ansible_host": "mp-alias", "ansible_ssh_common_args": f"-F {config}",
        "ansible_python_interpreter": "/usr/bin/python3"}})
    source = random_file(tmp_path / "src.bin", 3 * MIB + 5)
    dest = tmp_path / "dst" / "src.bin"
    run = run_play(push_task(source, dest, connections=2, chunk_size="1M", whole_checksum=True), inventory=inventory)
    assert run.rc == 0 and not run["pushed"].get("failed"), run
    assert run["pushed"]["files"][0]["checksum"] == crc32(source) and sha256(source) == sha256(dest)


def test_ipv6_target(run_play, tmp_path):
    with SshServer(workdir=tmp_path / "sshd6", host="::1") as server:
        source = random_file(tmp_path / "src.bin", 4 * MIB + 1)
        dest = tmp_path / "dst" / "src.bin"
        inventory = server.write_inventory(tmp_path / "inventory.ini")
        run = run_play(push_task(source, dest, connections=3, chunk_size="1M", whole_checksum=True),
                       inventory=inventory)
        assert run.rc == 0 and not run["pushed"].get("failed"), run
        assert sha256(dest) == sha256(source) and run["pushed"]["files"][0]["checksum"] == crc32(source)
        assert "Accepted publickey for" in server.log_file.read_text()
        assert "from ::1 port" in server.log_file.read_text()


def test_every_address_of_a_name_is_tried_in_order(sshd, tmp_path, monkeypatch):
    """A name with an IPv6 address where nothing listens, then the sshd's IPv4 address: the push gets
    through on the second, in every forked worker."""
    real = socket.getaddrinfo
    dead = free_port("::1")

    def two_addresses(host, port, family=0, kind=0, *rest):
        if host != "mp-two-addresses.test":
            return real(host, port, family, kind, *rest)
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", dead, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(_session.socket, "getaddrinfo", two_addresses)
    spec = _python_spec(sshd, ssh_args=(f"-o HostKeyAlias={sshd.host}",))  # known_hosts names the IPv4 address
    spec.host = "mp-two-addresses.test"
    source = random_file(tmp_path / "src.bin", 2 * MIB + 3)
    result = Push(PushOptions(src=str(source), dest=str(tmp_path / "dst.bin"), connections=2, chunk_size="1M",
                              verify="size"), spec, None, print).run()
    assert result["connections"] == 2 and sha256(tmp_path / "dst.bin") == sha256(source)

    spec.port = dead  # now nothing answers on either address: both are named in the error
    with pytest.raises(SessionError) as failure:
        open_session(spec)
    assert f"::1 port {dead}" in str(failure.value) and f"127.0.0.1 port {dead}" in str(failure.value)
    assert failure.value.retryable


def test_address_family_inet_skips_ipv6(sshd, monkeypatch):
    seen = []
    real = socket.getaddrinfo

    def recording(host, port, family=0, *rest):
        seen.append(family)
        return real(host, port, family, *rest)

    monkeypatch.setattr(_session.socket, "getaddrinfo", recording)
    transport, _sftp = open_session(_python_spec(sshd, ssh_args=("-4",)))
    transport.close()
    assert seen == [socket.AF_INET]


def test_accept_new_takes_an_unknown_key_but_never_a_changed_one(sshd, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    spec = resolve_spec(sshd.host, port=sshd.port, user=sshd.user, private_key_file=str(sshd.client_key), timeout=10,
                        ssh_args=(f"-o UserKnownHostsFile={empty} -o GlobalKnownHostsFile=/dev/null",))
    with pytest.raises(SessionError, match="is not known"):
        open_session(spec)
    spec.accept_new_host_keys = True
    transport, _sftp = open_session(spec)
    transport.close()
    wrong = tmp_path / "wrong_known_hosts"
    impostor = generate_key(tmp_path / "impostor").with_suffix(".pub").read_text().split()
    wrong.write_text(f"{sshd.known_hosts.read_text().split()[0]} {impostor[0]} {impostor[1]}\n")
    spec.known_hosts_files = [str(wrong)]
    with pytest.raises(SessionError, match="HOST KEY MISMATCH") as failure:
        open_session(spec)
    assert f"-f {wrong}" in str(failure.value)  # the remedy edits the file that holds the entry


def test_known_hosts_lines_paramiko_cannot_parse_are_skipped_and_revoked_keys_refused(sshd, tmp_path):
    """Real known_hosts files hold @cert-authority lines, hashed names and key types Paramiko does not
    know; Paramiko's own loader gives up on the whole file at the first of them."""
    kind, blob = sshd.host_key.with_suffix(".pub").read_text().split()[:2]
    lines = [f"@cert-authority *.example.com {kind} {blob}", "# a comment", "not a key line",
             f"example.org sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29t {blob}",
             sshd.known_hosts.read_text().strip()]
    known = tmp_path / "known_hosts"
    known.write_text("\n".join(lines) + "\n")
    spec = resolve_spec(sshd.host, port=sshd.port, user=sshd.user, private_key_file=str(sshd.client_key), timeout=10,
                        ssh_args=(f"-o UserKnownHostsFile={known}",))
    transport, _sftp = open_session(spec)
    transport.close()
    known.write_text("\n".join(lines + [f"@revoked * {kind} {blob}"]) + "\n")
    with pytest.raises(SessionError, match="@revoked"):
        open_session(spec)


def test_server_alive_interval_sends_keepalives(tmp_path):
    with SshServer(workdir=tmp_path / "sshd", options={"LogLevel": "DEBUG"}) as server:
        transport, _sftp = open_session(_python_spec(server, ssh_args=("-o ServerAliveInterval=1",)))
        try:
            wait_until(lambda: "keepalive@lag.net" in server.log_file.read_text(), 15, what="a keepalive in sshd's log")
        finally:
            transport.close()


def test_connect_timeout_is_the_tcp_connect_timeout(sshd, monkeypatch):
    timeouts = []
    real = socket.socket.settimeout

    def recording(self, value):
        timeouts.append(value)
        return real(self, value)

    monkeypatch.setattr(_session.socket.socket, "settimeout", recording)
    transport, _sftp = open_session(_python_spec(sshd, ssh_args=("-o ConnectTimeout=3",)))
    transport.close()
    assert timeouts[0] == 3.0
