# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The controller's private directory for what the hosts of one task share across Ansible's forks
(the total bandwidth budget, the fan-out ledger): the forks share nothing but the file system.

Every file of a task run is named `<kind>-<pid>-<rest>`, the pid that of the run's ansible-playbook
(the run key's head, see the action's run key), and pruned by one rule (prune_runs).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import time

from ansible_collections.multipush.sftp.plugins.plugin_utils._plan import PlanError


def runtime_dir() -> str:
    """$XDG_RUNTIME_DIR/multipush when that is ours, else <tmp>/multipush-<uid>; mode 0700, owned by
    this user, never a symlink (another user must not be able to plant or read the state)."""
    uid = os.getuid()
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.stat(base).st_uid == uid:
        path = os.path.join(base, "multipush")
    else:
        path = os.path.join(tempfile.gettempdir(), f"multipush-{uid}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
        raise PlanError(f"{path} must be a directory of this user's alone (mode 0700) to share a task's state "
                        "between its hosts (total_bandwidth_limit, fanout); remove it, or set XDG_RUNTIME_DIR to a "
                        "private directory")
    return path


def process_gone(pid: int) -> bool:
    """Whether no process `pid` exists (a run's ansible-playbook, a host's fork)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's (a reused pid)
        return False
    return False


# A run's files stay this long after its ansible-playbook is gone: workers it left behind may still
# be finishing (each stops once it sees its controller gone).
GONE_RUN_GRACE_SECONDS = 600
# Untouched this long, a run's file is removed even if a process with its pid lives (a reused pid).
STALE_RUN_SECONDS = 7 * 86400


def run_pid(run_key: str) -> int:
    """The ansible-playbook pid a run key starts with, 0 if none."""
    head = run_key.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


def run_file(directory: str, kind: str, run_key: str, suffix: str) -> str:
    """The path of `kind`'s file for one task run: <kind>-<run's pid>-<digest of the run key><suffix>."""
    digest = hashlib.sha256(run_key.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return os.path.join(directory, f"{kind}-{run_pid(run_key)}-{digest}{suffix}")


def prune_runs(directory: str, kinds: tuple[str, ...]) -> None:
    """Remove the files of `kinds` whose run is over: their ansible-playbook gone and the file
    untouched for GONE_RUN_GRACE_SECONDS, or untouched for STALE_RUN_SECONDS whatever the pid."""
    now = time.time()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if parts[0] not in kinds or len(parts) < 3 or not parts[1].isdigit():
            continue
        path = os.path.join(directory, name)
        try:
            idle = now - os.stat(path).st_mtime
            if idle > STALE_RUN_SECONDS or (idle > GONE_RUN_GRACE_SECONDS and process_gone(int(parts[1]))):
                os.unlink(path)
        except OSError:  # another process pruned it first
            continue
