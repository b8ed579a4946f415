"""Benchmark of fleet fan-out (issue 22): `fanout: true` against the controller-only push, behind one uplink.

Run it with `./dev bench-fanout [options]` (see tests/bench/README.md, "Fan-out"). For each fleet size
(`--hosts`, default 8 and 16) it starts a fleet on loopback (tests/support/fleet.py): host i is an sshd on
127.0.0.(i+2), reached by the controller only through relay i, and every relay's upload is the same link,
the controller's uplink (`--uplink`, 50 MB/s for all hosts together, `--rtt` 20 ms); hosts reach each other
directly at their `multipush_peer_address`. Both arms push the same vPod tree (one `--image` image, 200 MiB,
and `--small-files` small files) to every host with the same forks, interleaved in each repetition:

- `controller`: multipush.sftp.push with `fanout: false` and every other option at its default;
- `fanout`: the same with `fanout: true`.

Each run is the whole `ansible-playbook` command, timed; afterwards every copy is compared with the source
(sha256 of every file) and the destinations are emptied. Reported per arm: the median seconds, the speedup
(controller / fan-out), the bytes the uplink carried in copies of the tree (the relays' counts), how many
hosts peers fed (each result's `source`) and whether every copy was verified.

Then the bandwidth limits, measured against the relays' byte counts: `bandwidth_limit` on one host
(`--host-limit`, 20M) and `total_bandwidth_limit` on `--total-hosts` hosts (4, `--total-limit` 40M), both
controller-only: the most bytes in any 5 s divided by limit x 5, and the average rate over the transfer
divided by the limit (the limit as the result reports it, in bytes/s).

Writes RESULTS.md and results.json into `--out` (default tests/bench/results/fanout) and prints the report.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for entry in (str(REPO), str(Path(__file__).resolve().parent)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

from bench import BIN, BenchError, collections_path, machine_cpu_seconds, machine_description, run_measured  # noqa: E402
from process_cpu import report_lines, unavailable as accounting_unavailable  # noqa: E402
from tests.support.demo import parse_size  # noqa: E402
from tests.support.fleet import Fleet, make_vpod, tree_bytes  # noqa: E402
from tests.support.sshd import sftp_server_path  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
ARMS = ("controller", "fanout")
TARGETS = {8: 2.5, 16: 3.5}  # the speedups for fan-out over the controller-only push
RUN_TIMEOUT = 1800.0
QUICK = {"hosts": [4], "reps": 1, "image": 16 * MiB, "small_files": 10, "forks": ["hosts"], "host_limit": "2M",
         "total_limit": "4M", "total_hosts": 2, "limit_image": 16 * MiB}


def log(message: str) -> None:
    print(f"[bench-fanout {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- one run ---------------------------------------------------------------------------------------------

PLAYBOOK = textwrap.dedent("""\
    - name: Push the vPod to every host of the fleet
      hosts: fleet
      gather_facts: false
      tasks:
        - name: Push
          multipush.sftp.push:
            src: "{{ bench_src }}/"
            dest: "{{ fleet_dest }}"
            fanout: "{{ bench_fanout | bool }}"
            bandwidth_limit: "{{ bench_host_limit | default(omit) }}"
            total_bandwidth_limit: "{{ bench_total_limit | default(omit) }}"
            result_file: "{{ bench_results }}/{{ inventory_hostname }}.json"
    """)


def digests(root: Path) -> dict[str, str]:
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                found[str(path.relative_to(root))] = hashlib.file_digest(handle, "sha256").hexdigest()
    return found


class FleetBench:
    def __init__(self, args: argparse.Namespace, workdir: Path, source: Path, size: int):
        self.args = args
        self.workdir = workdir
        self.source = source
        self.size = size
        self.source_digests = digests(source)
        self.playbook = workdir / "fanout-bench.yml"
        self.playbook.write_text(PLAYBOOK)
        self.env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=args.collections, ANSIBLE_HOST_KEY_CHECKING="True",
                        ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_DEPRECATION_WARNINGS="0",
                        ANSIBLE_LOCAL_TEMP=str(workdir / "ansible-local"),
                        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        self.number = 0

    def run(self, fleet: Fleet, hosts: list[str], arm: str, forks: int, extra: dict | None = None,
            verify: bool = True) -> dict:
        """One timed ansible-playbook run; then the checks; the destinations emptied."""
        self.number += 1
        results = self.workdir / f"results-{self.number}"
        results.mkdir()
        inventory = fleet.write_inventory(self.workdir / f"inventory-{self.number}.ini", hosts=hosts, group="fleet")
        variables = {"bench_src": str(self.source), "bench_fanout": arm == "fanout", "bench_results": str(results),
                     **(extra or {})}
        fleet.clear_dests()
        os.sync()
        before = fleet.bytes_up()
        fleet.reset_meters()
        load = os.getloadavg()[0]
        cpu = machine_cpu_seconds()
        command = [str(BIN / "ansible-playbook"), "-i", str(inventory), "-f", str(forks),
                   "-e", json.dumps(variables), str(self.playbook)]
        measured = run_measured(command, env=self.env, cwd=self.workdir, timeout=self.args.timeout,
                                accounting=self.workdir if self.args.process_cpu else None)
        after = fleet.bytes_up()
        uplink = sum(after[name] - before[name] for name in hosts)
        found = {}
        for name in hosts:
            with contextlib.suppress(OSError, ValueError):
                found[name] = json.loads((results / f"{name}.json").read_text())
        failed = {name: (found.get(name) or {}).get("msg", "no result") for name in hosts
                  if not found.get(name) or found[name].get("failed") or found[name].get("unreachable")}
        sources = {name: found.get(name, {}).get("source") for name in hosts}
        wrong = []
        if verify:
            for name in hosts:
                if digests(fleet[name].dest) != self.source_digests:
                    wrong.append(name)
        run = {
            "arm": arm, "hosts": len(hosts), "forks": forks, "seconds": round(measured["seconds"], 2),
            "rc": measured["rc"], "timed_out": measured["timed_out"], "uplink_bytes": uplink,
            "uplink_copies": round(uplink / self.size, 3),
            "fed_by_peers": sum(1 for source in sources.values() if source not in (None, "controller")),
            "sources": sources, "failed": failed, "not_identical": wrong,
            "verified": verify and not wrong and not failed,
            "uplink_max_5s_rate": round(fleet.uplink.meter.max_window(5.0) / 5.0),
            "uplink_avg_rate": round(fleet.uplink.meter.rate() or 0),
            "machine_cpu_s": round(measured["machine_cpu_end"] - cpu, 1), "load_before": round(load, 2),
            "warnings": sorted({str(w) for result in found.values() for w in (result.get("warnings") or [])})[:10],
        }
        if "process_cpu" in measured:
            run["process_cpu"] = measured["process_cpu"]
        kept = ("source", "changed", "seconds", "connections", "round_trip_ms", "connections_reason", "fanout",
                "phases")
        run["per_host"] = {name: {key: result.get(key) for key in kept} for name, result in found.items()}
        run["ok"] = run["rc"] == 0 and not failed and (not verify or not wrong)
        if not run["ok"]:
            run["output_tail"] = measured["output"][-3000:]
        run["results"] = found
        fleet.clear_dests()
        shutil.rmtree(results, ignore_errors=True)
        return run


def limit_measure(bench: FleetBench, fleet: Fleet, hosts: list[str], option: str, limit: str) -> dict:
    """One controller-only run under a bandwidth limit, measured on the relays' meters."""
    key = "bench_host_limit" if option == "bandwidth_limit" else "bench_total_limit"
    run = bench.run(fleet, hosts, "controller", forks=len(hosts), extra={key: limit})
    meters = [fleet[name].relay.meter_up for name in hosts]
    if option == "bandwidth_limit":
        meter = meters[0]
        total, first, last = meter.total, meter.first, meter.last
        max5 = meter.max_window(5.0)
    else:
        meter = fleet.uplink.meter
        total, first, last = meter.total, meter.first, meter.last
        max5 = meter.max_window(5.0)
    reported = [(result.get("bandwidth_limit") or {}).get("host" if option == "bandwidth_limit" else "total")
                for result in run["results"].values()]
    rate = next((value for value in reported if value), None)
    duration = (last - first) if first is not None and last is not None else 0.0
    # the data phase: from the first to the last 0.1 s with at least a tenth of the limit (logins, the
    # survey and the final checks move a few KB before and after it)
    series = meter.series()
    busy = [index for index, (_start, size) in enumerate(series) if rate and size >= rate * meter.resolution / 10]
    data_bytes = sum(size for _start, size in series[busy[0]:busy[-1] + 1]) if busy else 0
    data_seconds = (busy[-1] - busy[0] + 1) * meter.resolution if busy else 0.0
    measured = {
        "option": option, "limit": limit, "hosts": len(hosts), "limit_bytes_per_s": rate, "bytes": total,
        "seconds": round(run["seconds"], 2), "transfer_s": round(duration, 2), "ok": run["ok"],
        "max_5s_bytes": max5,
        "max_5s_ratio": round(max5 / (rate * 5.0), 4) if rate and duration >= 5.0 else None,
        "avg_rate": round(total / duration) if duration else None,
        "avg_ratio": round(total / duration / rate, 4) if rate and duration else None,
        "data_seconds": round(data_seconds, 1),
        "data_ratio": round(data_bytes / data_seconds / rate, 4) if rate and data_seconds else None,
        "series_mb_per_s": [round(size / meter.resolution / 1e6, 1) for _start, size in meter.series()][:600],
    }
    if not run["ok"]:
        measured["failed"] = run["failed"]
        measured["output_tail"] = run.get("output_tail")
    if duration < 5.0:
        measured["note"] = "the transfer took under 5 s: no 5 s window (use a larger --limit-image or a lower limit)"
    return measured


# --- the report ------------------------------------------------------------------------------------------


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(run["hosts"], run["forks"]) for run in runs})
    for hosts, forks in keys:
        medians = {}
        for arm in ARMS:
            mine = [run for run in runs if (run["hosts"], run["forks"], run["arm"]) == (hosts, forks, arm)]
            if not mine:
                continue
            seconds = [run["seconds"] for run in mine]
            medians[arm] = statistics.median(seconds)
            rows.append({
                "hosts": hosts, "forks": forks, "arm": arm, "reps": len(mine), "seconds": round(medians[arm], 2),
                "spread": [min(seconds), max(seconds)],
                "uplink_copies": round(statistics.median(run["uplink_copies"] for run in mine), 2),
                "fed_by_peers": statistics.median(run["fed_by_peers"] for run in mine),
                "fed_by_peers_each": [run["fed_by_peers"] for run in mine],
                "verified": all(run["verified"] for run in mine), "ok": all(run["ok"] for run in mine),
                "machine_cpu_s": statistics.median(run["machine_cpu_s"] for run in mine),
                "load": statistics.median(run["load_before"] for run in mine),
            })
        if "controller" in medians and "fanout" in medians:
            for row in rows:
                if (row["hosts"], row["forks"]) == (hosts, forks):
                    row["speedup"] = round(medians["controller"] / medians["fanout"], 2) if row["arm"] == "fanout" \
                        else 1.0
    return rows


def report(data: dict) -> str:
    settings, machine = data["settings"], data["machine"]
    lines = [
        "# Fan-out benchmark (issue 22)", "",
        f"Command: `{settings['command']}`  ",
        f"Date: {machine['date']}; duration {data['duration_s'] / 60:.1f} min; commit {machine['collection_commit']}.",
        "",
        f"Fleet: sshd hosts on 127.0.0.2.., each behind its own loopback relay; all relays share one uplink of"
        f" {settings['uplink'] / 1e6:g} MB/s (the controller's upload, every host together) with"
        f" {settings['rtt_ms']:g} ms round trip; hosts reach each other directly (loopback). Tree:"
        f" one {settings['image'] / MiB:g} MiB image + {settings['small_files']} small files"
        f" ({data['tree_bytes'] / 1e6:.1f} MB). Both arms run the same playbook with the same forks, every option"
        " at its default except `fanout`; interleaved per repetition (order rotated); seconds are the whole"
        " `ansible-playbook` command; medians of the repetitions, spread min-max. `uplink copies` = bytes the"
        " relays carried up / tree bytes. `peers fed` = hosts whose result names a peer as `source`."
        " `verified` = every file of every host's copy has the source's sha256 after every repetition.",
        "",
        f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory_gib']} GiB, kernel"
        f" {machine['kernel']}, Python {machine['python']}, {machine['openssh']}, ansible-core"
        f" {machine['ansible_core']}, Paramiko {machine['paramiko']}; load average at start"
        f" {machine['loadavg_start'][0]:.2f}, at end {data['loadavg_end'][0]:.2f}. Every host is this machine:"
        " the peers' encryption, writes and checks share its CPUs (`CPU s` = the whole machine's busy CPU"
        f" seconds during the run). The hosts' sftp subsystem: `{settings.get('sftp_subsystem', 'sftp-server')}`.",
        "",
        "## Controller-only vs fan-out", "",
        "| hosts | forks | arm | seconds | spread | speedup | target | uplink copies | peers fed | verified | CPU s"
        " | reps |",
        "|---:|---:|---|---:|---|---:|---|---:|---:|---|---:|---:|",
    ]
    for row in data["rows"]:
        target = TARGETS.get(row["hosts"])
        verdict = ""
        if row["arm"] == "fanout" and target and "speedup" in row:
            verdict = f">= {target}x: {'met' if row['speedup'] >= target else 'NOT met'}"
        lines.append(
            f"| {row['hosts']} | {row['forks']} | {row['arm']} | {row['seconds']:.1f} | {row['spread'][0]:.1f}-"
            f"{row['spread'][1]:.1f} | {row.get('speedup', '-')}{'x' if 'speedup' in row else ''} | {verdict} |"
            f" {row['uplink_copies']:.2f} | {row['fed_by_peers']:g} of {row['hosts']} |"
            f" {'yes' if row['verified'] else 'NO'} | {row['machine_cpu_s']:.0f} | {row['reps']} |")
    checks = []
    for row in data["rows"]:
        if row["arm"] != "fanout":
            continue
        half = min(row["fed_by_peers_each"]) * 2 >= row["hosts"]
        checks.append(f"- {row['hosts']} hosts, forks {row['forks']}: uplink {row['uplink_copies']:.2f} copies"
                      f" ({'<= 4: met' if row['uplink_copies'] <= 4 else '> 4: NOT met'}); peers fed"
                      f" {row['fed_by_peers_each']} of {row['hosts']}"
                      f" ({'half or more: met' if half else 'under half: NOT met'});"
                      f" every copy verified: {'yes' if row['verified'] else 'NO'}")
    if checks:
        lines += ["", "Targets of the issue besides the speedup:", ""] + checks
    groups: dict[str, list[dict]] = {}
    for run in data["runs"]:
        if run.get("process_cpu") and run["ok"]:
            label = f"{run['hosts']} hosts, forks {run['forks']}, {run['arm']}"
            groups.setdefault(label, []).append(run["process_cpu"])
    lines += report_lines(list(groups.items()))
    if data.get("limits"):
        lines += ["", "## Bandwidth limits, measured on the relays", "",
                  "Controller-only pushes of the same tree. `max 5 s` = the most bytes the relay(s) read in any 5 s"
                  " / (limit x 5): at most 1.05 is the issue's \"within 5% over any 5 seconds\". `average` = bytes /"
                  " the time from the first byte to the last, / limit (logins, survey and the last file's checks"
                  " included, so under 1); `data phase` = the same over the 0.1 s buckets from the first to the last"
                  " that carried at least a tenth of the limit.", "",
                  "| option | limit | hosts | limit B/s (result) | MB | transfer s | max 5 s / limit"
                  " | average / limit | data phase s | data phase / limit |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for item in data["limits"]:
            lines.append(
                f"| {item['option']} | {item['limit']} | {item['hosts']} | {item['limit_bytes_per_s'] or '?'} |"
                f" {item['bytes'] / 1e6:.1f} | {item['transfer_s']:.1f} |"
                f" {item['max_5s_ratio'] if item['max_5s_ratio'] is not None else '-'} |"
                f" {item['avg_ratio'] if item['avg_ratio'] is not None else '-'} | {item.get('data_seconds', '-')} |"
                f" {item.get('data_ratio') if item.get('data_ratio') is not None else '-'} |")
            if item.get("note"):
                lines.append(f"|  | {item['note']} | | | | | | | | |")
    failed = [run for run in data["runs"] if not run["ok"]]
    if failed:
        lines += ["", "## Failed runs", ""]
        for run in failed:
            lines.append(f"- {run['hosts']} hosts, forks {run['forks']}, {run['arm']}: rc {run['rc']},"
                         f" failed {run['failed']}, not identical {run['not_identical']}")
    warned = sorted({w for run in data["runs"] for w in run.get("warnings", [])})
    if warned:
        lines += ["", "## Warnings the runs gave", ""] + [f"- {w}" for w in warned[:20]]
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or any(value < 1 or value > 64 for value in values):
        raise argparse.ArgumentTypeError("host counts between 1 and 64")
    return values


def forks_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    for item in items:
        if item != "hosts" and not item.isdigit():
            raise argparse.ArgumentTypeError("forks: 'hosts' (as many as hosts) or numbers, e.g. hosts,5")
    return items


def sshd_options(args: argparse.Namespace) -> dict:
    """The hosts' sftp subsystem (--sftp-server)."""
    return {"Subsystem": f"sftp {'internal-sftp' if args.sftp_server == 'internal' else sftp_server_path()}"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./dev bench-fanout", description=__doc__.split("\n\n", maxsplit=1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="4 hosts, a 16 MiB image, 1 rep, forks = hosts, limits on 16 MiB at 2M/4M:"
                        " about 2 minutes")
    parser.add_argument("--hosts", type=int_list, default=[8, 16], help="fleet sizes, e.g. 8,16")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median reported)")
    parser.add_argument("--arms", type=lambda text: [arm for arm in text.split(",") if arm], default=list(ARMS),
                        help="controller (fanout: false) and/or fanout (fanout: true)")
    parser.add_argument("--forks", type=forks_list, default=["hosts", "5"],
                        help="forks settings, each run for both arms: 'hosts' = as many forks as hosts; 5 = Ansible's"
                        " default")
    parser.add_argument("--image", type=parse_size, default=200 * MiB, help="the tree's image")
    parser.add_argument("--small-files", type=int, default=20, help="small files in the tree")
    parser.add_argument("--uplink", type=parse_size, default=None,
                        help="the controller's uplink, bytes/s for all hosts together (default 50 MB/s = 50e6)")
    parser.add_argument("--rtt", type=float, default=20.0, help="round trip through the relays, ms")
    parser.add_argument("--sftp-server", choices=("external", "internal"), default="external",
                        help="the hosts' sftp subsystem: external = OpenSSH's sftp-server binary, started through"
                        " the login shell for every SFTP session (Debian's default); internal = internal-sftp"
                        " inside sshd, no shell and no extra process")
    parser.add_argument("--no-limits", dest="limits", action="store_false", help="skip the bandwidth limit runs")
    parser.add_argument("--host-limit", default="20M", help="bandwidth_limit for the one-host run")
    parser.add_argument("--total-limit", default="40M", help="total_bandwidth_limit for the several-host run")
    parser.add_argument("--total-hosts", type=int, default=4, help="hosts of the total_bandwidth_limit run")
    parser.add_argument("--limit-image", type=parse_size, default=None,
                        help="image of the limit runs' tree (default: --image)")
    parser.add_argument("--timeout", type=float, default=RUN_TIMEOUT, help="seconds before a run is killed")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "bench" / "results" / "fanout")
    parser.add_argument("--tmpdir", type=Path, help="where the source and the hosts' copies go (default $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--process-cpu", action="store_true",
                        help="CPU seconds by program (ssh, sshd, sftp-server, ...) for every run, from BSD process"
                             " accounting (root; Debian's acct package, which ./dev installs)")
    args = parser.parse_args(argv)
    if args.quick:
        given = {arg.split("=")[0].lstrip("-").replace("-", "_") for arg in (argv if argv is not None else sys.argv[1:])
                 if arg.startswith("--")}
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        parser.error(f"--arms: unknown {sorted(unknown)} (of {', '.join(ARMS)})")
    args.uplink = args.uplink or 50e6
    args.limit_image = args.limit_image or args.image
    args.collections = collections_path()
    return args


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def measure_fleet(args: argparse.Namespace, bench: FleetBench, workdir: Path, count: int) -> list[dict]:
    """Both arms on a fleet of `count` hosts, every forks setting, interleaved repetitions."""
    runs = []
    with Fleet(workdir / f"fleet{count}", hosts=count, uplink_rate=args.uplink, rtt_ms=args.rtt,
               sshd_options=sshd_options(args)) as fleet:
        names = [host.name for host in fleet]
        settings = list(dict.fromkeys(count if forks == "hosts" else int(forks) for forks in args.forks))
        for rep in range(args.reps):
            for forks in settings:
                order = args.arms[rep % len(args.arms):] + args.arms[:rep % len(args.arms)]
                for arm in order:
                    run = bench.run(fleet, names, arm, forks)
                    run["rep"] = rep + 1
                    run.pop("results", None)
                    runs.append(run)
                    log(f"{count} hosts, forks {forks}, {arm}, rep {rep + 1}: {run['seconds']:.1f} s,"
                        f" uplink {run['uplink_copies']:.2f} copies, {run['fed_by_peers']} fed by peers,"
                        f" {'verified' if run['verified'] else 'NOT VERIFIED'}"
                        + ("" if run["ok"] else f"; FAILED {run['failed']} {run['not_identical']}"))
    return runs


def measure_limits(args: argparse.Namespace, bench: FleetBench, workdir: Path) -> list[dict]:
    """bandwidth_limit on one host and total_bandwidth_limit on --total-hosts, on the relays' meters."""
    limits = []
    if args.limit_image != args.image:
        limit_source = workdir / "src-limit" / "vpod"
        make_vpod(limit_source, args.limit_image, args.small_files, seed=2)
        bench = FleetBench(args, workdir, limit_source, tree_bytes(limit_source))
    with Fleet(workdir / "fleet-limits", hosts=max(1, args.total_hosts), uplink_rate=args.uplink,
               rtt_ms=args.rtt, sshd_options=sshd_options(args)) as fleet:
        names = [host.name for host in fleet]
        for option, limit, hosts in (("bandwidth_limit", args.host_limit, names[:1]),
                                     ("total_bandwidth_limit", args.total_limit, names)):
            item = limit_measure(bench, fleet, hosts, option, limit)
            limits.append(item)
            log(f"{option} {limit} on {len(hosts)} host(s): max 5 s / limit {item['max_5s_ratio']},"
                f" average / limit {item['avg_ratio']} over {item['transfer_s']} s, in the data phase"
                f" {item['data_ratio']} over {item['data_seconds']} s"
                + ("" if item["ok"] else f"; FAILED {item.get('failed')}"))
    return limits


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except BenchError as error:
        print(f"bench-fanout: {error}", file=sys.stderr)
        return 2
    if args.process_cpu and accounting_unavailable():
        print(f"bench-fanout: --process-cpu: {accounting_unavailable()}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupted)
    started = time.monotonic()
    base = args.tmpdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="multipush-bench-fanout-", dir=base))
    most = max(args.hosts + ([args.total_hosts] if args.limits else []))
    need = (most + 2) * (args.image + 2 * MiB) + (2 * (args.limit_image + 2 * MiB) if args.limits else 0) + 512 * MiB
    free = shutil.disk_usage(workdir).free
    if free < need:
        print(f"bench-fanout: {workdir} has {free / GiB:.1f} GiB free, the run needs {need / GiB:.1f} GiB"
              f" ({most} copies of the tree and the source)", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    log(f"work directory {workdir}; results to {args.out}; {free / GiB:.0f} GiB free, {need / GiB:.1f} GiB needed")
    if os.getloadavg()[0] > 1.0:
        log(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other work is running, the times"
            " will be noisy (compare the load and spread columns)")
    runs: list[dict] = []
    limits: list[dict] = []
    try:
        source = workdir / "src" / "vpod"
        log(f"writing the tree: one {args.image / MiB:g} MiB image + {args.small_files} small files")
        size = make_vpod(source, args.image, args.small_files)
        bench = FleetBench(args, workdir, source, size)
        for count in args.hosts:
            runs += measure_fleet(args, bench, workdir, count)
        if args.limits:
            limits = measure_limits(args, bench, workdir)
    except BenchError as error:
        print(f"bench-fanout: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench-fanout: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    data = {
        "settings": {"command": "./dev bench-fanout " + shlex.join(argv if argv is not None else sys.argv[1:]),
                     "hosts": args.hosts, "reps": args.reps, "arms": args.arms, "forks": args.forks,
                     "image": args.image, "small_files": args.small_files, "uplink": args.uplink, "rtt_ms": args.rtt,
                     "host_limit": args.host_limit, "total_limit": args.total_limit, "total_hosts": args.total_hosts,
                     "limit_image": args.limit_image,
                     "sftp_subsystem": sshd_options(args)["Subsystem"].split(" ", 1)[1]},
        "machine": machine, "loadavg_end": os.getloadavg(), "duration_s": round(time.monotonic() - started, 1),
        "tree_bytes": size, "rows": summarize(runs), "runs": runs, "limits": limits,
    }
    (args.out / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    text = report(data)
    (args.out / "RESULTS.md").write_text(text)
    log(f"wrote {args.out / 'RESULTS.md'} and results.json ({data['duration_s'] / 60:.1f} min)")
    print(text)
    return 0 if all(run["ok"] for run in runs) and all(item["ok"] for item in limits) else 1


if __name__ == "__main__":
    sys.exit(main())
