"""`./dev demo`: push a generated vPod-like tree to a throwaway OpenSSH server on loopback.

What it does, start to finish:
  1. generates a tree in a temporary directory: one big disk image (512 MiB unless --size), a second
     image (64 MiB), about 50 small config/log files of 0.1-64 KiB in nested directories, empty dirs;
  2. starts a throwaway sshd on 127.0.0.1 with generated host and user keys (tests/support/sshd.py)
     and writes an Ansible inventory for it;
  3. runs the collection's playbook exactly as a user would:
        ansible-playbook multipush.sftp.push -i INVENTORY -e src=TREE/ -e dest=REMOTE -e result_dir=DIR
     and prints a table of the biggest files and the totals from the JSON result it writes;
  4. verifies the pushed tree byte for byte;
  5. runs the same push again, which must skip everything (changed false, 0 bytes sent);
  6. times a plain `scp -r` of the same tree to the same sshd for comparison;
  7. stops sshd and removes every temporary directory (also on Ctrl-C or failure).

Run it through `./dev demo` (which builds and installs the collection into build/collections first),
or directly with ANSIBLE_COLLECTIONS_PATH pointing at an installed copy of the collection.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.sshd import SshServer, throwaway_server  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
UNITS = {"": 1, "B": 1}
for _prefix, _factor in (("K", KiB), ("M", MiB), ("G", GiB)):
    UNITS.update({_prefix: _factor, _prefix + "B": _factor, _prefix + "IB": _factor})
HOST_NAME = "target"  # the inventory name SshServer.write_inventory gives the server


class DemoError(Exception):
    """A problem the demo reports in one line and exits non-zero for."""


# --- sizes ---------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'512M', '1G', '1.5GiB', '65536' -> bytes (binary units)."""
    value = text.strip().upper()
    number = value.rstrip("KMGIB")
    unit = value[len(number):]
    if unit not in UNITS or not number:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M, 1G, 1.5G)")
    try:
        size = int(float(number) * UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M, 1G, 1.5G)") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# --- the demo tree -------------------------------------------------------------------------------------


def write_disk_image(path: Path, size: int) -> None:
    """Random-looking content, fast: one random MiB, each copy stamped with its block number.

    Every MiB differs from every other, so a chunk written at the wrong offset cannot go unnoticed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    block = bytearray(os.urandom(MiB))
    with open(path, "wb") as out:
        written = 0
        number = 0
        while written < size:
            block[:16] = f"blk{number:013d}".encode()
            take = min(MiB, size - written)
            out.write(memoryview(block)[:take])
            written += take
            number += 1


def small_file_names(count: int) -> list[str]:
    """About `count` relative paths that look like a lab pod's VM configs, host configs, scripts and docs."""
    names = [
        "vpod.ovf",
        "vpod.mf",
        "README.txt",
        "vms/esxi-01/esxi-01.vmx",
        "vms/esxi-01/esxi-01.nvram",
        "vms/esxi-01/esxi-01.vmsd",
        "vms/esxi-01/esxi-01.vmdk",
        "vms/esxi-01/vmware.log",
        "vms/vcsa-01/vcsa-01.vmx",
        "vms/vcsa-01/vcsa-01.nvram",
        "vms/vcsa-01/vcsa-01.vmdk",
        "vms/vcsa-01/vmware.log",
        "config/a/b/c/d/deeply-nested.cfg",
    ]
    index = 1
    while len(names) < count:
        kind = index % 4
        if kind == 0:
            names.append(f"config/hosts/esxi-{index:02d}.json")
        elif kind == 1:
            names.append(f"config/network/vlan-{100 + index}.cfg")
        elif kind == 2:
            names.append(f"scripts/step-{index:02d}.sh")
        else:
            names.append(f"docs/lab-guide/module-{index:02d}.md")
        index += 1
    return names[:count]


def small_file_content(rng: random.Random, size: int) -> bytes:
    words = [b"vlan", b"portgroup", b"datastore", b"esxi", b"vcenter", b"uplink", b"mtu=9000", b"dhcp", b"10.0.0.1"]
    lines = []
    total = 0
    while total < size:
        line = b" ".join(rng.choices(words, k=rng.randint(3, 12))) + b"\n"
        lines.append(line)
        total += len(line)
    return b"".join(lines)[:size]


def make_tree(root: Path, big_size: int, second_size: int, small_files: int, seed: int = 1) -> dict:
    """Create the demo tree under root; return counts for the summary."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    write_disk_image(root / "vms" / "esxi-01" / "esxi-01-flat.vmdk", big_size)
    write_disk_image(root / "vms" / "vcsa-01" / "vcsa-01-flat.vmdk", second_size)
    total = big_size + second_size
    for name in small_file_names(small_files):
        # log-uniform between 100 B and 64 KiB: mostly small, a few near the top
        size = int(round(100 * (64 * KiB / 100) ** rng.random()))
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(small_file_content(rng, size))
        total += size
    for empty in ("logs", "vms/esxi-01/snapshots"):
        (root / empty).mkdir(parents=True, exist_ok=True)
    return {"files": 2 + small_files, "bytes": total}


# --- comparing trees -----------------------------------------------------------------------------------


def same_content(left: Path, right: Path) -> bool:
    with open(left, "rb") as a, open(right, "rb") as b:
        while True:
            chunk_a = a.read(4 * MiB)
            chunk_b = b.read(4 * MiB)
            if chunk_a != chunk_b:
                return False
            if not chunk_a:
                return True


def compare_trees(expected: Path, actual: Path) -> tuple[int, int, list[str]]:
    """Byte-for-byte comparison: (files compared, bytes compared, list of differences)."""
    problems: list[str] = []
    files = 0
    size = 0
    if not actual.is_dir():
        return 0, 0, [f"{actual} is not a directory"]
    for directory, dirnames, filenames in os.walk(expected):
        rel = Path(directory).relative_to(expected)
        other = actual / rel
        if not other.is_dir():
            problems.append(f"missing directory {rel}")
            dirnames[:] = []
            continue
        extra = set(os.listdir(other)) - set(dirnames) - set(filenames)
        problems.extend(f"unexpected {rel / name}" for name in sorted(extra))
        for name in sorted(filenames):
            source, copy = Path(directory) / name, other / name
            if not copy.is_file():
                problems.append(f"missing file {rel / name}")
            elif source.stat().st_size != copy.stat().st_size:
                problems.append(f"size differs: {rel / name} ({source.stat().st_size} != {copy.stat().st_size})")
            elif not same_content(source, copy):
                problems.append(f"content differs: {rel / name}")
            else:
                files += 1
                size += source.stat().st_size
    return files, size, problems


# --- running things ------------------------------------------------------------------------------------


def run_child(command: list[str], *, env: dict | None = None, cwd: Path | None = None, quiet: bool = False) -> int:
    """Run a command with the terminal attached; on Ctrl-C/SIGTERM stop it before cleaning up."""
    output = subprocess.DEVNULL if quiet else None
    child = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=output)
    try:
        return child.wait()
    except BaseException:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        raise


def collections_path() -> Path:
    for entry in os.environ.get("ANSIBLE_COLLECTIONS_PATH", "").split(os.pathsep):
        if entry and (Path(entry) / "ansible_collections" / "multipush" / "sftp").is_dir():
            return Path(entry)
    default = REPO / "build" / "collections" / "current"  # the newest install made by ./dev
    if (default / "ansible_collections" / "multipush" / "sftp").is_dir():
        return default
    raise DemoError("the collection is not installed: run ./dev demo (it installs it into build/collections)")


def push_command(inventory: Path, src: Path, dest: Path, result_dir: Path, extra: list[str]) -> list[str]:
    search = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    playbook = shutil.which("ansible-playbook", path=search)
    if not playbook:
        raise DemoError("ansible-playbook not found: run ./dev demo (it installs ansible-core into .venv)")
    return [
        playbook, "multipush.sftp.push",
        "-i", str(inventory),
        "-e", f"src={src}/",
        "-e", f"dest={dest}",
        "-e", f"result_dir={result_dir}",
        *extra,
    ]


def load_result(result_dir: Path) -> dict:
    path = result_dir / f"{HOST_NAME}.json"
    if not path.exists():
        raise DemoError(f"the playbook wrote no result file {path}")
    return json.loads(path.read_text())


def scp_command(server: SshServer, src: Path, dest: Path) -> list[str]:
    return [
        "scp", "-r", "-q", "-F", "/dev/null",
        "-o", "BatchMode=yes",
        "-o", f"UserKnownHostsFile={server.known_hosts}",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "IdentitiesOnly=yes",
        "-i", str(server.client_key),
        "-P", str(server.port),
        str(src), f"{server.user}@{server.host}:{dest}",
    ]


# --- printing ------------------------------------------------------------------------------------------


def mib_per_s(size: float, seconds: float) -> str:
    """A rate in the README's convention for figures meant to be read: MiB per second."""
    if not size or not seconds or seconds <= 0:
        return "-"
    rate = size / seconds / 1048576
    return f"{rate:.1f}" if rate >= 1 else f"{rate:.3f}"


def display_path(path: str, root: Path | None) -> str:
    if root is not None:
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            pass
    return path


def format_result_table(result: dict, root: Path | None = None, top: int = 10) -> str:
    """The `top` biggest files of a multipush.sftp.push result, then its totals."""
    files = sorted(result.get("files") or [], key=lambda item: item.get("size", 0), reverse=True)
    rows = [("path", "size", "status", "seconds", "MiB/s", "retries")]
    for item in files[:top]:
        seconds = item.get("seconds") or 0
        rows.append(
            (
                display_path(str(item.get("src", "?")), root),
                human(item.get("size", 0)),
                str(item.get("status", "?")),
                f"{seconds:.2f}",
                mib_per_s(item.get("bytes_sent", 0), seconds),
                str(item.get("retries", 0)),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for number, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    if len(files) > top:
        lines.append(f"... and {len(files) - top} smaller file(s)")
    lines.append("")
    lines.append(
        f"total: {len(files)} file(s), {result.get('files_sent', '?')} sent,"
        f" {result.get('files_skipped', '?')} skipped;"
        f" {human(result.get('bytes_sent', 0))} ({result.get('bytes_sent', 0)} bytes) in {result.get('seconds', 0)} s"
        f" = {mib_per_s(result.get('bytes_sent', 0), result.get('seconds', 0))} MiB/s;"
        f" changed={str(result.get('changed')).lower()}"
    )
    lines.append("(MiB = 2^20 bytes; seconds per file overlap, since files and chunks move in parallel)")
    return "\n".join(lines)


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


# --- main ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./dev demo", description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--size", type=parse_size, default=512 * MiB, help="size of the big disk image (default 512M)")
    parser.add_argument("--second-size", type=parse_size, default=64 * MiB,
                        help="size of the second image (default 64M)")
    parser.add_argument("--small-files", type=int, default=50, help="number of small files (default 50)")
    parser.add_argument("--connections", type=int, help="SSH connections per push (default: the module's default)")
    parser.add_argument("--no-scp", action="store_true", help="skip the scp -r comparison")
    parser.add_argument("--tmpdir", type=Path,
                        help="where to create the temporary directory (default: $TMPDIR or /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (sshd is stopped anyway)")
    return parser.parse_args(argv)


def check_space(where: Path, needed: int) -> None:
    free = shutil.disk_usage(where).free
    if free < needed:
        raise DemoError(f"not enough space in {where}: the demo needs about {human(needed)}, {human(free)} free"
                        " (use --size, or --tmpdir on a bigger file system)")


def demo(args: argparse.Namespace, workdir: Path, server: SshServer) -> bool:
    """Run the demo; return True when everything checked out."""
    ok = True
    collections = collections_path()
    action = collections / "ansible_collections" / "multipush" / "sftp" / "plugins" / "action" / "push.py"
    if not action.exists():
        raise DemoError(f"the collection in {collections} has no push action yet ({action} is missing)")

    tree = workdir / "vpod"
    remote = workdir / "remote" / "vpod"
    banner(f"generating a vPod-like tree in {tree}")
    started = time.monotonic()
    made = make_tree(tree, args.size, args.second_size, args.small_files)
    print(f"{made['files']} files, {human(made['bytes'])} in {time.monotonic() - started:.1f} s"
          f" (biggest {human(args.size)}; 2 empty directories)")

    banner("starting a throwaway sshd on 127.0.0.1")
    server.start()
    inventory = server.write_inventory(workdir / "inventory.ini")
    print(f"sshd pid {server.process.pid} on {server.host}:{server.port}, user {server.user}; inventory {inventory}")

    env = dict(os.environ)
    env.update(
        {
            "ANSIBLE_COLLECTIONS_PATH": str(collections),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(workdir / "cp"),
            "ANSIBLE_HOST_KEY_CHECKING": "True",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_LOCAL_TEMP": str(workdir / "ansible-local"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    (workdir / "cp").mkdir()
    extra = ["-e", f"push_connections={args.connections}"] if args.connections else []

    runs = []
    for attempt in (1, 2):
        result_dir = workdir / f"result-{attempt}"
        result_dir.mkdir()
        command = push_command(inventory, tree, remote, result_dir, extra)
        banner(("first push: " if attempt == 1 else "second push (everything should be skipped): ")
               + " ".join(command[1:]))
        started = time.monotonic()
        rc = run_child(command, env=env, cwd=workdir)
        wall = time.monotonic() - started
        if rc != 0:
            raise DemoError(f"ansible-playbook exited with {rc} (push {attempt})")
        runs.append((load_result(result_dir), wall))

    first, first_wall = runs[0]
    banner(f"result of the first push (ansible-playbook took {first_wall:.1f} s wall clock, Ansible start-up included)")
    print(format_result_table(first, root=tree))

    banner("verifying the pushed tree byte for byte")
    files, size, problems = compare_trees(tree, remote)
    if problems:
        ok = False
        print(f"MISMATCH: {len(problems)} difference(s):")
        for problem in problems[:20]:
            print(f"  {problem}")
    else:
        print(f"identical: {files} files, {human(size)} ({size} bytes), same directories (empty ones included)")

    second, second_wall = runs[1]
    banner("second push")
    idempotent = second.get("changed") is False and second.get("bytes_sent") == 0 and second.get("files_sent") == 0
    print(f"changed={str(second.get('changed')).lower()}, {second.get('bytes_sent')} bytes sent,"
          f" {second.get('files_skipped')} file(s) skipped, {second.get('files_sent')} sent;"
          f" {second_wall:.1f} s wall clock")
    if idempotent:
        print("it skipped everything, as it should")
    else:
        ok = False
        print("UNEXPECTED: the second push was not a no-op")

    banner("comparison with a plain scp -r to the same sshd")
    if args.no_scp:
        print("skipped (--no-scp)")
    else:
        scp_dest = workdir / "remote" / "scp-copy"
        command = scp_command(server, tree, scp_dest)
        print(" ".join(command))
        started = time.monotonic()
        rc = run_child(command)
        scp_seconds = time.monotonic() - started
        if rc != 0:
            ok = False
            print(f"scp failed with exit code {rc}")
        else:
            scp_problems = compare_trees(tree, scp_dest)[2]
            shutil.rmtree(scp_dest, ignore_errors=True)
            push_seconds = float(first.get("seconds") or 0)
            rows = [
                ("multipush.sftp.push, transfer (its own 'seconds')", push_seconds, made["bytes"]),
                ("multipush.sftp.push, whole ansible-playbook run", first_wall, made["bytes"]),
                ("scp -r", scp_seconds, made["bytes"]),
            ]
            width = max(len(row[0]) for row in rows)
            for label, seconds, size in rows:
                print(f"{label.ljust(width)}  {seconds:7.2f} s  {mib_per_s(size, seconds):>7} MiB/s")
            if push_seconds > 0 and scp_seconds > 0:
                if scp_seconds >= push_seconds:
                    print(f"the push moved the tree {scp_seconds / push_seconds:.2f}x as fast as scp -r"
                          f" ({scp_seconds / first_wall:.2f}x counting Ansible's start-up)")
                else:
                    print(f"scp -r was {push_seconds / scp_seconds:.2f}x as fast as the push here")
                print(f"(loopback on {os.cpu_count()} CPU(s): sshd and the client encrypt on the same cores,"
                      " so this shows CPU cost, not what several connections gain on a long fat network)")
            print("scp copy verified identical" if not scp_problems else f"scp copy differs: {scp_problems[:3]}")
    return ok


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = args.tmpdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    tree_bytes = args.size + args.second_size + args.small_files * 64 * KiB
    # source, the pushed copy and the scp copy exist at the same time
    signal.signal(signal.SIGTERM, _interrupted)
    workdir = Path(tempfile.mkdtemp(prefix="multipush-demo-", dir=base))
    server = throwaway_server()
    try:
        check_space(workdir, tree_bytes * (2 if args.no_scp else 3) + 64 * MiB)
        ok = demo(args, workdir, server)
        banner("done: " + ("everything checked out" if ok else "SOME CHECKS FAILED (see above)"))
        return 0 if ok else 1
    except DemoError as error:
        print(f"\ndemo: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
