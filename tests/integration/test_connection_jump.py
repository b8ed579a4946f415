"""Jump hosts: ProxyJump (one and two hops, from -o/-J or the ssh config file) and ProxyCommand.

Everything is on loopback, so the target is reachable directly too. That the traffic really went
through the jump hosts is proved from their sshd logs (LogLevel DEBUG records every direct-tcpip
forwarding with its target): each paramiko connection of the push is one forwarding there.
Remote hashing (verify: checksum) travels over those same connections.
"""

from __future__ import annotations

import pytest

from ansible_collections.multipush.sftp.plugins.plugin_utils._session import open_session
from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import SessionError
from ansible_collections.multipush.sftp.plugins.plugin_utils._sshconfig import resolve_spec
from tests.support.connections import forwarded_to, server_config, ssh_config, write_inventory
from tests.support.playenv import push_task
from tests.support.files import MIB, random_file, crc32, sha256
from tests.support.sshd import SshServer, free_port


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two jump hosts (logging forwardings) and a target."""
    servers = {
        "jump1": SshServer(workdir=tmp_path_factory.mktemp("jump1"), options={"LogLevel": "DEBUG"}),
        "jump2": SshServer(workdir=tmp_path_factory.mktemp("jump2"), options={"LogLevel": "DEBUG"}),
        "target": SshServer(workdir=tmp_path_factory.mktemp("target")),
    }
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


def _config(tmp_path, hosts, **target_extra):
    return ssh_config(tmp_path / "ssh_config", {
        "mp-jump1": server_config(hosts["jump1"]),
        "mp-jump2": server_config(hosts["jump2"]),
        "mp-target": server_config(hosts["target"], **target_extra),
    })


def _target_vars(target: SshServer, common_args: str, **extra) -> dict:
    values = {"ansible_host": target.host, "ansible_port": target.port, "ansible_user": target.user,
              "ansible_ssh_private_key_file": str(target.client_key),
              "ansible_ssh_common_args": common_args,
              "ansible_python_interpreter": "/usr/bin/python3"}
    values.update(extra)
    return values


def _known(target: SshServer) -> str:
    return f"-o UserKnownHostsFile={target.known_hosts} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"


def _forwards(server: SshServer) -> list[tuple[str, int]]:
    return forwarded_to(server.log_file.read_text())


def _push_and_check(run_play, tmp_path, inventory, connections=3):
    source = random_file(tmp_path / "src" / "image.bin", 6 * MIB + 7)
    dest = tmp_path / "dst" / "image.bin"
    run = run_play(push_task(source, dest, connections=connections, chunk_size="1M", verify="checksum",
                             whole_checksum=True),
                   inventory=inventory)
    result = run["pushed"]
    assert run.rc == 0 and not result.get("failed"), run
    assert result["connections"] == connections
    assert result["files"][0]["checksum"] == crc32(source) and sha256(source) == sha256(dest)
    return result


def test_proxyjump_one_hop_from_ssh_common_args(run_play, tmp_path, hosts):
    config = _config(tmp_path, hosts)
    target, jump = hosts["target"], hosts["jump1"]
    before = len(_forwards(jump))
    inventory = write_inventory(tmp_path / "inventory.yml", {"target": _target_vars(
        target, f"-F {config} -o ProxyJump=mp-jump1 {_known(target)}")})
    result = _push_and_check(run_play, tmp_path, inventory)
    through = _forwards(jump)[before:]
    # every paramiko connection went through jump1
    assert through.count((target.host, target.port)) >= result["connections"], through


def test_proxyjump_two_hops_with_dash_j(run_play, tmp_path, hosts):
    config = _config(tmp_path, hosts)
    target, jump1, jump2 = hosts["target"], hosts["jump1"], hosts["jump2"]
    before1, before2 = len(_forwards(jump1)), len(_forwards(jump2))
    inventory = write_inventory(tmp_path / "inventory.yml", {"target": _target_vars(
        target, f"-F {config} -J mp-jump1,mp-jump2 {_known(target)}")})
    result = _push_and_check(run_play, tmp_path, inventory)
    via1, via2 = _forwards(jump1)[before1:], _forwards(jump2)[before2:]
    assert via1.count((jump2.host, jump2.port)) >= result["connections"], via1  # hop 1 -> hop 2
    assert (target.host, target.port) not in via1  # hop 1 never talks to the target itself
    assert via2.count((target.host, target.port)) >= result["connections"], via2  # hop 2 -> target


def test_proxyjump_from_the_ssh_config_file_of_an_alias(run_play, tmp_path, hosts):
    """Only `-F file` on the command line: host name, port, user, key, known_hosts and the jump all
    come from the file's block for the inventory's ansible_host."""
    config = _config(tmp_path, hosts, ProxyJump="mp-jump2")
    target, jump = hosts["target"], hosts["jump2"]
    before = len(_forwards(jump))
    inventory = write_inventory(tmp_path / "inventory.yml", {"target": {
        "ansible_host": "mp-target", "ansible_ssh_common_args": f"-F {config}",
        "ansible_python_interpreter": "/usr/bin/python3"}})
    result = _push_and_check(run_play, tmp_path, inventory, connections=2)
    assert _forwards(jump)[before:].count((target.host, target.port)) >= result["connections"]


def test_proxycommand_runs_through_a_shell_with_tokens(run_play, tmp_path, hosts):
    config = _config(tmp_path, hosts)
    target, jump = hosts["target"], hosts["jump1"]
    before = len(_forwards(jump))
    proxy = f"ssh -F {config} -W %h:%p mp-jump1"
    inventory = write_inventory(tmp_path / "inventory.yml", {"target": _target_vars(
        target, f"-o 'ProxyCommand={proxy}' {_known(target)}")})
    result = _push_and_check(run_play, tmp_path, inventory, connections=2)
    assert _forwards(jump)[before:].count((target.host, target.port)) >= result["connections"]


def test_a_failing_proxycommand_is_reported_with_its_message(hosts):
    target = hosts["target"]
    spec = resolve_spec(target.host, port=target.port, user=target.user, private_key_file=str(target.client_key),
                        ssh_args=(f"-o UserKnownHostsFile={target.known_hosts}",
                                  "-o 'ProxyCommand=echo proxy-could-not-reach-%h:%p >&2; exit 3'"),
                        timeout=10)
    with pytest.raises(SessionError) as failure:
        open_session(spec)
    assert f"proxy-could-not-reach-{target.host}:{target.port}" in str(failure.value)
    assert "ProxyCommand" in str(failure.value)


def test_a_jump_host_that_cannot_reach_the_target_says_so(tmp_path, hosts):
    config = _config(tmp_path, hosts)
    closed = free_port()
    spec = resolve_spec("127.0.0.1", port=closed, ssh_args=(f"-F {config} -J mp-jump1",), timeout=10,
                        host_key_checking=False)
    with pytest.raises(SessionError) as failure:
        open_session(spec)
    message = str(failure.value)
    assert "mp-jump1" in message or f"{hosts['jump1'].port}" in message
    assert f"could not reach 127.0.0.1 port {closed}" in message
    assert failure.value.retryable  # like a refused connection: the target may come up


def test_jump_connections_are_closed_with_the_target_connection(tmp_path, hosts):
    """Closing the target's transport closes the hop transports under it (no leak per reconnect)."""
    config = _config(tmp_path, hosts)
    spec = resolve_spec("mp-target", ssh_args=(f"-F {config} -J mp-jump1,mp-jump2",), timeout=10)
    transport, sftp = open_session(spec)
    assert sftp.listdir(str(hosts["target"].workdir))
    carriers = []
    pending = list(transport.multipush_carriers)
    while pending:  # bounded: two hops
        hop = pending.pop()
        carriers.append(hop)
        pending.extend(hop.multipush_carriers)
    assert len(carriers) == 2 and all(hop.is_active() for hop in carriers)
    transport.close()
    assert not any(hop.is_active() for hop in carriers)
