"""Unit tests for plugins/plugin_utils/_fast_crc.py: the controller's CRC-32 and its fallback.

The choice is explicit (a function passed as `crc32=`), so these tests change no global state."""

import binascii
import os
import types
import zlib

import pytest

from ansible_collections.multipush.sftp.plugins.module_utils import _digest
from ansible_collections.multipush.sftp.plugins.plugin_utils import _fast_crc


def crc_in_pieces(data, piece, crc32=None):
    hasher = _digest.new_hasher("crc32", crc32=crc32)
    view = memoryview(data)
    for offset in range(0, len(data), piece):
        hasher.update(view[offset:offset + piece])
    return hasher


def test_isal_is_taken_when_installed_and_gives_zlibs_values():
    isal_zlib = pytest.importorskip("isal.isal_zlib")
    name, function = _fast_crc.fastest_crc32()
    assert (name, function) == ("isal", isal_zlib.crc32)
    assert (_fast_crc.CRC32_LIBRARY, _fast_crc.CRC32) == ("isal", isal_zlib.crc32)
    small, large = os.urandom(100003), os.urandom(5 * 1024 * 1024 + 3)
    for data, piece in ((small, 1), (small, 7), (large, 65536), (large, 261120), (large, len(large))):
        assert crc_in_pieces(data, piece, function).hexdigest() == f"{binascii.crc32(data):08x}", piece
    # A copy goes on from where its hasher was.
    copy = crc_in_pieces(b"12345", 2, function).copy()
    copy.update(b"6789")
    assert copy.hexdigest() == "cbf43926"


def test_without_isal_the_hashers_use_zlib(monkeypatch):
    monkeypatch.setattr(_fast_crc, "isal_zlib", None)
    assert _fast_crc.fastest_crc32() == ("zlib", zlib.crc32)
    assert crc_in_pieces(b"123456789", 4, zlib.crc32).hexdigest() == "cbf43926"


def off_by_one(data, value=0):
    return zlib.crc32(data, value) ^ 1


def ignores_running_value(data, value=0):
    return zlib.crc32(data)


def drops_a_byte_of_views(data, value=0):
    return zlib.crc32(bytes(data)[1:] if isinstance(data, memoryview) else data, value)


def broken_build(data, value=0):
    raise SystemError("a broken build")


@pytest.mark.parametrize("wrong", [off_by_one, ignores_running_value, drops_a_byte_of_views, broken_build])
def test_an_accelerator_that_disagrees_with_zlib_is_not_used(monkeypatch, wrong):
    monkeypatch.setattr(_fast_crc, "isal_zlib", types.SimpleNamespace(crc32=wrong))
    assert _fast_crc.fastest_crc32() == ("zlib", zlib.crc32)


def test_a_hasher_keeps_the_function_it_was_made_with():
    calls = []

    def counting(data, value=0):
        calls.append(len(data))
        return zlib.crc32(data, value)

    hasher = _digest.new_hasher("crc32", crc32=counting)
    copy = hasher.copy()
    hasher.update(b"123456789")
    copy.update(b"123456789")
    assert hasher.hexdigest() == "cbf43926" and copy.hexdigest() == "cbf43926"
    assert calls == [9, 9]
    assert _digest.new_hasher("crc32").hexdigest() == "00000000"


def test_the_controllers_functions_pass_its_crc32_and_the_targets_default_stays_zlib(tmp_path):
    path = tmp_path / "data"
    data = os.urandom(3 * 1024 * 1024 + 5)
    path.write_bytes(data)
    expected = f"{binascii.crc32(data):08x}"
    for function in (_fast_crc.new_hasher, _fast_crc.file_digest, _fast_crc.digest_file, _fast_crc.hash_many):
        assert function.keywords == {"crc32": _fast_crc.CRC32}
    assert _fast_crc.file_digest(str(path), "crc32") == expected
    whole, chunks = _fast_crc.digest_file(str(path), "crc32", 1024 * 1024)
    assert whole == expected and chunks == _digest.digest_file(str(path), "crc32", 1024 * 1024)[1]
    assert _fast_crc.hash_many([(str(path), None)], "crc32") == [(expected, [])]
    # A crc32 given explicitly wins over the process default (zlib's on a target).
    assert _digest.new_hasher("crc32", crc32=binascii.crc32)._crc32 is binascii.crc32
