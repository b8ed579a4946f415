"""Integration tests of the role multipush.sftp.sshd_tuning against real OpenSSH servers.

Every test starts its own sshd (function scope) from a config file, drop-in directory and pid file
under tmp_path, points Ansible at that same sshd and tunes it through the role variables. Whether
the running daemon took the new values is checked from the outside: sshd answers "Exceeded
MaxStartups" past its MaxStartups limit, so holding a few unauthenticated TCP connections open
shows which limit the live process enforces.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest
import yaml

from tests.support.files import MIB, random_file, sha256
from tests.support.sshd import SSHD, SshServer
from tests.support.waiting import wait_until

ROLE = "multipush.sftp.sshd_tuning"
BIN = Path(sys.executable).parent
DROPIN = "00-multipush-sftp-tuning.conf"
SIGHUP_LINE = "Received SIGHUP; restarting."
# sshd's defaults, which the test servers start with unless a test says otherwise.
DEFAULTS = {"MaxStartups": None, "MaxSessions": None}


@dataclass
class TunableSshServer(SshServer):
    """SshServer whose config can include a drop-in directory, as Debian/Ubuntu do (at the top)."""

    include: bool = True
    head_lines: tuple = ()

    @property
    def dropin_dir(self) -> Path:
        return self.workdir / "sshd_config.d"

    def config_lines(self) -> list[str]:
        lines = list(self.head_lines)
        if self.include:
            lines.append(f"Include {self.dropin_dir}/*.conf")
        return lines + super().config_lines()

    def prepare(self) -> None:
        self.dropin_dir.mkdir(parents=True, exist_ok=True)
        super().prepare()

    def config_tree(self) -> dict[str, bytes]:
        """Every byte of the configuration: the main file and the drop-in directory."""
        tree = {"sshd_config": self.config_file.read_bytes()}
        for path in sorted(self.dropin_dir.iterdir()):
            tree[f"sshd_config.d/{path.name}"] = path.read_bytes()
        return tree

    def reloads(self) -> int:
        return self.log_file.read_text(errors="replace").count(SIGHUP_LINE)

    def effective(self) -> dict[str, str]:
        """`sshd -T` of the configuration on disk (first value of each keyword)."""
        done = subprocess.run([SSHD, "-T", "-f", str(self.config_file)], capture_output=True, text=True, check=True)
        values: dict[str, str] = {}
        for line in done.stdout.splitlines():
            key, _sep, value = line.partition(" ")
            values.setdefault(key, value)
        return values


# ---------------------------------------------------------------------------------------- helpers


def probe_startups(server: SshServer, count: int, timeout: float = 5.0) -> list[str]:
    """Open `count` TCP connections and keep them all unauthenticated while reading sshd's first words.

    Each one holds a MaxStartups slot, so past the live daemon's limit sshd answers
    "Exceeded MaxStartups" (with start == full, every time) instead of its SSH banner.
    """
    sockets, answers = [], []
    try:
        for _attempt in range(count):
            sock = socket.create_connection((server.host, server.port), timeout=timeout)
            sockets.append(sock)
            data = b""
            deadline = time.monotonic() + timeout
            while b"\n" not in data and time.monotonic() < deadline:
                chunk = sock.recv(256)
                if not chunk:
                    break
                data += chunk
            answers.append("banner" if data.startswith(b"SSH-") else data.decode(errors="replace").strip() or "closed")
    finally:
        for sock in sockets:
            sock.close()
    # sshd frees the slots when the children of these connections have exited: wait for that, so
    # that the next connection of the test does not meet a full house.
    wait_until(lambda: probe_one(server) == "banner", what="sshd to free its MaxStartups slots")
    return answers


@contextlib.contextmanager
def unauthenticated_clients(server: SshServer, count: int):
    """Hold `count` connections open at the banner exchange, as clients in the middle of their
    handshakes would: each holds one of sshd's MaxStartups slots (until LoginGraceTime)."""
    sockets = []
    try:
        for _attempt in range(count):
            sock = socket.create_connection((server.host, server.port), timeout=5)
            sockets.append(sock)
            assert sock.recv(256).startswith(b"SSH-")
        yield
    finally:
        for sock in sockets:
            sock.close()


def probe_one(server: SshServer) -> str:
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        data = sock.recv(256)
    return "banner" if data.startswith(b"SSH-") else data.decode(errors="replace").strip() or "closed"


def connect(server: SshServer) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(str(server.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        server.host, port=server.port, username=server.user, key_filename=str(server.client_key),
        look_for_keys=False, allow_agent=False, timeout=10, banner_timeout=10, auth_timeout=10,
    )
    return client


def run_command(client: paramiko.SSHClient, command: str) -> str:
    _stdin, stdout, _stderr = client.exec_command(command, timeout=10)
    return stdout.read().decode()


def role_vars(server: TunableSshServer, **extra) -> dict:
    variables = {
        "sshd_tuning_config_file": str(server.config_file),
        "sshd_tuning_dropin_dir": str(server.dropin_dir),
        "sshd_tuning_pid_file": str(server.pid_file),
        "sshd_tuning_sshd_binary": SSHD,
        **extra,
    }
    return {key: value for key, value in variables.items() if value is not None}


def apply_role(register: str, variables: dict) -> list[dict]:
    """Tasks applying the role with these vars, then registering its sshd_tuning_result as `register`."""
    return [
        {"name": f"Apply the role ({register})", "ansible.builtin.include_role": {"name": ROLE}, "vars": variables},
        {"name": f"Capture the result ({register})", "ansible.builtin.debug": {"var": "sshd_tuning_result"},
         "register": register},
    ]


def tasks_yaml(*task_lists: list[dict]) -> str:
    return yaml.safe_dump([task for tasks in task_lists for task in tasks], sort_keys=False)


def explain(run) -> str:
    """The failure lines of a playbook run (the repr of PlaybookRun only shows its tail)."""
    lines = run.stdout.splitlines()
    failed = ("fatal:", "failed:", "ERROR", "[ERROR]")
    picked = [line for index, line in enumerate(lines)
              if line.startswith(failed) or (index and lines[index - 1].startswith("fatal:"))]
    return "\n".join(picked) + "\n" + run.stderr[-3000:] + "\n" + repr(run)


def failure_message(run) -> str:
    """The msg of the last failed task (an earlier one may have been rescued), whitespace folded."""
    for line in reversed(run.stdout.splitlines()):
        if line.startswith("fatal:") and "=> " in line:
            return " ".join(json.loads(line.split("=> ", 1)[1])["msg"].split())
    raise AssertionError("no failed task in the output:\n" + explain(run))


def changed_role_tasks(stdout: str, until: str | None = None) -> list[str]:
    """Names of the role's tasks and handlers that reported a change, from ansible-playbook's output
    (up to the task whose header contains `until`)."""
    changed, current = [], None
    for line in stdout.splitlines():
        header = re.match(r"(?:TASK|RUNNING HANDLER) \[(.*?)\]", line)
        if header:
            current = header.group(1)
            if until and until in current:
                break
        elif line.startswith("changed:") and current and current.startswith(ROLE):
            changed.append(current)
    return changed


# --------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def make_server(tmp_path: Path):
    servers: list[TunableSshServer] = []

    def make(name: str = "tuned", **kwargs) -> TunableSshServer:
        kwargs.setdefault("options", dict(DEFAULTS))
        server = TunableSshServer(workdir=tmp_path / name, **kwargs)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def tune(run_play, ansible_env: dict, tmp_path: Path):
    """Run tasks (tasks_yaml(...)) with Ansible connected to the sshd being tuned."""
    env = dict(ansible_env, ANSIBLE_PIPELINING="1")

    def run(server: TunableSshServer, tasks: str, extra_args: list[str] | None = None):
        inventory = server.write_inventory(tmp_path / f"inventory-{server.workdir.name}.ini")
        return run_play(tasks, inventory=inventory, env=env, extra_args=extra_args)

    run.run_play = run_play
    return run


# ------------------------------------------------------------------------------------------ tests


def test_playbook_dropin_layout_reloads_live_sshd_and_keeps_sessions(make_server, tune, ansible_env, tmp_path):
    """Include layout via playbooks/sshd_tuning.yml: drop-in written, sshd reloaded (not restarted),
    a session opened before the reload still works, the live daemon enforces the new MaxStartups;
    a second run changes nothing."""
    # MaxStartups 2 above the Include: sshd keeps the LAST MaxStartups it reads (unlike most keywords),
    # so the drop-in's value wins and the role only notes that line.
    server = make_server(include=True, head_lines=("MaxStartups 2",))
    original_main = server.config_file.read_bytes()
    assert "Exceeded MaxStartups" in probe_startups(server, 4), "baseline: MaxStartups 2 should drop the 3rd"

    before = connect(server)
    channel = before.get_transport().open_session()
    channel.exec_command("cat")
    channel.sendall(b"before reload\n")
    assert wait_until(channel.recv_ready, what="echo before reload")
    assert channel.recv(100) == b"before reload\n"

    extra = tmp_path / "vars.json"
    extra.write_text(json.dumps(role_vars(server, sshd_tuning_become=False)))
    inventory = server.write_inventory(tmp_path / "inventory-playbook.ini")
    env = dict(ansible_env, ANSIBLE_PIPELINING="1")
    done = subprocess.run(
        [str(BIN / "ansible-playbook"), "multipush.sftp.sshd_tuning", "-i", str(inventory), "-e", f"@{extra}"],
        env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "maxstartups 100:30:200" in done.stdout  # the report of the effective values

    dropin = server.dropin_dir / DROPIN
    assert dropin.read_text().splitlines()[-2:] == ["MaxStartups 100:30:200", "MaxSessions 64"]
    assert server.config_file.read_bytes() == original_main
    effective = server.effective()
    assert (effective["maxstartups"], effective["maxsessions"]) == ("100:30:200", "64")

    # Reloaded once (SIGHUP: sshd re-executes in place; the pid stays), and listening again.
    assert server.reloads() == 1
    assert server.process.poll() is None
    server.wait_ready(10)
    # The session opened before the reload lives on, on the same connection.
    channel.sendall(b"after reload\n")
    assert wait_until(channel.recv_ready, what="echo after reload")
    assert channel.recv(100) == b"after reload\n"
    assert run_command(before, "echo same connection") == "same connection\n"
    before.close()
    # New connections work, and the live daemon now allows more than 2 unauthenticated connections.
    after = connect(server)
    assert run_command(after, "echo new connection") == "new connection\n"
    after.close()
    assert probe_startups(server, 8) == ["banner"] * 8

    # Second run (through include_role): no change, no reload, same effective values.
    tree = server.config_tree()
    run = tune(server, tasks_yaml(apply_role("again", role_vars(server))))
    assert run.rc == 0, explain(run)
    assert changed_role_tasks(run.stdout) == []
    result = run["again"]["sshd_tuning_result"]
    assert result["changed"] is False and result["layout"] == "dropin" and result["file"] == str(dropin)
    assert result["effective"]["maxstartups"] == "100:30:200" and result["effective"]["maxsessions"] == "64"
    # The MaxStartups line of the main file is ignored by sshd (ours is read last): reported, not failed.
    assert [hit["text"] for hit in result["ignored_lines"]] == ["MaxStartups 2"]
    assert server.config_tree() == tree
    assert server.reloads() == 1


def test_main_layout_planned_load_then_absent_restores(make_server, tune):
    """No Include: the block goes to the top of the main file; MaxStartups computed from the planned
    load; re-applying changes nothing; state absent restores the main file byte for byte. No pid
    file given and no service manager here: the role signals the PidFile that sshd -T reports."""
    server = make_server(include=False)
    original = server.config_tree()
    planned = role_vars(
        server,
        sshd_tuning_pid_file=None,
        sshd_tuning_planned_connections=16,
        sshd_tuning_planned_concurrent_files=2,
        sshd_tuning_planned_forks=4,
        sshd_tuning_planned_headroom_percent=50,
        sshd_tuning_login_grace_time="45s",
    )
    run = tune(server, tasks_yaml(apply_role("tuned", planned)))
    assert run.rc == 0, explain(run)
    # 16 x 2 x 4 = 128 connections, + 50 % = 192; full at twice that.
    lines = server.config_file.read_text().splitlines()
    assert lines[:5] == [
        "# BEGIN multipush.sftp.sshd_tuning managed block",
        "MaxStartups 192:30:384",
        "MaxSessions 64",
        "LoginGraceTime 45s",
        "# END multipush.sftp.sshd_tuning managed block",
    ]
    assert server.config_file.read_bytes().endswith(original["sshd_config"])
    assert not (server.dropin_dir / DROPIN).exists()
    effective = server.effective()
    assert (effective["maxstartups"], effective["maxsessions"]) == ("192:30:384", "64")
    assert effective["logingracetime"] == "45"
    result = run["tuned"]["sshd_tuning_result"]
    assert result["changed"] is True and result["layout"] == "main" and result["file"] == str(server.config_file)
    assert result["reload_method"] == "pid_file"
    assert result["effective"] == {"maxstartups": "192:30:384", "maxsessions": "64", "logingracetime": "45",
                                   "persourcemaxstartups": "none"}
    assert server.reloads() == 1
    server.wait_ready(10)
    assert probe_startups(server, 12) == ["banner"] * 12  # sshd's default would drop some past 10

    # Again (no change, no reload), then state absent, in one play.
    run = tune(server, tasks_yaml(apply_role("again", planned),
                                  apply_role("untuned", role_vars(server, sshd_tuning_state="absent"))))
    assert run.rc == 0, explain(run)
    assert changed_role_tasks(run.stdout, until="Capture the result (again)") == []
    assert run["again"]["sshd_tuning_result"]["changed"] is False
    assert run["untuned"]["sshd_tuning_result"]["changed"] is True
    assert server.config_tree() == original
    assert server.effective()["maxstartups"] == "10:30:100"
    assert run["untuned"]["sshd_tuning_result"]["effective"]["maxstartups"] == "10:30:100"
    assert server.reloads() == 2
    client = connect(server)
    assert run_command(client, "echo ok") == "ok\n"
    client.close()


def test_check_mode_changes_nothing(make_server, tune):
    server = make_server(include=True)
    original = server.config_tree()
    run = tune(server, tasks_yaml(apply_role("tuned", role_vars(server))), extra_args=["--check", "--diff"])
    assert run.rc == 0, explain(run)
    assert "+MaxStartups 100:30:200" in run.stdout  # the diff of the drop-in file
    result = run["tuned"]["sshd_tuning_result"]
    assert result["changed"] is True
    assert result["planned"]["maxstartups"] == "100:30:200"
    assert result["effective"]["maxstartups"] == "10:30:100"
    assert server.config_tree() == original
    assert server.reloads() == 0


@pytest.mark.parametrize(
    ("include", "settings", "complaint"),
    [
        (True, {"sshd_tuning_max_startups": "200:30:100"}, "Invalid MaxStartups spec"),
        (False, {"sshd_tuning_extra_options": {"NoSuchKeyword": "yes"}}, "Bad configuration option: NoSuchKeyword"),
    ],
    ids=["dropin-bad-maxstartups", "main-unknown-keyword"],
)
def test_invalid_value_is_rejected_and_nothing_changes(make_server, tune, include, settings, complaint):
    server = make_server(include=include)
    original = server.config_tree()
    run = tune(server, tasks_yaml(apply_role("tuned", role_vars(server, **settings))))
    assert run.rc != 0, explain(run)
    message = failure_message(run)
    assert "sshd rejects the configuration this role would install" in message, explain(run)
    assert complaint in message
    assert "Nothing was changed" in message
    assert server.config_tree() == original
    assert server.reloads() == 0
    assert server.process.poll() is None
    client = connect(server)
    assert run_command(client, "echo still reachable") == "still reachable\n"
    client.close()


def test_failed_install_check_puts_the_previous_files_back(make_server, tune, tmp_path):
    """The safety net: should the installed files fail `sshd -t` although the staged ones passed
    (someone edited them meanwhile), the previous texts go back and sshd is not reloaded. Simulated
    with an sshd wrapper that answers -T (the proof) but rejects -t (the check after installing)."""
    server = make_server(include=True)
    original = server.config_tree()
    wrapper = tmp_path / "sshd-rejecting-t"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for arg in "$@"; do [ "$arg" = -t ] && { echo "simulated: changed underneath" >&2; exit 255; }; done\n'
        f'exec {SSHD} "$@"\n'
    )
    wrapper.chmod(0o755)
    run = tune(server, tasks_yaml(apply_role("tuned", role_vars(server, sshd_tuning_sshd_binary=str(wrapper)))))
    assert run.rc != 0, explain(run)
    message = failure_message(run)
    assert "the previous files were put back and sshd was not reloaded" in message, explain(run)
    assert "simulated: changed underneath" in message
    assert server.config_tree() == original
    assert server.reloads() == 0
    client = connect(server)
    assert run_command(client, "echo ok") == "ok\n"
    client.close()


def test_competing_settings_fail_then_fix_then_absent_restores(make_server, tune):
    """Settings that would win over ours (MaxStartups, last-wins, later in the main file; MaxSessions,
    first-wins, in a drop-in read before ours): the role fails and changes nothing; with
    conflicts=fix it comments them out (not inside Match blocks); absent puts them back."""
    server = make_server(include=True, options={"MaxStartups": "10:30:100", "MaxSessions": None})
    main_line = server.config_file.read_text().splitlines().index("MaxStartups 10:30:100") + 1
    early = server.dropin_dir / "00-early.conf"
    early.write_text("# site settings\nMaxSessions 10\nMatch User nobody\n  MaxSessions 2\n")
    original = server.config_tree()

    run = tune(server, tasks_yaml(apply_role("tuned", role_vars(server))))
    assert run.rc != 0, explain(run)
    message = failure_message(run)
    assert "sshd would not use the tuned value of maxstartups, maxsessions" in message, explain(run)
    assert "maxstartups would be 10:30:100 instead of 100:30:200" in message
    assert f"{server.config_file}:{main_line}: MaxStartups 10:30:100" in message
    assert f"{early}:2: MaxSessions 10" in message
    assert "MaxSessions 2" not in message  # inside a Match block: not a competitor
    assert "sshd_tuning_conflicts: fix" in message and "Nothing was changed" in message
    assert server.config_tree() == original
    assert server.reloads() == 0

    read_back = [
        {"name": "Read the fixed main file", "ansible.builtin.slurp": {"src": str(server.config_file)},
         "register": "main"},
        {"name": "Read the fixed drop-in", "ansible.builtin.slurp": {"src": str(early)}, "register": "early"},
    ]
    run = tune(server, tasks_yaml(apply_role("fixed", role_vars(server, sshd_tuning_conflicts="fix")), read_back,
                                  apply_role("untuned", role_vars(server, sshd_tuning_state="absent"))))
    assert run.rc == 0, explain(run)
    result = run["fixed"]["sshd_tuning_result"]
    assert result["effective"]["maxstartups"] == "100:30:200" and result["effective"]["maxsessions"] == "64"
    prefix = "#multipush.sftp.sshd_tuning-disabled# "
    main = base64.b64decode(run["main"]["content"]).decode()
    assert main.splitlines()[main_line - 1] == prefix + "MaxStartups 10:30:100"
    fixed = base64.b64decode(run["early"]["content"]).decode()
    # Global settings are commented out; the one inside the Match block is left alone.
    assert fixed == f"# site settings\n{prefix}MaxSessions 10\nMatch User nobody\n  MaxSessions 2\n"
    assert run["untuned"]["sshd_tuning_result"]["changed"] is True
    assert server.config_tree() == original
    assert server.reloads() == 2
    server.wait_ready(10)


# ----------------------------------------------------------------------------- end to end with push

PUSH_HOSTS = 2  # inventory aliases of one sshd: that many Ansible forks push to it at the same time
PUSH_CONNECTIONS = 16
# Other clients in the middle of their handshakes while the pushes run. With them, sshd's default
# start of 10 is crossed as soon as 3 handshakes of the pushes overlap, whatever the machine's speed,
# so the drops below do not depend on timing.
OTHER_CLIENTS = 8


def push_tasks(source: Path, dest_dir: Path, register: str) -> list[dict]:
    """Every host pushes with 16 connections and no handshake throttle below them; the results of all
    hosts are gathered under `register` (a list, one per host)."""
    return [
        {
            "name": f"Push with {PUSH_CONNECTIONS} connections ({register})",
            "multipush.sftp.push": {
                "src": str(source), "dest": f"{dest_dir}/{register}-{{{{ inventory_hostname }}}}.bin",
                "connections": PUSH_CONNECTIONS, "max_concurrent_handshakes": PUSH_CONNECTIONS,
                "chunk_size": "256K", "verify": "size", "retries": 10, "retry_delay": 0.2,
            },
            "register": f"{register}_one",
        },
        {
            "name": f"Gather the push results ({register})",
            "ansible.builtin.debug": {
                "msg": f"{{{{ ansible_play_hosts | map('extract', hostvars, '{register}_one') | list }}}}"},
            "run_once": True,
            "register": register,
        },
    ]


@pytest.mark.slow
def test_push_drops_handshakes_at_default_maxstartups_and_not_after_tuning(make_server, tune, tmp_path, ansible_env):
    """2 forks x 16 connections, with 8 other clients mid-handshake, against sshd's default MaxStartups
    (10:30:100): sshd drops handshakes and the pushes survive through their retries. After the role,
    the same pushes open every connection on its first handshake."""
    server = make_server(include=True)
    source = random_file(tmp_path / "src" / "big.bin", 4 * MIB)
    dest_dir = tmp_path / "dst"
    inventory = tmp_path / "inventory-forks.ini"
    inventory.write_text("[targets]\n" + "".join(server.inventory_line(f"fork{n}") + "\n" for n in range(PUSH_HOSTS)))
    # One sshd: tune it once (through the first alias), and let every host register that result.
    tune_once = apply_role("tuned", role_vars(server))
    tune_once[0]["when"] = "inventory_hostname == 'fork0'"
    tune_once[1] = {"name": "Capture the result", "run_once": True, "register": "tuned",
                    "ansible.builtin.debug": {"msg": "{{ hostvars['fork0'].sshd_tuning_result }}"}}
    tasks = tasks_yaml(push_tasks(source, dest_dir, "before"), tune_once, push_tasks(source, dest_dir, "after"))
    with unauthenticated_clients(server, OTHER_CLIENTS):
        run = tune.run_play(tasks, inventory=inventory, env=dict(ansible_env, ANSIBLE_PIPELINING="1"),
                            extra_args=["--forks", str(PUSH_HOSTS)])
    assert run.rc == 0, explain(run)
    log_before, _line, log_after = server.log_file.read_text(errors="replace").partition(SIGHUP_LINE)
    before, after = run["before"]["msg"], run["after"]["msg"]
    assert len(before) == len(after) == PUSH_HOSTS

    # The server's log is the ground truth for handshakes: the push result only counts the connections
    # that became ready while there was still work, so a small push under-reports its handshake retries.
    # Default MaxStartups: sshd dropped handshakes; the pushes retried them and still delivered, and
    # every worker connected in the end.
    assert log_before.count("past MaxStartups") > 0
    assert log_before.count("Accepted publickey") >= PUSH_HOSTS * PUSH_CONNECTIONS
    assert all(not result["failed"] and result["files_sent"] == 1 for result in before), before
    for n in range(PUSH_HOSTS):
        assert sha256(dest_dir / f"before-fork{n}.bin") == sha256(source)

    assert run["tuned"]["msg"]["effective"]["maxstartups"] == "100:30:200"
    # Tuned: the same pushes, and not one handshake dropped: every connection got through at once.
    assert "past MaxStartups" not in log_after
    assert log_after.count("Accepted publickey") >= PUSH_HOSTS * PUSH_CONNECTIONS
    assert [result["handshake_retries"] for result in after] == [0] * PUSH_HOSTS, after
    for n in range(PUSH_HOSTS):
        assert sha256(dest_dir / f"after-fork{n}.bin") == sha256(source)
