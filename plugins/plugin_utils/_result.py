# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a push reports: the task result (documented in RETURN of plugins/modules/push.py), and in
check mode what it would change."""

from __future__ import annotations

import posixpath

from ansible_collections.multipush.sftp.plugins.plugin_utils._engine import EngineError
from ansible_collections.multipush.sftp.plugins.plugin_utils._jobs import Readlink, Realpath
from ansible_collections.multipush.sftp.plugins.plugin_utils._progress import summary
from ansible_collections.multipush.sftp.plugins.plugin_utils._push_state import FileState, PushRun

SENT = ("sent", "resent", "resumed")


def preview(run: PushRun, planned) -> None:
    """Check mode: what would be sent, created and linked; nothing is written."""
    for file_plan in planned.plans:
        state = FileState(plan=file_plan, status="would_send" if file_plan.action == "send" else "skipped")
        run.files[file_plan.dest] = state
        run.changed |= file_plan.action == "send"
    missing_dirs = [path for path, _local in planned.dirs if planned.remote.get(path) is None]
    run.dirs_created = len(missing_dirs)
    run.changed |= bool(missing_dirs)
    for link, target in planned.links:
        entry = planned.remote.get(target)
        if entry is None:
            status = "would_create"
        elif entry.kind != "link":
            status = "would_change"
        else:
            current = run.call(Readlink(path=target)).get("target")
            status = "unchanged" if current == link.target else "would_change"
        run.link_results.append({"dest": target, "target": link.target, "status": status})
        run.links_changed += int(status != "unchanged")
    run.changed |= bool(run.links_changed)


def file_entries(run: PushRun) -> list[dict]:
    files = []
    for state in run.files.values():
        if state.checksum is None and state.whole_future is not None and state.finalized:
            # Every range matched on the target, so the file there has the source's digest.
            state.checksum = state.whole_future.result()
        local = state.plan.local
        elapsed = (state.finished - state.started) if state.started and state.finished else 0.0
        files.append({
            "src": local.path, "dest": state.plan.dest, "size": local.size, "status": state.status,
            "reason": state.plan.reason, "bytes_sent": state.bytes_sent, "seconds": round(elapsed, 3),
            "retries": state.retries, "checksum": state.checksum, "ranges": len(state.plan.ranges),
            "chunk_size": state.plan.chunk_size,
        })
    return files


def build(run: PushRun, seconds: float, connection_stats: dict, extra: dict) -> dict:
    """The task result. connection_stats: the engine's, the hashing connection's handshake retries
    included; extra: keys reported as they are (phases, remote_hashing, crc32_library)."""
    files = file_entries(run)
    stats = connection_stats
    if stats.get("handshake_retries") and stats.get("connections_opened", 0) < stats.get("pool_size", 0):
        run.warn(f"only {stats['connections_opened']} of {stats['pool_size']} connections could be opened; sshd "
                 f"dropped {stats['handshake_retries']} handshakes (MaxStartups?): lower "
                 "max_concurrent_handshakes or raise MaxStartups with the multipush.sftp.sshd_tuning role")
    bytes_sent = sum(f["bytes_sent"] for f in files)
    result = {
        "changed": run.changed,
        "dest": run.absolute_dest or run.options.dest,
        "files": files,
        "links": sorted(run.link_results, key=lambda link: link["dest"]),
        "files_sent": sum(1 for f in files if f["status"] in SENT),
        "files_skipped": sum(1 for f in files if f["status"] == "skipped"),
        "files_total": len(files),
        "dirs_created": run.dirs_created,
        "temps_removed": run.temps_removed,
        "links_changed": run.links_changed,
        "bytes_sent": bytes_sent,
        "seconds": round(seconds, 3),
        "throughput_mb_s": round(bytes_sent / seconds / 1e6, 2) if seconds > 0 else 0.0,
        "connections": stats.get("connections_opened", 0),
        "handshake_retries": stats.get("handshake_retries", 0),
        "retries": sum(f["retries"] for f in files) + stats.get("handshake_retries", 0),
        "write_size": stats.get("write_size"),
        "cipher": stats.get("cipher"),
        "bandwidth_limit": {"host": run.options.bandwidth_limit, "total": run.options.total_bandwidth_limit},
        **extra,
    }
    result["summary"] = summary(result, run.options.check_mode)
    return result


def absolute_dest(run: PushRun) -> str:
    """dest as an absolute path on the target. A relative dest is relative to the login directory of
    the SSH user (as with scp and sftp): asked of the server (realpath of '.') on the pool's first
    connection while it is open, one round trip, only for a relative dest."""
    dest = run.options.dest
    if dest.startswith("/"):
        return dest
    try:
        login_directory = run.call(Realpath(path=".")).get("path") or "."
    except EngineError as exc:
        run.warn(f"could not ask the target where the relative dest {dest!r} is: {exc}")
        return dest
    absolute = posixpath.normpath(posixpath.join(login_directory, dest))
    return absolute + "/" if dest.endswith("/") and absolute != "/" else absolute
