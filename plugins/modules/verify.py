#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: verify
short_description: Report size and checksums of files on the target, whole and per chunk, with several threads
version_added: 0.1.0
description:
  - Inspects one file (O(path)) or a batch of files (O(files)) on the target and returns whether it
    exists, its type, size, modification time and permission bits, its checksum and, with
    O(chunk_size), one checksum per range of the file.
  - The whole-file checksum is the standard digest of the file (what C(sha256sum) prints for
    C(sha256)). Per-range checksums cover the ranges of O(chunk_size) bytes from the start of the
    file, the last range taking the remainder; these are the ranges M(multipush.sftp.push) writes
    in parallel, so each range can be checked (and re-sent) on its own.
  - Hashing uses O(threads) threads. The whole-file checksum is computed by one thread reading the
    file in order while the other threads hash the ranges at the same time; in batch mode all
    files share the same threads. Reads are done in blocks of 1 MiB, so memory use does not grow
    with file size.
  - When expected values (O(size), O(checksum), or the same keys in O(files)) are given and differ
    from what is found, the module fails with a message naming each path with its expected and
    actual value.
  - Never changes anything on the target (C(changed) is always false).
author:
  - multipush.sftp developers (@multipush)
options:
  path:
    description:
      - The file to inspect. Use an absolute path.
      - Symbolic links are not followed; a link is reported with RV(type=link) and not hashed.
      - Mutually exclusive with O(files); one of the two is required.
    type: path
  files:
    description:
      - Batch mode; inspect all these files in one run. The files are hashed in parallel.
      - Mutually exclusive with O(path), O(size) and O(checksum); one of O(path) and O(files) is required.
      - O(get_checksum), O(checksum_algorithm) and O(threads) apply to every file; O(chunk_size) is
        the default for entries without their own O(files[].chunk_size).
    type: list
    elements: dict
    suboptions:
      path:
        description:
          - The file to inspect. Use an absolute path.
        type: path
        required: true
      size:
        description:
          - Expected size in bytes. See O(size).
        type: int
      checksum:
        description:
          - Expected whole-file checksum. See O(checksum).
        type: str
      chunk_size:
        description:
          - Return one checksum per range of this size for this file, in bytes or with a unit as
            for O(chunk_size). See O(chunk_size).
        type: raw
      chunk_indexes:
        description:
          - Hash only these ranges (numbered from 0) of O(files[].chunk_size); the other entries of
            RV(files[].chunk_checksums) are null. For checking ranges of a file as they arrive; other
            parts of the file may change meanwhile without failing the module.
        type: list
        elements: int
      get_checksum:
        description:
          - Whether to compute this file's whole-file checksum; overrides O(get_checksum) for this file.
        type: bool
  size:
    description:
      - Expected size of O(path) in bytes. When the file is missing, not a regular file, or of another
        size, the module fails; the file is then not hashed.
    type: int
  checksum:
    description:
      - Expected whole-file checksum of O(path), hexadecimal, computed with O(checksum_algorithm)
        (upper or lower case). When the file is missing, not a regular file, or has another
        checksum, the module fails.
      - Giving an expected checksum computes it even when O(get_checksum=false).
    type: str
  get_checksum:
    description:
      - Compute the whole-file checksum (RV(checksum)).
      - Set to V(false) with O(chunk_size) to get only the per-range checksums.
    type: bool
    default: true
  checksum_algorithm:
    description:
      - Hash algorithm for every checksum.
      - C(crc32) (zlib's CRC-32, 8 hexadecimal digits) is an error-detecting code, not a cryptographic
        hash. It suits checking what multipush.sftp.push wrote with its default; it is not for comparing
        with published checksums or for detecting deliberate edits.
    type: str
    choices: [crc32, md5, sha1, sha224, sha256, sha384, sha512, blake2b]
    default: sha256
  chunk_size:
    description:
      - Also return RV(chunk_checksums), one checksum per range of this size
        (the last range takes the remainder; a 0-byte file has none).
      - A number of bytes, or a number with a unit as M(multipush.sftp.push) takes them
        (V(512K), V(64M), V(1G), V(1.5GiB); K, M, G and T alone are 1024-based, KB, MB, GB and TB
        1000-based). Must be greater than 0.
    type: raw
  threads:
    description:
      - Number of hashing threads. Defaults to the number of CPUs of the target, at most 8.
      - Must be at least 1. With V(1) the whole-file and per-range checksums come from one sequential read.
    type: int
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: The module only reads; it behaves the same in check mode.
  diff_mode:
    support: none
  platform:
    platforms: posix
notes:
  - Needs Python 3.8 or later on the target (standard library only).
  - A file that changes while it is hashed makes the module fail for that file rather than
    return checksums of a moving target.
seealso:
  - module: multipush.sftp.push
  - module: ansible.builtin.stat
"""

EXAMPLES = r"""
- name: Checksum of one file, and one checksum per 64 MiB range
  multipush.sftp.verify:
    path: /srv/images/disk.qcow2
    chunk_size: 67108864
  register: image

- name: Show the digest and the number of ranges
  ansible.builtin.debug:
    msg: "{{ image.checksum }} ({{ image.chunk_checksums | length }} ranges of 64 MiB)"

- name: Size and checksum of the original on the controller
  ansible.builtin.stat:
    path: /images/disk.qcow2
    checksum_algorithm: sha256
  delegate_to: localhost
  register: original

- name: Fail unless the copy on the target has the size and checksum of the original
  multipush.sftp.verify:
    path: /srv/images/disk.qcow2
    size: "{{ original.stat.size }}"
    checksum: "{{ original.stat.checksum }}"
    checksum_algorithm: sha256

- name: Only type, size, mtime and mode, no hashing
  multipush.sftp.verify:
    path: /srv/images
    get_checksum: false

- name: Check many files in one run, hashed in parallel with 4 threads
  multipush.sftp.verify:
    files:
      - path: /srv/data/a.bin
        size: 1048576
      - path: /srv/data/b.bin
        checksum: 5d41402abc4b2a76b9719d911017c592  # md5 of the 5 bytes "hello"
      - path: /srv/data/c.bin
        chunk_size: 16777216
    checksum_algorithm: md5
    threads: 4
  register: batch

- name: Show the files that are missing (a file with no expected size or checksum may be missing)
  ansible.builtin.debug:
    msg: "{{ batch.files | rejectattr('exists') | map(attribute='path') | list }}"
"""

RETURN = r"""
path:
  description: The path inspected (O(path) mode).
  returned: when O(path) is given
  type: str
  sample: /srv/images/disk.qcow2
exists:
  description: Whether the path exists (a dangling symbolic link exists).
  returned: when O(path) is given
  type: bool
  sample: true
type:
  description: What the path is, without following symbolic links.
  returned: when O(path) is given
  type: str
  choices: [file, directory, link, other, missing]
  sample: file
size:
  description: Size in bytes (of the link itself for a link); null when missing.
  returned: when O(path) is given
  type: int
  sample: 21474836480
mtime:
  description: Modification time in seconds since the epoch; null when missing.
  returned: when O(path) is given
  type: float
  sample: 1700000000.123456
mode:
  description: Permission bits as a four-digit octal string; null when missing.
  returned: when O(path) is given
  type: str
  sample: "0644"
checksum:
  description:
    - Whole-file checksum (hexadecimal, O(checksum_algorithm)).
    - Null when not computed (O(get_checksum=false) without O(checksum)) or when the path is not a regular file.
  returned: when O(path) is given
  type: str
  sample: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
chunk_checksums:
  description:
    - One checksum per range of O(chunk_size) bytes, in file order.
    - Empty without O(chunk_size), for a 0-byte file, and when the path is not a regular file.
  returned: when O(path) is given
  type: list
  elements: str
  sample: [4355a46b19d348dc2f57c046f8ef63d4538ebb936000f3c9ee954a27460dd865]
checksum_algorithm:
  description: The algorithm of every returned checksum.
  returned: always
  type: str
  sample: sha256
files:
  description:
    - One entry per item of O(files), in the same order. Also returned when the module fails because
      some files do not match.
  returned: when O(files) is given
  type: list
  elements: dict
  contains:
    path:
      description: The path inspected, as given (after C(~) expansion).
      type: str
      sample: /srv/data/a.bin
    exists:
      description: Whether the path exists.
      type: bool
    type:
      description: V(file), V(directory), V(link), V(other) or V(missing), without following links.
      type: str
    size:
      description: Size in bytes; null when missing.
      type: int
    mtime:
      description: Modification time in seconds since the epoch; null when missing.
      type: float
    mode:
      description: Permission bits as a four-digit octal string; null when missing.
      type: str
    checksum:
      description: Whole-file checksum; null when not computed or not a regular file.
      type: str
    chunk_checksums:
      description: One checksum per range of this file's chunk size.
      type: list
      elements: str
    failed:
      description: Whether this file could not be read or does not match its expected values.
      type: bool
    msg:
      description: Why this file failed; null when it did not.
      type: str
      sample: "/srv/data/a.bin: size is 1000, expected 1048576"
"""

# Imports follow the documentation blocks, as Ansible modules have them.
import re  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.multipush.sftp.plugins.module_utils._digest import (  # noqa: E402
    ALGORITHMS,
    default_threads,
    describe_files,
    new_hasher,
)


def _expectation_text(request):
    parts = []
    if request.get("size") is not None:
        parts.append("size %d" % request["size"])
    if request.get("checksum") is not None:
        parts.append("checksum %s" % request["checksum"])
    return " and ".join(parts)


def _size_problem(entry, request):
    """The message for a file that cannot meet its expectations before hashing, or None."""
    expected = _expectation_text(request)
    if not expected:
        return None
    path = entry["path"]
    if not entry["exists"]:
        return "%s: does not exist, expected a file with %s" % (path, expected)
    if entry["type"] != "file":
        return "%s: is a %s, not a regular file, expected a file with %s" % (path, entry["type"], expected)
    if request.get("size") is not None and entry["size"] != request["size"]:
        return "%s: size is %d, expected %d" % (path, entry["size"], request["size"])
    return None


def _checksum_problem(entry, request, algorithm):
    expected = request.get("checksum")
    if expected is None:
        return None
    wanted = expected.strip().lower()
    if entry["checksum"] == wanted:
        return None
    message = "%s: %s checksum is %s, expected %s" % (entry["path"], algorithm, entry["checksum"], expected)
    digits = len(new_hasher(algorithm).hexdigest())
    if len(wanted) != digits:
        message += " (the expected value has %d characters, a %s checksum has %d: check checksum_algorithm)" % (
            len(wanted), algorithm, digits)
    return message


def verify(requests, algorithm, get_checksum, threads):
    """Inspect and hash every request (dicts with path, size, checksum, chunk_size); one entry each, in order."""
    entries = describe_files(requests, algorithm, get_checksum, threads, problem=_size_problem)
    for request, entry in zip(requests, entries):
        if not entry["failed"]:
            problem = _checksum_problem(entry, request, algorithm)
            if problem:
                entry.update(failed=True, msg=problem)
    return entries


# Sizes as multipush.sftp.push takes them (plugins/plugin_utils/_plan.py parse_size; a unit test keeps
# the two in step): K, M, G, T alone are 1024-based, KB, MB, GB, TB 1000-based, KiB... 1024-based.
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024 ** 2, "mb": 1000 ** 2,
               "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1000 ** 3, "gib": 1024 ** 3, "t": 1024 ** 4,
               "tb": 1000 ** 4, "tib": 1024 ** 4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value):
    """64M, 1.5GiB, '65536' or 65536 -> bytes; None when it is not a size."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("not a size")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _size(module, value, name):
    try:
        number = parse_size(value)
    except ValueError:
        number = None
        module.fail_json(msg="%s=%r is not a size: use a number of bytes or a number with a unit such as "
                             "512K, 64M or 1G" % (name, value))
    _positive(module, number, name)
    return number


def _positive(module, value, name):
    if value is not None and value <= 0:
        module.fail_json(msg="%s must be greater than 0, got %d" % (name, value))


def main():
    file_spec = dict(
        path=dict(type="path", required=True),
        size=dict(type="int"),
        checksum=dict(type="str"),
        chunk_size=dict(type="raw"),
        chunk_indexes=dict(type="list", elements="int"),
        get_checksum=dict(type="bool"),
    )
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path"),
            files=dict(type="list", elements="dict", options=file_spec),
            size=dict(type="int"),
            checksum=dict(type="str"),
            get_checksum=dict(type="bool", default=True),
            checksum_algorithm=dict(type="str", default="sha256", choices=list(ALGORITHMS)),
            chunk_size=dict(type="raw"),
            threads=dict(type="int"),
        ),
        mutually_exclusive=[("path", "files"), ("files", "size"), ("files", "checksum")],
        required_one_of=[("path", "files")],
        supports_check_mode=True,
    )
    params = module.params
    algorithm = params["checksum_algorithm"]
    threads = params["threads"] if params["threads"] is not None else default_threads()
    if threads < 1:
        module.fail_json(msg="threads must be at least 1, got %d" % threads)
    params["chunk_size"] = _size(module, params["chunk_size"], "chunk_size")
    try:
        new_hasher(algorithm)
    except ValueError as exc:  # e.g. md5 missing from a restricted OpenSSL build
        module.fail_json(msg=str(exc))

    if params["files"] is not None:
        requests = []
        for number, item in enumerate(params["files"], start=1):
            request = dict(item)
            request["chunk_size"] = _size(module, item["chunk_size"],
                                          "files[%d].chunk_size (%s)" % (number, item["path"]))
            if request["chunk_size"] is None:
                request["chunk_size"] = params["chunk_size"]
            requests.append(request)
        entries = verify(requests, algorithm, params["get_checksum"], threads)
        problems = [entry["msg"] for entry in entries if entry["failed"]]
        if problems:
            module.fail_json(
                msg="%d of %d files failed verification: %s" % (len(problems), len(entries), "; ".join(problems)),
                files=entries, checksum_algorithm=algorithm)
        module.exit_json(changed=False, files=entries, checksum_algorithm=algorithm)

    request = {"path": params["path"], "size": params["size"], "checksum": params["checksum"],
               "chunk_size": params["chunk_size"], "chunk_indexes": None, "get_checksum": None}
    entry = verify([request], algorithm, params["get_checksum"], threads)[0]
    failed, msg = entry.pop("failed"), entry.pop("msg")
    if failed:
        module.fail_json(msg=msg, checksum_algorithm=algorithm, **entry)
    module.exit_json(changed=False, checksum_algorithm=algorithm, **entry)


if __name__ == "__main__":
    main()
