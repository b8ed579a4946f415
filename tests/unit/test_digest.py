"""Unit tests for plugins/module_utils/_digest.py: ranges, whole and per-range digests, batches."""

import binascii
import gc
import hashlib
import os
import zlib

import pytest

from ansible_collections.multipush.sftp.plugins.module_utils import _digest

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def random_bytes():
    # Not a multiple of anything interesting: 3 MiB + 12345 bytes.
    return os.urandom(3 * MIB + 12345)


@pytest.fixture
def big_file(tmp_path, random_bytes):
    path = tmp_path / "big.bin"
    path.write_bytes(random_bytes)
    return path


def slices(data, chunk_size):
    return [data[offset:offset + chunk_size] for offset in range(0, len(data), chunk_size)]


# -- split_ranges ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("size", "chunk", "expected"),
    [
        (0, 10, []),
        (1, 10, [(0, 1)]),
        (1, 1, [(0, 1)]),
        (10, 10, [(0, 10)]),
        (30, 10, [(0, 10), (10, 10), (20, 10)]),
        (31, 10, [(0, 10), (10, 10), (20, 10), (30, 1)]),
        (29, 10, [(0, 10), (10, 10), (20, 9)]),
        (9, 10, [(0, 9)]),
        (3, 1, [(0, 1), (1, 1), (2, 1)]),
    ],
)
def test_split_ranges_edge_cases(size, chunk, expected):
    assert _digest.split_ranges(size, chunk) == expected


@pytest.mark.parametrize(("size", "chunk"), [(1, 1), (100, 7), (16 * MIB, 4 * MIB), (16 * MIB + 1, 4 * MIB),
                                             (5 * MIB - 3, MIB), (12345678, 999)])
def test_split_ranges_tile_the_file_in_ceil_size_over_chunk_pieces(size, chunk):
    ranges = _digest.split_ranges(size, chunk)
    assert len(ranges) == -(-size // chunk)
    assert ranges[0][0] == 0
    for (offset, length), (next_offset, _next_length) in zip(ranges, ranges[1:]):
        assert length == chunk
        assert offset + length == next_offset
    last_offset, last_length = ranges[-1]
    assert last_offset + last_length == size
    assert 0 < last_length <= chunk


@pytest.mark.parametrize("chunk", [0, -1, -4096])
def test_split_ranges_rejects_non_positive_chunk_size(chunk):
    with pytest.raises(ValueError, match="chunk_size"):
        _digest.split_ranges(100, chunk)


def test_split_ranges_rejects_negative_size_and_non_integers():
    with pytest.raises(ValueError, match="size"):
        _digest.split_ranges(-1, 10)
    with pytest.raises(TypeError):
        _digest.split_ranges(10, 2.5)
    with pytest.raises(TypeError):
        _digest.split_ranges(10, True)


# -- new_hasher --------------------------------------------------------------------------------

def reference(algorithm: str, data: bytes) -> str:
    """The digest as another implementation computes it."""
    if algorithm == "crc32":
        return f"{binascii.crc32(data):08x}"
    return hashlib.new(algorithm, data).hexdigest()


def test_algorithms_are_the_documented_ones():
    assert _digest.ALGORITHMS == ("crc32", "md5", "sha1", "sha224", "sha256", "sha384", "sha512", "blake2b")


@pytest.mark.parametrize("algorithm", _digest.ALGORITHMS)
def test_new_hasher_matches_hashlib(algorithm):
    hasher = _digest.new_hasher(algorithm)
    hasher.update(b"multipush")
    assert hasher.hexdigest() == reference(algorithm, b"multipush")


def test_crc32_is_the_zip_crc_in_eight_hex_digits_fed_in_pieces():
    assert _digest.new_hasher("crc32").hexdigest() == "00000000"
    hasher = _digest.new_hasher("crc32")
    hasher.update(b"1234")
    copy = hasher.copy()
    hasher.update(memoryview(b"56789"))
    assert hasher.hexdigest() == "cbf43926"  # the check value of CRC-32/ISO-HDLC for "123456789"
    assert hasher.digest() == bytes.fromhex("cbf43926")
    assert copy.hexdigest() == f"{zlib.crc32(b'1234'):08x}"  # the copy did not see the later bytes
    data = os.urandom(3 * MIB + 7)
    hasher = _digest.new_hasher("crc32")
    for piece in slices(data, 65536):
        hasher.update(piece)
    assert hasher.hexdigest() == reference("crc32", data)


def test_a_crc32_function_given_is_the_one_every_reader_hashes_with(tmp_path):
    """The controller passes its CRC-32 (plugin_utils/_fast_crc) as crc32=; nothing global changes."""
    path = tmp_path / "data"
    data = os.urandom(2 * MIB + 5)
    path.write_bytes(data)
    seen = []

    def counting(piece, value=0):
        seen.append(len(piece))
        return zlib.crc32(piece, value)

    expected = reference("crc32", data)
    assert _digest.file_digest(str(path), "crc32", crc32=counting) == expected
    assert _digest.range_digest(str(path), 0, len(data), "crc32", crc32=counting) == expected
    whole, chunks = _digest.digest_file(str(path), "crc32", MIB, threads=2, crc32=counting)
    assert whole == expected and chunks == _digest.digest_file(str(path), "crc32", MIB)[1]
    assert _digest.hash_many([(str(path), MIB, True, [1])], "crc32", crc32=counting)[0][1][1] == chunks[1]
    assert sum(seen) == 5 * len(data) + MIB  # every byte read went through it (whole passes and ranges)
    assert _digest.new_hasher("sha256", crc32=counting).name == "sha256"  # only crc32 hashers take it


@pytest.mark.parametrize("bad", ["sha3_256", "SHA256", "CRC32", "crc32c", "", "blake2s"])
def test_new_hasher_rejects_bad_algorithm_naming_it_and_the_allowed_list(bad):
    with pytest.raises(ValueError) as info:
        _digest.new_hasher(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert "crc32, md5, sha1, sha224, sha256, sha384, sha512, blake2b" in message


# -- file_digest / range_digest ---------------------------------------------------------------

@pytest.mark.parametrize("algorithm", _digest.ALGORITHMS)
def test_file_digest_every_algorithm_equals_hashlib(big_file, random_bytes, algorithm):
    assert _digest.file_digest(str(big_file), algorithm) == reference(algorithm, random_bytes)


def test_file_digest_small_block_size_and_empty_file(tmp_path, big_file, random_bytes):
    assert _digest.file_digest(big_file, "sha256", block_size=4096) == hashlib.sha256(random_bytes).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert _digest.file_digest(empty, "sha256") == hashlib.sha256(b"").hexdigest()


def test_range_digest_on_path_and_fd(big_file, random_bytes):
    offset, length = 1000, 2 * MIB + 17
    expected = hashlib.sha1(random_bytes[offset:offset + length]).hexdigest()
    assert _digest.range_digest(str(big_file), offset, length, "sha1") == expected
    fd = os.open(big_file, os.O_RDONLY)
    try:
        os.lseek(fd, 77, os.SEEK_SET)
        assert _digest.range_digest(fd, offset, length, "sha1") == expected
        assert os.lseek(fd, 0, os.SEEK_CUR) == 77  # pread leaves the file position alone
    finally:
        os.close(fd)
    assert _digest.range_digest(str(big_file), 5, 0, "md5") == hashlib.md5(b"").hexdigest()


def test_range_digest_past_end_of_file_raises(big_file, random_bytes):
    with pytest.raises(_digest.ShortReadError, match="ended at byte"):
        _digest.range_digest(str(big_file), len(random_bytes) - 10, 20, "sha256")


# -- digest_file ---------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("algorithm", _digest.ALGORITHMS)
def test_digest_file_whole_and_chunks_equal_hashlib(big_file, random_bytes, algorithm, threads):
    chunk = MIB
    whole, chunks = _digest.digest_file(str(big_file), algorithm, chunk_size=chunk, threads=threads)
    assert whole == reference(algorithm, random_bytes)
    assert chunks == [reference(algorithm, piece) for piece in slices(random_bytes, chunk)]
    assert len(chunks) == 4


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("chunk", [1, 4096, 1000003, MIB, 3 * MIB + 12345, 10 * MIB])
def test_digest_file_chunk_sizes(big_file, random_bytes, chunk, threads):
    if chunk == 1:
        data = random_bytes[:300]
        big_file.write_bytes(data)
    else:
        data = random_bytes
    whole, chunks = _digest.digest_file(big_file, "md5", chunk_size=chunk, threads=threads)
    assert whole == hashlib.md5(data).hexdigest()
    assert chunks == [hashlib.md5(piece).hexdigest() for piece in slices(data, chunk)]


def test_digest_file_without_chunks_and_without_whole(big_file, random_bytes):
    assert _digest.digest_file(big_file, "sha256") == (hashlib.sha256(random_bytes).hexdigest(), [])
    whole, chunks = _digest.digest_file(big_file, "sha256", chunk_size=2 * MIB, threads=4, whole=False)
    assert whole is None
    assert chunks == [hashlib.sha256(piece).hexdigest() for piece in slices(random_bytes, 2 * MIB)]


@pytest.mark.parametrize("threads", [1, 4])
def test_digest_file_zero_byte_file(tmp_path, threads):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert _digest.digest_file(empty, "sha512", chunk_size=MIB, threads=threads) == (
        hashlib.sha512(b"").hexdigest(), [])


def test_digest_file_bad_algorithm(big_file):
    with pytest.raises(ValueError, match="'whirlpool'"):
        _digest.digest_file(big_file, "whirlpool", chunk_size=MIB)


def test_digest_file_bad_chunk_size_and_threads(big_file):
    with pytest.raises(ValueError, match="chunk_size"):
        _digest.digest_file(big_file, "sha256", chunk_size=0)
    with pytest.raises(ValueError, match="threads"):
        _digest.digest_file(big_file, "sha256", threads=0)


def test_digest_file_missing_file_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        _digest.digest_file(tmp_path / "nope", "sha256", chunk_size=MIB)


def test_digest_file_reads_are_bounded(big_file, random_bytes, monkeypatch):
    sizes = []
    real_preadv = os.preadv

    def spy(fd, buffers, offset):
        sizes.append(sum(len(buffer) for buffer in buffers))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(_digest.os, "preadv", spy)
    whole, _chunks = _digest.digest_file(big_file, "sha256", chunk_size=MIB, threads=4)
    assert whole == hashlib.sha256(random_bytes).hexdigest()
    assert max(sizes) <= _digest.DEFAULT_BLOCK_SIZE
    # whole pass + the ranges: every byte read twice, in concurrent passes
    assert sum(sizes) == 2 * len(random_bytes)


def test_digest_file_single_thread_reads_each_byte_once(big_file, random_bytes, monkeypatch):
    total = []
    real_preadv = os.preadv

    def spy(fd, buffers, offset):
        total.append(sum(len(buffer) for buffer in buffers))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(_digest.os, "preadv", spy)
    _digest.digest_file(big_file, "sha256", chunk_size=MIB, threads=1)
    assert sum(total) == len(random_bytes)


def test_reads_reuse_their_buffers_across_calls(big_file):
    """A long-lived hashing service must not ask the kernel for fresh memory on every read."""
    _digest.digest_file(big_file, "crc32", chunk_size=MIB, threads=1)
    spare = list(_digest._SPARE_BUFFERS)
    assert spare and all(len(buffer) == _digest.DEFAULT_BLOCK_SIZE for buffer in spare)
    _digest.digest_file(big_file, "crc32", chunk_size=MIB, threads=1)
    assert all(any(buffer is kept for kept in _digest._SPARE_BUFFERS) for buffer in spare)
    assert len(_digest._SPARE_BUFFERS) <= _digest.MAX_DEFAULT_THREADS


def test_without_preadv_the_digests_are_the_same(big_file, random_bytes, monkeypatch):
    expected = _digest.digest_file(big_file, "sha256", chunk_size=MIB, threads=2)
    monkeypatch.delattr(_digest.os, "preadv")
    assert _digest.digest_file(big_file, "sha256", chunk_size=MIB, threads=2) == expected
    assert expected[0] == hashlib.sha256(random_bytes).hexdigest()
    with open(big_file, "r+b") as stream:
        stream.truncate(100)
    with pytest.raises(_digest.ShortReadError):
        _digest.range_digest(big_file, 0, 200, "crc32")


def test_digest_file_detects_a_file_changed_while_hashing(big_file, monkeypatch):
    real_preadv = os.preadv
    touched = []

    def preadv_then_append(fd, buffers, offset):
        count = real_preadv(fd, buffers, offset)
        if not touched:
            touched.append(True)
            with open(big_file, "ab") as stream:
                stream.write(b"more")
        return count

    monkeypatch.setattr(_digest.os, "preadv", preadv_then_append)
    with pytest.raises(_digest.FileChangedError, match="changed while it was being hashed"):
        _digest.digest_file(big_file, "sha256", chunk_size=MIB, threads=2)


def test_digest_file_detects_a_file_that_shrank(big_file, monkeypatch):
    real_preadv = os.preadv
    state = {"done": False}

    def preadv_then_truncate(fd, buffers, offset):
        count = real_preadv(fd, buffers, offset)
        if not state["done"]:
            state["done"] = True
            os.truncate(big_file, 100)
        return count

    monkeypatch.setattr(_digest.os, "preadv", preadv_then_truncate)
    with pytest.raises(_digest.ShortReadError, match="big.bin"):
        _digest.digest_file(big_file, "sha256", chunk_size=MIB, threads=1)


# -- hash_many ---------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 3, 8])
def test_hash_many_mixed_files_in_order(tmp_path, random_bytes, threads):
    contents = {
        "a": random_bytes,
        "b": b"",
        "c": b"x",
        "d": random_bytes[: 2 * MIB],
        "e": random_bytes[7: MIB + 9],
    }
    specs = []
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    chunk_for = {"a": MIB, "b": MIB, "c": None, "d": 512 * 1024, "e": 4 * MIB}
    specs = [(str(tmp_path / name), chunk_for[name]) for name in contents]
    results = _digest.hash_many(specs, "blake2b", threads=threads)
    assert len(results) == len(specs)
    for (name, data), (whole, chunks) in zip(contents.items(), results):
        assert whole == hashlib.blake2b(data).hexdigest(), name
        expected = [] if chunk_for[name] is None else [hashlib.blake2b(p).hexdigest()
                                                       for p in slices(data, chunk_for[name])]
        assert chunks == expected, name


def test_hash_many_return_exceptions_keeps_going(tmp_path):
    good = tmp_path / "good"
    good.write_bytes(b"hello" * 1000)
    missing = tmp_path / "missing"
    results = _digest.hash_many([(str(good), 1000), (str(missing), None), (str(good), None)], "sha1",
                                threads=2, return_exceptions=True)
    assert results[0] == (hashlib.sha1(b"hello" * 1000).hexdigest(),
                          [hashlib.sha1(b"hello" * 200).hexdigest()] * 5)
    assert isinstance(results[1], FileNotFoundError)
    assert results[1].filename == str(missing)
    assert results[2] == (hashlib.sha1(b"hello" * 1000).hexdigest(), [])
    with pytest.raises(FileNotFoundError):
        _digest.hash_many([(str(good), None), (str(missing), None)], "sha1", threads=2)


def test_hash_many_read_error_is_reported_for_that_file_only(tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    bad.write_bytes(b"b" * (3 * MIB))
    good = tmp_path / "good"
    good.write_bytes(b"g" * (3 * MIB))
    bad_fd = []
    real_open, real_preadv = os.open, os.preadv

    def spy_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        if str(path) == str(bad):
            bad_fd.append(fd)
        return fd

    def failing_preadv(fd, buffers, offset):
        if fd in bad_fd and offset >= MIB:
            raise OSError(5, "Input/output error")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(_digest.os, "open", spy_open)
    monkeypatch.setattr(_digest.os, "preadv", failing_preadv)
    results = _digest.hash_many([(str(bad), MIB), (str(good), MIB)], "sha256", threads=4, return_exceptions=True)
    assert isinstance(results[0], OSError) and results[0].errno == 5
    assert results[1][0] == hashlib.sha256(b"g" * (3 * MIB)).hexdigest()
    assert results[1][1] == [hashlib.sha256(b"g" * MIB).hexdigest()] * 3


def test_hash_many_closes_every_descriptor(tmp_path):
    paths = []
    for index in range(20):
        path = tmp_path / str(index)
        path.write_bytes(os.urandom(1000 + index))
        paths.append((str(path), 300))
    gc.collect()  # descriptors of earlier tests' garbage must not close during the count
    before = len(os.listdir("/proc/self/fd"))
    _digest.hash_many(paths + [(str(tmp_path / "missing"), None)], "md5", threads=4, return_exceptions=True)
    assert len(os.listdir("/proc/self/fd")) == before


def test_hash_many_empty_batch_and_bad_arguments(tmp_path):
    assert _digest.hash_many([], "sha256", threads=2) == []
    with pytest.raises(ValueError, match="'nope'"):
        _digest.hash_many([(str(tmp_path), None)], "nope")
    with pytest.raises(ValueError, match="chunk_size"):
        _digest.hash_many([(str(tmp_path), -5)], "sha256")


def test_default_threads_between_1_and_8():
    assert 1 <= _digest.default_threads() <= 8
    assert _digest.default_threads() == min(8, os.cpu_count() or 1)


@pytest.mark.parametrize("threads", [1, 3])
def test_hash_many_with_selected_ranges_hashes_only_those(tmp_path, threads):
    data = os.urandom(10 * 1000 + 7)
    path = tmp_path / "sel.bin"
    path.write_bytes(data)
    whole, chunks = _digest.hash_many([(str(path), 1000, False, [2, 7, 99])], "sha256", threads=threads)[0]
    assert whole is None
    assert chunks[2] == hashlib.sha256(data[2000:3000]).hexdigest()
    assert chunks[7] == hashlib.sha256(data[7000:8000]).hexdigest()
    assert [index for index, digest in enumerate(chunks) if digest is not None] == [2, 7]
    whole, chunks = _digest.hash_many([(str(path), 1000, True, [10])], "sha256", threads=threads)[0]
    assert whole == hashlib.sha256(data).hexdigest()
    assert chunks[10] == hashlib.sha256(data[10000:]).hexdigest()
    assert chunks.count(None) == 10


def test_hashing_service_answers_like_the_verify_module_when_run_by_a_shell(tmp_path):
    """The command and bootstrap the push runs on the target over SSH, run here by /bin/sh: the service
    gets its own source and the request on stdin and answers with describe_files' entries."""
    import json
    import subprocess

    from ansible_collections.multipush.sftp.plugins.plugin_utils._remote_hash import _service_source, hasher_command

    data = os.urandom(3 * 65536 + 5)
    (tmp_path / "a.bin").write_bytes(data)
    requests = [{"path": str(tmp_path / "a.bin"), "chunk_size": 65536, "chunk_indexes": [1, 3], "get_checksum": True},
                {"path": str(tmp_path / "missing")}]
    source = _service_source()
    payload = json.dumps({"files": requests, "algorithm": "sha256", "get_checksum": False}).encode()
    ran = subprocess.run(["/bin/sh", "-c", hasher_command(None)], input=f"{len(source)}\n".encode() + source + payload,
                         capture_output=True, check=False, timeout=60)
    assert ran.returncode == 0, ran.stderr
    answer = json.loads(ran.stdout)["files"]
    assert answer == json.loads(json.dumps(_digest.describe_files(requests, "sha256", False, 2)))
    assert answer[0]["checksum"] == hashlib.sha256(data).hexdigest()
    assert answer[0]["chunk_checksums"][1] == hashlib.sha256(data[65536:131072]).hexdigest()
    assert answer[0]["chunk_checksums"][0] is None  # only the ranges asked for
    assert answer[1]["exists"] is False


def test_hashing_service_answers_each_request_line_until_stdin_ends(tmp_path):
    """The service stays up for a whole push: one answer line per request line, in order."""
    import json
    import subprocess

    from ansible_collections.multipush.sftp.plugins.plugin_utils._remote_hash import _service_source, hasher_command

    first, second = os.urandom(70000), os.urandom(5)
    (tmp_path / "first.bin").write_bytes(first)
    (tmp_path / "second bin\n$(x)").write_bytes(second)
    requests = [
        {"files": [{"path": str(tmp_path / "first.bin"), "chunk_size": 65536, "chunk_indexes": [1]}],
         "algorithm": "crc32", "get_checksum": False},
        {"files": [{"path": str(tmp_path / "second bin\n$(x)")}], "algorithm": "sha256", "get_checksum": True},
        {"files": [{"path": str(tmp_path / "gone")}], "algorithm": "crc32", "get_checksum": True},
    ]
    source = _service_source()
    stdin = f"{len(source)}\n".encode() + source + b"".join(json.dumps(r).encode() + b"\n" for r in requests)
    ran = subprocess.run(["/bin/sh", "-c", hasher_command(None)], input=stdin, capture_output=True, check=False,
                         timeout=60)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.decode().splitlines()
    assert len(lines) == 3, lines
    answers = [json.loads(line)["files"] for line in lines]
    assert answers[0][0]["chunk_checksums"] == [None, f"{zlib.crc32(first[65536:]):08x}"]
    assert answers[0][0]["checksum"] is None
    assert answers[1][0]["checksum"] == hashlib.sha256(second).hexdigest()
    assert answers[2][0]["exists"] is False
