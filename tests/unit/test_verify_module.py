"""Unit tests for plugins/modules/verify.py run in-process (paths the integration tests cannot reach as root)."""

import errno
import hashlib
import json
import os

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.multipush.sftp.plugins.module_utils import _digest
from ansible_collections.multipush.sftp.plugins.modules import verify


def run_module(args, capsys):
    """Run the module's main() with `args`; return (failed, result dict)."""
    with patch_module_args(args):
        with pytest.raises(SystemExit) as info:
            verify.main()
    result = json.loads(capsys.readouterr().out)
    assert bool(result.get("failed")) == (info.value.code != 0)
    return bool(result.get("failed")), result


@pytest.fixture
def unreadable(monkeypatch, tmp_path):
    """A file whose open() fails with EACCES (tests run as root, so chmod alone would not do)."""
    path = tmp_path / "secret"
    path.write_bytes(b"s" * 100)
    real_open = os.open

    def guarded_open(name, flags, *args, **kwargs):
        if str(name) == str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(name))
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    return path


def test_single_file_facts_and_checksums(tmp_path, capsys):
    data = os.urandom(300_001)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    os.chmod(path, 0o640)
    failed, result = run_module({"path": str(path), "chunk_size": 100_000, "threads": 2}, capsys)
    assert not failed
    assert result["changed"] is False
    assert result["exists"] is True and result["type"] == "file"
    assert result["size"] == 300_001
    assert result["mode"] == "0640"
    assert result["mtime"] == pytest.approx(os.stat(path).st_mtime)
    assert result["checksum"] == hashlib.sha256(data).hexdigest()
    assert result["chunk_checksums"] == [hashlib.sha256(data[o:o + 100_000]).hexdigest()
                                         for o in (0, 100_000, 200_000, 300_000)]
    assert result["checksum_algorithm"] == "sha256"


def test_expected_checksum_in_upper_case_matches(tmp_path, capsys):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    failed, result = run_module({"path": str(path), "checksum": hashlib.sha1(b"abc").hexdigest().upper(),
                                 "checksum_algorithm": "sha1", "size": 3}, capsys)
    assert not failed, result


def test_wrong_length_checksum_hints_at_the_algorithm(tmp_path, capsys):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    failed, result = run_module({"path": str(path), "checksum": hashlib.md5(b"abc").hexdigest()}, capsys)
    assert failed
    assert str(path) in result["msg"]
    assert "sha256 checksum is %s" % hashlib.sha256(b"abc").hexdigest() in result["msg"]
    assert "check checksum_algorithm" in result["msg"]


def test_get_checksum_false_skips_whole_digest_but_not_chunks(tmp_path, capsys):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    failed, result = run_module({"path": str(path), "get_checksum": False, "chunk_size": 4}, capsys)
    assert not failed
    assert result["checksum"] is None
    assert result["chunk_checksums"] == [hashlib.sha256(p).hexdigest() for p in (b"0123", b"4567", b"89")]
    failed, result = run_module({"path": str(path), "get_checksum": False}, capsys)
    assert result["checksum"] is None and result["chunk_checksums"] == []


def test_expected_checksum_forces_hashing_even_without_get_checksum(tmp_path, capsys):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    failed, result = run_module({"path": str(path), "get_checksum": False, "checksum": "00"}, capsys)
    assert failed
    assert result["checksum"] == hashlib.sha256(b"x").hexdigest()


def test_symlink_is_reported_as_link_and_not_hashed(tmp_path, capsys):
    target = tmp_path / "target"
    target.write_bytes(b"data")
    link = tmp_path / "link"
    link.symlink_to(target)
    failed, result = run_module({"path": str(link), "chunk_size": 2}, capsys)
    assert not failed
    assert (result["exists"], result["type"], result["checksum"], result["chunk_checksums"]) == (
        True, "link", None, [])
    failed, result = run_module({"path": str(link), "size": 4}, capsys)
    assert failed
    assert result["msg"] == "%s: is a link, not a regular file, expected a file with size 4" % link


def test_dangling_symlink_exists(tmp_path, capsys):
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    failed, result = run_module({"path": str(link)}, capsys)
    assert not failed
    assert result["exists"] is True and result["type"] == "link"


def test_unreadable_file_fails_naming_path_and_errno_text(unreadable, capsys):
    failed, result = run_module({"path": str(unreadable)}, capsys)
    assert failed
    assert result["msg"] == "%s: cannot be read: Permission denied (errno 13)" % unreadable
    assert result["exists"] is True and result["checksum"] is None


def test_batch_unreadable_file_fails_but_returns_every_entry(unreadable, tmp_path, capsys):
    good = tmp_path / "good"
    good.write_bytes(b"g" * 5000)
    failed, result = run_module({"files": [{"path": str(good), "chunk_size": 2000}, {"path": str(unreadable)}],
                                 "threads": 3}, capsys)
    assert failed
    assert result["msg"].startswith("1 of 2 files failed verification: ")
    assert "%s: cannot be read: Permission denied" % unreadable in result["msg"]
    assert str(good) not in result["msg"]
    first, second = result["files"]
    assert first["path"] == str(good) and first["failed"] is False and first["msg"] is None
    assert first["checksum"] == hashlib.sha256(b"g" * 5000).hexdigest()
    assert first["chunk_checksums"] == [hashlib.sha256(b"g" * 2000).hexdigest()] * 2 + [
        hashlib.sha256(b"g" * 1000).hexdigest()]
    assert second["path"] == str(unreadable) and second["failed"] is True


def test_batch_top_level_chunk_size_is_the_default(tmp_path, capsys):
    one = tmp_path / "one"
    one.write_bytes(b"a" * 10)
    two = tmp_path / "two"
    two.write_bytes(b"b" * 10)
    failed, result = run_module({"files": [{"path": str(one)}, {"path": str(two), "chunk_size": 5}],
                                 "chunk_size": 3, "checksum_algorithm": "md5"}, capsys)
    assert not failed
    assert len(result["files"][0]["chunk_checksums"]) == 4
    assert result["files"][1]["chunk_checksums"] == [hashlib.md5(b"bbbbb").hexdigest()] * 2


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ({"threads": 0}, "threads must be at least 1, got 0"),
        ({"chunk_size": 0}, "chunk_size must be greater than 0, got 0"),
        ({"chunk_size": -4}, "chunk_size must be greater than 0, got -4"),
        ({"checksum_algorithm": "sha3_256"}, "value of checksum_algorithm must be one of"),
    ],
)
def test_bad_arguments_fail_clearly(tmp_path, capsys, args, fragment):
    failed, result = run_module({"path": str(tmp_path), **args}, capsys)
    assert failed
    assert fragment in result["msg"]


def test_bad_per_file_chunk_size_names_the_entry(tmp_path, capsys):
    failed, result = run_module({"files": [{"path": str(tmp_path / "x"), "chunk_size": 0}]}, capsys)
    assert failed
    assert "files[1].chunk_size (%s) must be greater than 0" % (tmp_path / "x") in result["msg"]


def test_path_and_files_are_exclusive_and_one_is_required(tmp_path, capsys):
    failed, result = run_module({"path": str(tmp_path), "files": [{"path": str(tmp_path)}]}, capsys)
    assert failed and "mutually exclusive" in result["msg"]
    failed, result = run_module({"files": [{"path": str(tmp_path)}], "size": 3}, capsys)
    assert failed and "mutually exclusive" in result["msg"]
    failed, result = run_module({"get_checksum": False}, capsys)
    assert failed and "one of the following is required: path, files" in result["msg"]


def test_size_mismatch_fails_without_hashing(tmp_path, capsys, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"12345")
    monkeypatch.setattr(_digest, "hash_many", lambda specs, *args, **kwargs: [("unexpected", [])] * len(specs))
    failed, result = run_module({"path": str(path), "size": 6, "checksum": "ab"}, capsys)
    assert failed
    assert result["msg"] == "%s: size is 5, expected 6" % path
    assert result["size"] == 5 and result["checksum"] is None
