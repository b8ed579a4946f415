"""multipush.sftp.verify end to end: ansible-playbook against a real sshd on loopback (target = this machine)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MIB = 1024 * 1024


def write_random(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def test_chunk_checksums_match_hashlib_over_slices(run_play, tmp_path):
    data = write_random(tmp_path / "big.bin", 5 * MIB + 4321)
    chunk = MIB
    run = run_play(
        f"""
        - name: Verify with chunks
          multipush.sftp.verify:
            path: {tmp_path}/big.bin
            chunk_size: {chunk}
            threads: 4
          register: chunked
        - name: Verify with chunks, one thread, sha1
          multipush.sftp.verify:
            path: {tmp_path}/big.bin
            chunk_size: {2 * MIB}
            threads: 1
            checksum_algorithm: sha1
          register: single
        """
    )
    assert run.rc == 0, run
    result = run["chunked"]
    assert result["changed"] is False
    assert result["exists"] is True and result["type"] == "file"
    assert result["size"] == len(data)
    assert result["checksum"] == hashlib.sha256(data).hexdigest()
    expected = [hashlib.sha256(data[offset:offset + chunk]).hexdigest() for offset in range(0, len(data), chunk)]
    assert len(expected) == 6
    assert result["chunk_checksums"] == expected
    single = run["single"]
    assert single["checksum"] == hashlib.sha1(data).hexdigest()
    assert single["chunk_checksums"] == [hashlib.sha1(data[o:o + 2 * MIB]).hexdigest() for o in (0, 2 * MIB, 4 * MIB)]


def test_matching_expectations_pass_in_normal_and_check_mode(run_play, tmp_path):
    data = write_random(tmp_path / "f.bin", 200_000)
    os.chmod(tmp_path / "f.bin", 0o600)
    digest = hashlib.md5(data).hexdigest()
    run = run_play(
        f"""
        - name: Verify matching
          multipush.sftp.verify:
            path: {tmp_path}/f.bin
            size: {len(data)}
            checksum: {digest}
            checksum_algorithm: md5
          register: matching
        - name: Verify matching in check mode
          multipush.sftp.verify:
            path: {tmp_path}/f.bin
            size: {len(data)}
            checksum: {digest}
            checksum_algorithm: md5
          check_mode: true
          register: checked
        """
    )
    assert run.rc == 0, run
    for name in ("matching", "checked"):
        result = run[name]
        assert not result.get("failed"), result
        assert result["changed"] is False
        assert result["checksum"] == digest
        assert result["checksum_algorithm"] == "md5"
        assert result["size"] == 200_000
        assert result["mode"] == "0600"
        assert result["mtime"] == os.stat(tmp_path / "f.bin").st_mtime
        assert result["chunk_checksums"] == []


def test_size_and_checksum_mismatches_fail_naming_the_path(run_play, tmp_path):
    data = write_random(tmp_path / "f.bin", 1000)
    actual = hashlib.sha256(data).hexdigest()
    wrong = hashlib.sha256(b"something else").hexdigest()
    run = run_play(
        f"""
        - name: Wrong size
          multipush.sftp.verify:
            path: {tmp_path}/f.bin
            size: 1001
          register: bad_size
          ignore_errors: true
        - name: Wrong checksum
          multipush.sftp.verify:
            path: {tmp_path}/f.bin
            size: 1000
            checksum: {wrong}
          register: bad_checksum
          ignore_errors: true
        """
    )
    assert run.rc == 0, run
    bad_size = run["bad_size"]
    assert bad_size["failed"] is True
    assert bad_size["msg"] == f"{tmp_path}/f.bin: size is 1000, expected 1001"
    assert bad_size["size"] == 1000
    bad_checksum = run["bad_checksum"]
    assert bad_checksum["failed"] is True
    assert bad_checksum["msg"] == f"{tmp_path}/f.bin: sha256 checksum is {actual}, expected {wrong}"
    assert bad_checksum["checksum"] == actual


def test_missing_path(run_play, tmp_path):
    run = run_play(
        f"""
        - name: Missing, no expectations
          multipush.sftp.verify:
            path: {tmp_path}/nope
            chunk_size: 1024
          register: missing
        - name: Missing, expected size
          multipush.sftp.verify:
            path: {tmp_path}/nope
            size: 10
          register: missing_expected
          ignore_errors: true
        """
    )
    assert run.rc == 0, run
    missing = run["missing"]
    assert not missing.get("failed")
    assert missing["exists"] is False
    assert missing["type"] == "missing"
    assert missing["size"] is None and missing["checksum"] is None and missing["chunk_checksums"] == []
    expected = run["missing_expected"]
    assert expected["failed"] is True
    assert expected["msg"] == f"{tmp_path}/nope: does not exist, expected a file with size 10"
    assert expected["exists"] is False


def test_directory_path(run_play, tmp_path):
    (tmp_path / "d").mkdir(mode=0o750)
    os.chmod(tmp_path / "d", 0o750)
    run = run_play(
        f"""
        - name: Directory
          multipush.sftp.verify:
            path: {tmp_path}/d
            chunk_size: 4096
          register: directory
        - name: Directory where a file is expected
          multipush.sftp.verify:
            path: {tmp_path}/d
            checksum: "00"
          register: directory_expected
          ignore_errors: true
        """
    )
    assert run.rc == 0, run
    directory = run["directory"]
    assert not directory.get("failed")
    assert directory["exists"] is True and directory["type"] == "directory"
    assert directory["mode"] == "0750"
    assert directory["checksum"] is None and directory["chunk_checksums"] == []
    failed = run["directory_expected"]
    assert failed["failed"] is True
    assert failed["msg"] == f"{tmp_path}/d: is a directory, not a regular file, expected a file with checksum 00"


def test_batch_mode_reports_every_file_and_fails_on_mismatches(run_play, tmp_path):
    contents = {name: write_random(tmp_path / name, size) for name, size in
                (("a", 3 * MIB + 1), ("b", 0), ("c", 777), ("d", 2 * MIB), ("e", 12345))}
    digest = {name: hashlib.blake2b(data).hexdigest() for name, data in contents.items()}
    run = run_play(
        f"""
        - name: Batch, all good
          multipush.sftp.verify:
            files:
              - path: {tmp_path}/a
                size: {3 * MIB + 1}
                chunk_size: {MIB}
              - path: {tmp_path}/b
                checksum: {digest["b"]}
              - path: {tmp_path}/c
              - path: {tmp_path}/missing
            checksum_algorithm: blake2b
            threads: 3
          register: good
        - name: Batch with mismatches
          multipush.sftp.verify:
            files:
              - path: {tmp_path}/a
                checksum: {digest["a"]}
              - path: {tmp_path}/c
                size: 778
              - path: {tmp_path}/d
                checksum: {digest["e"]}
                chunk_size: {MIB}
              - path: {tmp_path}/e
                size: 12345
                checksum: {digest["e"]}
              - path: {tmp_path}/missing
                size: 5
            checksum_algorithm: blake2b
          register: mismatched
          ignore_errors: true
        """
    )
    assert run.rc == 0, run
    good = run["good"]
    assert not good.get("failed"), good
    assert good["changed"] is False
    assert [entry["path"] for entry in good["files"]] == [f"{tmp_path}/{name}" for name in ("a", "b", "c", "missing")]
    a, b, c, missing = good["files"]
    assert a["checksum"] == digest["a"]
    assert a["chunk_checksums"] == [hashlib.blake2b(contents["a"][o:o + MIB]).hexdigest()
                                    for o in range(0, 3 * MIB + 1, MIB)]
    assert len(a["chunk_checksums"]) == 4
    assert (b["size"], b["checksum"], b["chunk_checksums"]) == (0, digest["b"], [])
    assert c["checksum"] == digest["c"] and c["chunk_checksums"] == []
    assert missing["exists"] is False and missing["failed"] is False
    assert all(entry["failed"] is False and entry["msg"] is None for entry in good["files"])

    bad = run["mismatched"]
    assert bad["failed"] is True
    entries = {Path(entry["path"]).name: entry for entry in bad["files"]}
    assert list(entries) == ["a", "c", "d", "e", "missing"]
    assert [name for name, entry in entries.items() if entry["failed"]] == ["c", "d", "missing"]
    msg = bad["msg"]
    assert msg.startswith("3 of 5 files failed verification: ")
    assert f"{tmp_path}/c: size is 777, expected 778" in msg
    assert f"{tmp_path}/d: blake2b checksum is {digest['d']}, expected {digest['e']}" in msg
    assert f"{tmp_path}/missing: does not exist, expected a file with size 5" in msg
    assert f"{tmp_path}/a:" not in msg and f"{tmp_path}/e:" not in msg
    assert entries["d"]["chunk_checksums"] == [hashlib.blake2b(contents["d"][o:o + MIB]).hexdigest()
                                               for o in (0, MIB)]
    assert entries["c"]["checksum"] is None  # a size mismatch is not hashed
    assert entries["e"]["checksum"] == digest["e"]


def test_selected_chunk_indexes_only(run_play, tmp_path):
    import hashlib
    import os

    data = os.urandom(5 * 65536 + 11)
    path = tmp_path / "partial.bin"
    path.write_bytes(data)
    run = run_play(f"""
        - name: Two ranges of one file, no whole-file digest
          multipush.sftp.verify:
            files:
              - path: {path}
                chunk_size: 65536
                chunk_indexes: [1, 5]
                get_checksum: false
          register: picked
        """)
    (entry,) = run["picked"]["files"]
    assert entry["checksum"] is None
    assert entry["chunk_checksums"] == [None, hashlib.sha256(data[65536:131072]).hexdigest(), None, None, None,
                                        hashlib.sha256(data[5 * 65536:]).hexdigest()]
