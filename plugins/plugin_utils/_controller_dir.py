# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The controller's private directory for what the hosts of one task share across Ansible's forks
(the total bandwidth budget, the fan-out ledger): the forks share nothing but the file system.
"""

from __future__ import annotations

import os
import stat
import tempfile

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
