"""Unit tests for plugins/plugin_utils/_fast_crc.py: the controller's CRC-32 and its fallback."""

import binascii
import os
import types
import zlib

import pytest

from ansible_collections.multipush.sftp.plugins.module_utils import _digest
from ansible_collections.multipush.sftp.plugins.plugin_utils import _fast_crc


@pytest.fixture(autouse=True)
def restore_crc32_function():
    before = _digest.crc32_function
    yield
    _digest.crc32_function = before


def crc_in_pieces(data, piece):
    hasher = _digest.new_hasher("crc32")
    view = memoryview(data)
    for offset in range(0, len(data), piece):
        hasher.update(view[offset:offset + piece])
    return hasher


def test_isal_is_taken_when_installed_and_gives_zlibs_values():
    isal_zlib = pytest.importorskip("isal.isal_zlib")
    assert _fast_crc.use_fastest_crc32() == "isal"
    assert _digest.crc32_function is isal_zlib.crc32
    small, large = os.urandom(100003), os.urandom(5 * 1024 * 1024 + 3)
    for data, piece in ((small, 1), (small, 7), (large, 65536), (large, 261120), (large, len(large))):
        assert crc_in_pieces(data, piece).hexdigest() == f"{binascii.crc32(data):08x}", piece
    # A copy goes on from where its hasher was.
    copy = crc_in_pieces(b"12345", 2).copy()
    copy.update(b"6789")
    assert copy.hexdigest() == "cbf43926"


def test_without_isal_the_hashers_use_zlib(monkeypatch):
    monkeypatch.setattr(_fast_crc, "isal_zlib", None)
    _digest.crc32_function = binascii.crc32  # whatever was there before is replaced
    assert _fast_crc.use_fastest_crc32() == "zlib"
    assert _digest.crc32_function is zlib.crc32
    assert crc_in_pieces(b"123456789", 4).hexdigest() == "cbf43926"


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
    assert _fast_crc.use_fastest_crc32() == "zlib"
    assert _digest.crc32_function is zlib.crc32


def test_a_hasher_keeps_the_function_it_was_made_with():
    hasher = _digest.new_hasher("crc32")
    _digest.crc32_function = lambda data, value=0: 0
    copy = hasher.copy()  # made after the switch, from a hasher made before it
    hasher.update(b"123456789")
    copy.update(b"123456789")
    assert hasher.hexdigest() == "cbf43926"
    assert copy.hexdigest() == "cbf43926"
    assert _digest.new_hasher("crc32").hexdigest() == "00000000"
