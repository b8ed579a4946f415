"""A fleet of "hosts" on loopback behind one capped uplink, for the fan-out tests and benchmark (issue 22).

Host i (0-based) is an OpenSSH server listening on 127.0.0.(i+2), with its own host key and its own
destination directory; every server authorizes one shared client key. The controller reaches host i only
through relay i (127.0.0.1:<relay port> -> 127.0.0.(i+2):<sshd port>, tests/support/relay.py), and every
relay's upward direction is the same Link: the controller's uplink, one rate cap for all hosts together
(e.g. 50 MB/s) and a one-way delay of rtt/2. Hosts reach each other directly at 127.0.0.(i+2):<sshd port>
(their `multipush_peer_address`), outside the relays, as hosts of one site do.

    with Fleet(tmp_path / "fleet", hosts=8, uplink_rate=30e6, rtt_ms=20) as fleet:
        inventory = fleet.write_inventory(tmp_path / "inventory.ini")
        ...ansible-playbook -i inventory ... `dest: "{{ fleet_dest }}"`...
        fleet.uplink_bytes()          # bytes the controller sent through all relays (read by the relays)
        fleet.uplink.meter.max_window(5.0)   # the most in any 5 s; fleet.relays()[i].meter_up per host
        fleet.clear_dests()

Everything is bounded: stop() (or leaving the `with` block) stops every relay (joins its threads with a
timeout) and every sshd (terminate, then kill after 10 s); a half-started fleet is stopped as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.relay import Link, Relay
from tests.support.sshd import SshServer, free_port, generate_key

DEFAULT_BACKLOG = 0.1  # seconds of data the uplink buffers before the relays stop reading (a router's queue)


@dataclass
class FleetServer(SshServer):
    """An sshd of the fleet: its own host key, the fleet's client key (authorized, not generated here)."""

    shared_client_key: Path | None = None

    @property
    def client_key(self) -> Path:
        return self.shared_client_key if self.shared_client_key is not None else self.workdir / "id_ed25519"


@dataclass
class Proc:
    """A process found under a host's sshd (see FleetHost.processes)."""

    pid: int
    ppid: int
    argv: list[str]

    @property
    def cmdline(self) -> str:
        return " ".join(self.argv)


@dataclass
class FleetHost:
    name: str
    index: int
    server: FleetServer
    relay: Relay | None = None
    dest_root: Path = field(default_factory=Path)

    @property
    def address(self) -> str:
        """Where the host's sshd listens (127.0.0.(index+2)); peers connect here directly."""
        return self.server.host

    @property
    def peer_address(self) -> str:
        return f"{self.server.host}:{self.server.port}"

    @property
    def dest(self) -> Path:
        """The host's destination for the pushed tree (its `fleet_dest` host variable)."""
        return self.dest_root / "vpod"

    def processes(self) -> list[Proc]:
        """Every live process below this host's sshd (sessions, what they started, their children)."""
        if self.server.process is None:
            return []
        table = _process_table()
        found, todo = [], [self.server.process.pid]
        while todo and len(found) < 10000:
            parent = todo.pop()
            for proc in table.get(parent, []):
                found.append(proc)
                todo.append(proc.pid)
        return found

    def temp_bytes(self) -> int:
        """Bytes written so far into the push's temp files under this host's destination: the blocks
        allocated, not the size (a temp may be made at its full size, sparse, before any data arrives)."""
        total = 0
        if self.dest_root.exists():
            for path in self.dest_root.rglob("*.multipush.tmp"):
                with contextlib.suppress(OSError):
                    info = path.stat()
                    total += min(info.st_size, info.st_blocks * 512)
        return total

    def ports(self) -> set[int]:
        """Its sshd's port and its relay's: what names this host in a known_hosts file or a command line."""
        return {self.server.port} | ({self.relay.port} if self.relay else set())


def _process_table() -> dict[int, list[Proc]]:
    """ppid -> its children, from /proc."""
    table: dict[int, list[Proc]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        proc = Proc(int(entry.name), int(fields[1]), [arg.decode(errors="replace") for arg in argv if arg])
        table.setdefault(proc.ppid, []).append(proc)
    return table


class Fleet:
    """N sshd "hosts" on 127.0.0.2.. 127.0.0.(N+1), one relay each, all relays sharing one capped uplink.

    uplink_rate: bytes/s for all the controller's upload together (None: no cap); rtt_ms: the round trip
    through every relay (the hosts among themselves: loopback); max_backlog: seconds of data the uplink
    queues before the relays stop reading (backpressure). sshd_options: extra sshd_config lines for every
    host. dest_dir: where the hosts' destinations go (default workdir/dest), dest_dir/<host name>/vpod.
    """

    def __init__(self, workdir: Path, hosts: int, uplink_rate: float | None = 50e6, rtt_ms: float = 20.0,
                 max_backlog: float | None = DEFAULT_BACKLOG, name_prefix: str = "host",
                 sshd_options: dict | None = None, dest_dir: Path | None = None, first_address: int = 2,
                 known_hosts_peers: bool = False):
        if not 1 <= hosts <= 250 - first_address:
            raise ValueError(f"hosts must be between 1 and {250 - first_address}")
        self.workdir = Path(workdir)
        self.count = hosts
        self.rtt_ms = rtt_ms
        self.uplink = Link(rtt_ms / 2000.0, uplink_rate, max_backlog=max_backlog if uplink_rate else None)
        self.dest_dir = Path(dest_dir) if dest_dir else self.workdir / "dest"
        self.client_key = self.workdir / "id_ed25519"
        # every host under [127.0.0.1]:<its relay port>, the only name the controller knows it by;
        # known_hosts_peers: also under [127.0.0.x]:<sshd port>, its peer address
        self.known_hosts = self.workdir / "known_hosts"
        self.known_hosts_peers = known_hosts_peers
        self.hosts: list[FleetHost] = []
        width = max(2, len(str(hosts)))
        for index in range(hosts):
            name = f"{name_prefix}{index + 1:0{width}d}"
            server = FleetServer(workdir=self.workdir / name, host=f"127.0.0.{index + first_address}",
                                 options=dict(sshd_options or {}), shared_client_key=self.client_key)
            self.hosts.append(FleetHost(name, index, server, dest_root=self.dest_dir / name))
        self._started = False

    # -- life cycle -----------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> "Fleet":
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.workdir, 0o700)
            if not self.client_key.exists():
                generate_key(self.client_key)
            for host in self.hosts:
                host.server.port = free_port(host.server.host)
                host.server.start(timeout=timeout)
                host.dest_root.mkdir(parents=True, exist_ok=True)
                host.relay = Relay((host.server.host, host.server.port), rtt_ms=self.rtt_ms, uplink=self.uplink).start()
            lines = [host.relay.known_hosts_line(host.server.known_hosts_line()) for host in self.hosts]
            if self.known_hosts_peers:
                lines += [host.server.known_hosts_line() for host in self.hosts]
            self.known_hosts.write_text("".join(lines))
        except BaseException:
            self.stop()
            raise
        self._started = True
        return self

    def stop(self) -> None:
        for host in self.hosts:
            if host.relay is not None:
                with contextlib.suppress(Exception):
                    host.relay.stop()
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.server.stop()
        self._started = False

    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what the tests read --------------------------------------------------------------------------

    def __iter__(self):
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, key) -> FleetHost:
        if isinstance(key, str):
            for host in self.hosts:
                if host.name == key:
                    return host
            raise KeyError(key)
        return self.hosts[key]

    def mentions(self, path: Path, limit: int = 64 * 1024) -> bool:
        """Whether a file, or any small file under a directory, names a host of this fleet ("host:port" or
        "[host]:port"): to tell what this fleet's runs left in a shared /tmp from what others left."""
        needles = [f"{host.server.host}]:{host.server.port}".encode() for host in self.hosts]
        needles += [f"{host.server.host}:{host.server.port}".encode() for host in self.hosts]
        needles += [f"]:{host.relay.port} ".encode() for host in self.hosts if host.relay]
        files = [path] if path.is_file() else [entry for entry in path.rglob("*") if entry.is_file()]
        for entry in files[:100]:
            with contextlib.suppress(OSError):
                if entry.stat().st_size <= limit and any(needle in entry.read_bytes() for needle in needles):
                    return True
        return False

    def relays(self) -> list[Relay]:
        return [host.relay for host in self.hosts if host.relay is not None]

    def uplink_bytes(self) -> int:
        """Bytes the controller sent to all hosts so far (client -> server, as the relays read them)."""
        return sum(relay.bytes_up for relay in self.relays())

    def bytes_up(self) -> dict[str, int]:
        """Per host: bytes the controller sent to it through its relay so far."""
        return {host.name: host.relay.bytes_up for host in self.hosts if host.relay is not None}

    def stats(self) -> dict:
        """Per relay counters, and the uplink's total, average rate and most bytes in any 5 s."""
        return {"hosts": {host.name: host.relay.stats() for host in self.hosts if host.relay is not None},
                "uplink": {"bytes": self.uplink.meter.total, "rate": self.uplink.meter.rate(),
                           "max_5s": self.uplink.meter.max_window(5.0), "rate_cap": self.uplink.rate}}

    def reset_meters(self) -> None:
        """Start the time series (Meter) of the uplink and of every relay afresh (counters stay)."""
        self.uplink.meter.reset()
        for relay in self.relays():
            relay.meter_up.reset()
            relay.meter_down.reset()

    def clear_dests(self) -> None:
        """Empty every host's destination directory (the directory itself stays)."""
        for host in self.hosts:
            if host.dest_root.exists():
                shutil.rmtree(host.dest_root)
            host.dest_root.mkdir(parents=True, exist_ok=True)

    # -- inventory ------------------------------------------------------------------------------------

    def hostvars(self, host: FleetHost, **extra) -> dict:
        values = {
            "ansible_host": "127.0.0.1",
            "ansible_port": str(host.relay.port if host.relay else host.server.port),
            "ansible_user": host.server.user,
            "ansible_ssh_private_key_file": str(self.client_key),
            "ansible_ssh_common_args": f"'-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes"
                                       " -o IdentitiesOnly=yes'",
            "ansible_python_interpreter": os.environ.get("MULTIPUSH_TARGET_PYTHON", sys.executable),
            "multipush_peer_address": host.peer_address,
            "fleet_dest": str(host.dest),
        }
        values.update({key: str(value) for key, value in extra.items()})
        return values

    def write_inventory(self, path: Path, hosts: list[str] | int | None = None, group: str = "targets",
                        per_host: dict[str, dict] | None = None, **extra) -> Path:
        """An INI inventory of `hosts` (names, or the first N; default all) in `group`: each host at its
        relay (ansible_host=127.0.0.1, ansible_port=<relay port>), the fleet's key and known_hosts,
        multipush_peer_address=127.0.0.x:<sshd port>, fleet_dest=<its destination>. `per_host`: host
        name -> variables to add or override for that host; `extra`: for every host."""
        if hosts is None:
            chosen = self.hosts
        elif isinstance(hosts, int):
            chosen = self.hosts[:hosts]
        else:
            chosen = [self[name] for name in hosts]
        lines = [f"[{group}]"]
        for host in chosen:
            values = self.hostvars(host, **{**extra, **(per_host or {}).get(host.name, {})})
            lines.append(host.name + " " + " ".join(f"{key}={value}" for key, value in values.items()))
        path.write_text("\n".join(lines) + "\n")
        return path


# -- the pushed tree ---------------------------------------------------------------------------------------


def make_vpod(root: Path, image_size: int, small_files: int = 20, seed: int = 1) -> int:
    """A vPod-like tree under root: one incompressible disk image (os.urandom, so no compression on any
    path shrinks it) and `small_files` files of 0.1-40 KiB in a few directories; returns its bytes."""
    rng = random.Random(seed)
    image = root / "vms" / "esxi-01" / "esxi-01-flat.vmdk"
    image.parent.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as out:
        left = image_size
        while left > 0:
            take = min(1024 * 1024, left)
            out.write(os.urandom(take))
            left -= take
    total = image_size
    folders = ("vms/esxi-01", "vms/vcsa-01", "config", "config/network", "scripts")
    for number in range(small_files):
        size = int(100 * (40 * 1024 / 100) ** rng.random())
        path = root / folders[number % len(folders)] / f"file-{number:03d}.cfg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(rng.getrandbits(8) for _byte in range(size)))
        total += size
    return total


def tree_digests(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under root."""
    found = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and not path.is_symlink():
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1024 * 1024), b""):
                    digest.update(block)
            found[str(path.relative_to(root))] = digest.hexdigest()
    return found


def tree_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in Path(root).rglob("*") if path.is_file() and not path.is_symlink())
