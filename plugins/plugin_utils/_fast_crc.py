# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The controller's CRC-32: ISA-L's where python-isal is installed, zlib's otherwise.

The default checksum, crc32, is computed twice for every byte pushed: on the controller while the
byte is sent, and on the target. On 2 cores shared by both ends, that CPU comes out of the
transfer. Fed the pieces the write path hashes, ISA-L's CRC-32 (folding with carry-less multiplies,
as python-isal ships it) takes several times less CPU than zlib's, for the same CRC, value for
value (figures in tests/bench/results/NOTES.md). Only the controller uses it: code that runs on a
target keeps the standard library's zlib, so a target needs nothing installed.
"""

from __future__ import annotations

import functools
import zlib

from ansible_collections.multipush.sftp.plugins.module_utils import _digest

try:
    from isal import isal_zlib
except ImportError:  # optional: requirements.txt installs it where wheels exist
    isal_zlib = None

# zlib's CRC-32 of these bytes, started from 0 and continued from a running value: the calls
# the hashers make. An accelerator that disagrees is not used.
_PROBE = bytes(range(256)) * 33
_PROBE_START = 0x2A5F6E31


def _same_as_zlib(function) -> bool:
    try:
        return (function(_PROBE) == zlib.crc32(_PROBE)
                and function(_PROBE, _PROBE_START) == zlib.crc32(_PROBE, _PROBE_START)
                and function(memoryview(_PROBE)[7:], 1) == zlib.crc32(memoryview(_PROBE)[7:], 1))
    except Exception:  # a broken build of the accelerator: zlib will do
        return False


def fastest_crc32() -> tuple:
    """("isal", its crc32) when python-isal is installed and agrees with zlib, else ("zlib", zlib.crc32).
    Changes nothing: the caller passes the function on (`crc32=` of module_utils/_digest)."""
    if isal_zlib is not None and _same_as_zlib(isal_zlib.crc32):
        return "isal", isal_zlib.crc32
    return "zlib", zlib.crc32


# The controller's choice, made once per process; worker processes make the same one.
CRC32_LIBRARY, CRC32 = fastest_crc32()

# module_utils/_digest's hashing with the controller's CRC-32: import these instead of _digest's
# on the controller. Same signatures and values; only faster where isal is installed.
new_hasher = functools.partial(_digest.new_hasher, crc32=CRC32)
file_digest = functools.partial(_digest.file_digest, crc32=CRC32)
digest_file = functools.partial(_digest.digest_file, crc32=CRC32)
hash_many = functools.partial(_digest.hash_many, crc32=CRC32)
