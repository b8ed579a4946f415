# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The owner and group wanted for the pushed files (the push's owner and group options): looked up
in the target's /etc/passwd and /etc/group over SFTP, checked against who writes the files, and
added by the SFTP layer to the attributes of every setstat that sets a mode or an mtime.
"""

from __future__ import annotations

from ansible_collections.multipush.sftp.plugins.plugin_utils._spec import ConnectionSpec, SessionError, paramiko

UNCHANGED_ID = 0xFFFFFFFF  # chown(2)'s "leave as is" (-1) as the 32-bit SFTP field


def with_owner(attrs, uid: int | None, gid: int | None):
    """`attrs` (SFTPAttributes of a setstat) with the wanted owner and group, when it sets a mode or
    an mtime; a size-only request (allocation) is left alone: ownership comes with the metadata."""
    if uid is None and gid is None:
        return attrs
    if attrs.st_uid is not None or (attrs.st_mode is None and attrs.st_mtime is None):
        return attrs
    attrs.st_uid = UNCHANGED_ID if uid is None else uid
    attrs.st_gid = UNCHANGED_ID if gid is None else gid
    return attrs


def _remote_table(sftp, path: str) -> list[list[str]] | None:
    """/etc/passwd or /etc/group of the target, read over SFTP (no remote command), or None."""
    try:
        with sftp.open(path, "r") as handle:
            text = handle.read(4 * 1024 * 1024).decode("utf-8", "replace")
    except (OSError, paramiko.SSHException):
        return None
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#") and ":" in line]


def _id_of(value: str, table: list[list[str]] | None, what: str, path: str, where: str) -> int:
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    if table is None:
        raise SessionError(f"{what}={text!r}: cannot read {path} on {where} over SFTP to find its number (chrooted "
                           f"SFTP?); give the number instead", retryable=False, unreachable=False)
    for fields in table:
        if fields[0] == text and len(fields) > 2 and fields[2].isdigit():
            return int(fields[2])
    raise SessionError(f"{what}={text!r} does not exist on {where} (not in its {path}; directory users such as LDAP "
                       "are not looked up: give the number instead)", retryable=False, unreachable=False)


def resolve_ownership(spec: ConnectionSpec, sftp) -> tuple[int | None, int | None]:
    """The uid and gid wanted for the pushed files, looked up in the target's /etc/passwd and
    /etc/group, after checking that whoever writes the files (the become user, else the login
    user) may give them that owner and group: only root can give files away."""
    if spec.owner is None and spec.group is None:
        return None, None
    where = spec.alias or spec.host
    passwd = _remote_table(sftp, "/etc/passwd")
    groups = _remote_table(sftp, "/etc/group") if spec.group is not None else None
    uid = _id_of(spec.owner, passwd, "owner", "/etc/passwd", where) if spec.owner is not None else None
    gid = _id_of(spec.group, groups, "group", "/etc/group", where) if spec.group is not None else None
    writer = spec.become.user if spec.become is not None else spec.user
    entry = next((fields for fields in passwd or [] if fields[0] == writer and len(fields) > 3), None)
    if entry is None or not entry[2].isdigit() or int(entry[2]) == 0:
        return uid, gid  # root (or unknown: the target's answer to chown will tell)
    how = "use become: true (root) or leave it out"
    if uid is not None and uid != int(entry[2]):
        raise SessionError(f"owner={spec.owner}: the files are written by {writer} (uid {entry[2]}) on {where}, and "
                           f"only root can give files to another user; {how}", retryable=False, unreachable=False)
    if gid is not None and str(gid) != entry[3]:
        members = next((fields[3].split(",") for fields in groups or []
                        if len(fields) > 3 and fields[2] == str(gid)), [])
        if writer not in members:
            raise SessionError(f"group={spec.group}: {writer}, who writes the files on {where}, is not a member of "
                               f"that group; {how}, or add {writer} to the group", retryable=False, unreachable=False)
    return uid, gid
