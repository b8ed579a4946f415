"""The environment every ansible-playbook run of the tests gets."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def ansible_settings(tmp_path: Path, collections_root: Path) -> dict:
    """The tested collection, host key checking on, a private ControlPersist directory (so no master
    connection of another test is reused), temp dirs under tmp_path, the test's Python on both sides."""
    control = tmp_path / "cp"
    control.mkdir(exist_ok=True)
    return {
        "ANSIBLE_COLLECTIONS_PATH": str(collections_root),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control),
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-local"),
        "ANSIBLE_REMOTE_TEMP": str(tmp_path / "ansible-remote"),
        "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        "ANSIBLE_DEPRECATION_WARNINGS": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def push_task(src, dest, register: str = "pushed", task: dict | None = None, ignore_unreachable: bool = False,
              **options) -> str:
    """One multipush.sftp.push task as YAML, registered as `register` and with ignore_errors (so the
    run saves the failed result too); `options` are the push's, `task` adds task keywords, all written
    as JSON values. ignore_unreachable: the last line is `  ignore_unreachable: true`."""
    lines = ["- name: Push\n  multipush.sftp.push:", f"    src: {json.dumps(str(src))}",
             f"    dest: {json.dumps(str(dest))}"]
    lines += [f"    {key}: {json.dumps(value)}" for key, value in options.items()]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in (task or {}).items()]
    lines.append(f"  register: {register}\n  ignore_errors: true")
    if ignore_unreachable:
        lines.append("  ignore_unreachable: true")
    return "\n".join(lines) + "\n"
