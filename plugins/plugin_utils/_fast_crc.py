# -*- coding: utf-8 -*-
# Copyright: multipush.sftp contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The controller's CRC-32: ISA-L's where python-isal is installed, zlib's otherwise.

The default checksum, crc32, is computed twice for every byte pushed: on the controller while the
byte is sent, and on the target. On 2 cores shared by both ends, that CPU comes out of the
transfer. Fed the 255 KiB pieces the write path hashes, zlib 1.2.13's CRC-32 took 0.70-0.86 s of
CPU per GiB on the CI machine, ISA-L's (folding with carry-less multiplies, as python-isal ships
it) 0.11-0.15 s, for the same CRC, value for value. Only the controller uses it: code that runs on
a target keeps the standard library's zlib, so a target needs nothing installed.
"""

from __future__ import annotations

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


def use_fastest_crc32() -> str:
    """Have this process's crc32 hashers (and the worker processes forked after) use the fastest
    CRC-32 available that agrees with zlib's; returns the library's name, "isal" or "zlib"."""
    if isal_zlib is not None and _same_as_zlib(isal_zlib.crc32):
        _digest.crc32_function = isal_zlib.crc32
        return "isal"
    _digest.crc32_function = zlib.crc32
    return "zlib"
