"""Fleets: several hosts pushed at once (forks), each with its own pool of connections.

Five sshd instances on five loopback addresses (127.0.0.1 to 127.0.0.5) stand for five hosts. Each
accepts at most 4 unauthenticated connections at a time (MaxStartups 4:100:4, so a fifth would be
dropped) and the push opens at most 2 handshakes per host (max_concurrent_handshakes): the per-host
budget of docs/connections.md. With -f 5 the controller holds up to forks x connections connections,
but each target only ever sees its own pool: no drop in any sshd log, no handshake retried.
"""

from __future__ import annotations

import json

import pytest

from tests.support.connections import forwarded_to, server_config, ssh_config, write_inventory
from tests.support.playenv import push_task
from tests.support.files import MIB, random_file, crc32, sha256
from tests.support.sshd import SshServer

HOSTS = 5
CONNECTIONS = 3
HANDSHAKES = 2
MAX_STARTUPS = "4:100:4"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    servers = [SshServer(workdir=tmp_path_factory.mktemp(f"fleet{index}"), host=f"127.0.0.{index}",
                         options={"MaxStartups": MAX_STARTUPS})
               for index in range(1, HOSTS + 1)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def _hostvars(server: SshServer, **extra) -> dict:
    values = {"ansible_host": server.host, "ansible_port": server.port, "ansible_user": server.user,
              "ansible_ssh_private_key_file": str(server.client_key),
              "ansible_ssh_common_args": f"-o UserKnownHostsFile={server.known_hosts} -o IdentitiesOnly=yes",
              "ansible_python_interpreter": "/usr/bin/python3"}
    values.update(extra)
    return values


def _save_per_host(results_dir) -> str:
    """The registered result of every host (run_play keeps only one per name)."""
    return (
        "- name: Save each host's result\n"
        "  ansible.builtin.copy:\n"
        "    content: \"{{ pushed | to_json }}\"\n"
        f"    dest: \"{results_dir}/host-{{{{ inventory_hostname }}}}.json\"\n"
        "    mode: \"0644\"\n"
        "  delegate_to: localhost\n"
    )


def _run_fleet(run_play, tmp_path, inventory_hosts: dict, source, forks: int):
    inventory = write_inventory(tmp_path / "inventory.yml", inventory_hosts)
    results_dir = tmp_path / "results"
    tasks = push_task(source, f"{tmp_path}/dst/{{{{ inventory_hostname }}}}/image.bin", connections=CONNECTIONS,
                      max_concurrent_handshakes=HANDSHAKES, chunk_size="1M", verify="checksum",
                      whole_checksum=True)
    run = run_play(tasks + _save_per_host(results_dir), inventory=inventory, extra_args=["-f", str(forks)])
    assert run.rc == 0, run
    return run, {name: json.loads((results_dir / f"host-{name}.json").read_text()) for name in inventory_hosts}


def test_five_hosts_at_once_each_within_its_own_budget(run_play, tmp_path, fleet):
    source = random_file(tmp_path / "src" / "image.bin", 6 * MIB + 99)
    names = {f"host{index}": server for index, server in enumerate(fleet, start=1)}
    logs_before = {name: len(server.log_file.read_text()) for name, server in names.items()}
    run, results = _run_fleet(run_play, tmp_path, {name: _hostvars(server) for name, server in names.items()},
                              source, forks=HOSTS)
    for name, server in names.items():
        result = results[name]
        assert not result.get("failed"), (name, result)
        assert sha256(tmp_path / "dst" / name / "image.bin") == sha256(source)
        assert result["files"][0]["checksum"] == crc32(source)
        assert result["connections"] == CONNECTIONS  # the host's own pool, no more
        assert result["remote_hashing"]["via"] == "ssh"  # the checks travelled over the pool too
        assert result["handshake_retries"] == 0
        log = server.log_file.read_text()[logs_before[name]:]
        assert "MaxStartups" not in log and "drop connection" not in log, log[-2000:]
        # the pool reached this host, and only it
        assert log.count(f"Accepted publickey for {server.user} from ") >= result["connections"]
    assert sum(result["connections"] for result in results.values()) <= HOSTS * CONNECTIONS
    assert "failed=0" in run.stdout and "failed=1" not in run.stdout


def test_a_shared_jump_host_carries_every_hosts_pool(run_play, tmp_path, fleet, tmp_path_factory):
    """Three hosts behind one jump host with -f 3: the jump host forwards each host's whole pool,
    forks x connections in all, so its MaxStartups must allow forks x max_concurrent_handshakes."""
    forks = 3
    limit = forks * HANDSHAKES + 2
    jump = SshServer(workdir=tmp_path_factory.mktemp("fleet-jump"),
                     options={"LogLevel": "DEBUG", "MaxStartups": f"{limit}:100:{limit}"})
    with jump:
        config = ssh_config(tmp_path / "ssh_config", {"mp-fleet-jump": server_config(jump)})
        targets = {f"far{index}": server for index, server in enumerate(fleet[:forks], start=1)}
        hosts = {name: _hostvars(server, ansible_ssh_common_args=(
            f"-F {config} -J mp-fleet-jump -o UserKnownHostsFile={server.known_hosts} -o IdentitiesOnly=yes"))
            for name, server in targets.items()}
        source = random_file(tmp_path / "src" / "image.bin", 3 * MIB + 1)
        _run, results = _run_fleet(run_play, tmp_path, hosts, source, forks=forks)
        forwards = forwarded_to(jump.log_file.read_text())
        log = jump.log_file.read_text()
    assert "drop connection" not in log
    for name, server in targets.items():
        assert sha256(tmp_path / "dst" / name / "image.bin") == sha256(source)
        assert results[name]["connections"] == CONNECTIONS
        assert forwards.count((server.host, server.port)) >= results[name]["connections"]  # the whole pool
    assert len(forwards) >= sum(result["connections"] for result in results.values())
