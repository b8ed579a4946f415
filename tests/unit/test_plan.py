"""Unit tests for the pure planning functions: sizes, chunking, path mapping, excludes, decisions."""

import os
import socket

import pytest

from ansible_collections.multipush.sftp.plugins.plugin_utils import _plan
from ansible_collections.multipush.sftp.plugins.plugin_utils._plan import MIB, PlanError, RemoteEntry


@pytest.mark.parametrize(
    ("text", "expected"),
    [("65536", 65536), ("64K", 65536), ("64k", 65536), ("16M", 16 * MIB), ("1G", 1024 * MIB), ("1.5GiB", 1536 * MIB),
     ("2MB", 2_000_000), (4096, 4096), (" 8 M ", 8 * MIB)],
)
def test_parse_size_accepts_units(text, expected):
    assert _plan.parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "12Q", "-1M", "0", 0, -5, "1.2.3M", True])
def test_parse_size_rejects_bad_input_naming_the_option(bad):
    with pytest.raises(PlanError, match="chunk_size"):
        _plan.parse_size(bad)


def test_auto_chunk_size_follows_mscp_rule_with_floor_and_ceiling():
    assert _plan.auto_chunk_size(1024 * MIB, 8) == 32 * MIB  # 1 GiB / (8 * 4)
    assert _plan.auto_chunk_size(100 * MIB, 8) == 16 * MIB  # floor
    assert _plan.auto_chunk_size(1024 * 1024 * MIB, 8) == 1024 * MIB  # ceiling
    assert _plan.auto_chunk_size(0, 8) == 16 * MIB
    # rounded up to whole MiB so ranges align with the read blocks
    assert _plan.auto_chunk_size(1000 * MIB + 1, 4) % MIB == 0


def test_chunk_size_for_rejects_tiny_chunks():
    with pytest.raises(PlanError, match="64K"):
        _plan.chunk_size_for(10 * MIB, "1K", 8)
    assert _plan.chunk_size_for(10 * MIB, "1M", 8) == MIB
    assert _plan.chunk_size_for(10 * MIB, "auto", 8) == 16 * MIB


def test_plan_file_splits_into_ranges_covering_the_file_exactly():
    local = _plan.LocalFile(rel="big", path="/x/big", size=10 * MIB + 7, mtime=1.0, mode=0o644)
    file_plan = _plan.plan_file(local, "/r/big", "send", "new", "1M", 8)
    assert len(file_plan.ranges) == 11
    assert file_plan.ranges[0] == (0, MIB)
    assert file_plan.ranges[-1] == (10 * MIB, 7)
    assert sum(length for _offset, length in file_plan.ranges) == local.size
    skipped = _plan.plan_file(local, "/r/big", "skip", "identical", "1M", 8)
    assert skipped.ranges == []


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "vpod"
    (root / "disks").mkdir(parents=True)
    (root / "config" / "nested").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "disks" / "disk1.vmdk").write_bytes(b"x" * 1000)
    (root / "config" / "a b.cfg").write_text("a")
    (root / "config" / "nested" / "ü$(x).txt").write_text("b")
    (root / "config" / "skip.swp").write_text("c")
    (root / "zero").write_bytes(b"")
    os.symlink("disks/disk1.vmdk", root / "link")
    return root


def test_scan_source_lists_files_dirs_links_sorted(tree):
    found = _plan.scan_source(str(tree))
    assert found.is_dir and not found.contents_only
    assert [f.rel for f in found.files] == ["config/a b.cfg", "config/nested/ü$(x).txt", "config/skip.swp",
                                            "disks/disk1.vmdk", "zero"]
    assert [d.rel for d in found.dirs] == ["", "config", "config/nested", "disks", "empty"]
    assert [(link.rel, link.target) for link in found.links] == [("link", "disks/disk1.vmdk")]
    assert found.total_bytes == 1003


def test_scan_source_excludes_by_basename_and_relative_path(tree):
    found = _plan.scan_source(str(tree) + "/", exclude=["*.swp", "config/nested"])
    rels = [f.rel for f in found.files]
    assert "config/skip.swp" not in rels
    assert "config/nested/ü$(x).txt" not in rels
    assert "config/nested" not in [d.rel for d in found.dirs]
    assert found.contents_only


def test_scan_source_follow_resolves_links_and_detects_loops(tree):
    found = _plan.scan_source(str(tree), follow=True)
    assert "link" in [f.rel for f in found.files]
    assert not found.links
    os.symlink("..", tree / "config" / "up")
    with pytest.raises(PlanError, match="symlink loop"):
        _plan.scan_source(str(tree), follow=True)


def test_scan_source_dangling_link_with_follow_is_a_clear_error(tree):
    os.symlink("nowhere", tree / "dangling")
    with pytest.raises(PlanError, match="does not exist"):
        _plan.scan_source(str(tree), follow=True)
    assert "dangling" in [link.rel for link in _plan.scan_source(str(tree)).links]


def test_scan_source_skips_special_files_with_a_warning(tree):
    os.mkfifo(tree / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tree / "sock"))
    try:
        found = _plan.scan_source(str(tree))
    finally:
        sock.close()
    assert len(found.skipped) == 2
    assert all("FIFOs" in message for message in found.skipped)
    assert "pipe" not in [f.rel for f in found.files]


def test_scan_source_missing_and_special_src(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        _plan.scan_source(str(tmp_path / "missing"))
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(PlanError, match="not a regular file"):
        _plan.scan_source(str(tmp_path / "fifo"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(PlanError, match="trailing slash"):
        _plan.scan_source(str(tmp_path / "f") + "/")


def test_scan_source_refuses_names_that_are_not_utf8(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    (root / os.fsdecode(b"bad\xff")).write_text("x")
    with pytest.raises(PlanError, match="not valid UTF-8"):
        _plan.scan_source(str(root))


@pytest.mark.parametrize(
    ("src_slash", "dest", "dest_kind", "expected_root"),
    [
        (False, "/srv/copy", None, "/srv/copy/vpod"),
        (False, "/srv/copy", "directory", "/srv/copy/vpod"),
        (True, "/srv/copy", None, "/srv/copy"),
        (True, "/srv/copy/", "directory", "/srv/copy"),
        (True, "/", "directory", "/"),
    ],
)
def test_directory_mapping_follows_trailing_slash_rule(tree, src_slash, dest, dest_kind, expected_root):
    found = _plan.scan_source(str(tree) + ("/" if src_slash else ""))
    assert _plan.dest_root(found, dest, dest_kind) == expected_root
    assert _plan.file_dest(found, dest, dest_kind, "config/a b.cfg") == expected_root.rstrip("/") + "/config/a b.cfg"


def test_directory_src_onto_remote_file_is_refused(tree):
    found = _plan.scan_source(str(tree))
    with pytest.raises(PlanError, match="not a directory|as a file"):
        _plan.dest_root(found, "/srv/file", "file")


def test_single_file_mapping(tmp_path):
    (tmp_path / "image.bin").write_bytes(b"1")
    found = _plan.scan_source(str(tmp_path / "image.bin"))
    assert _plan.file_dest(found, "/srv/new.bin", None, "image.bin") == "/srv/new.bin"
    assert _plan.file_dest(found, "/srv/", None, "image.bin") == "/srv/image.bin"
    assert _plan.file_dest(found, "/srv", "directory", "image.bin") == "/srv/image.bin"
    assert _plan.file_dest(found, "/srv/old.bin", "file", "image.bin") == "/srv/old.bin"
    with pytest.raises(PlanError, match="other|as a"):
        _plan.file_dest(found, "/srv/dev", "other", "image.bin")


def test_remote_dirs_are_ordered_parents_first(tree):
    found = _plan.scan_source(str(tree) + "/")
    paths = [path for path, _local in _plan.remote_dirs_to_create(found, "/srv/x", None)]
    assert paths[0] == "/srv/x"
    assert paths.index("/srv/x/config") < paths.index("/srv/x/config/nested")


def test_temp_path_is_stable_per_source_version_and_distinct_between_sources():
    one = _plan.LocalFile(rel="a", path="/src/a", size=10, mtime=100.5, mode=0o644)
    again = _plan.LocalFile(rel="a", path="/src/a", size=10, mtime=100.5, mode=0o600)
    edited = _plan.LocalFile(rel="a", path="/src/a", size=10, mtime=101.0, mode=0o644)
    other = _plan.LocalFile(rel="a", path="/other/a", size=10, mtime=100.5, mode=0o644)
    temp = _plan.temp_path("/dst/a", one)
    assert temp.startswith("/dst/.a.") and temp.endswith(_plan.TEMP_SUFFIX)
    assert temp == _plan.temp_path("/dst/a", again)
    assert temp != _plan.temp_path("/dst/a", edited)
    assert temp != _plan.temp_path("/dst/a", other)
    long_name = "n" * 250
    assert len(_plan.temp_path("/dst/" + long_name, one).rsplit("/", 1)[1].encode()) <= 255


LOCAL = _plan.LocalFile(rel="f", path="/src/f", size=100, mtime=1700000000.7, mode=0o644)


@pytest.mark.parametrize(
    ("remote", "compare", "force", "digests", "expected"),
    [
        (None, "size_mtime", True, (None, None), ("send", "new")),
        (RemoteEntry("file", 100, 1700000000), "size_mtime", True, (None, None), ("skip", "same size and mtime")),
        (RemoteEntry("file", 100, 1700000001), "size_mtime", True, (None, None), ("send", "mtime")),
        (RemoteEntry("file", 99, 1700000000), "size_mtime", True, (None, None), ("send", "size")),
        (RemoteEntry("file", 99, 1700000000), "size_mtime", False, (None, None), ("skip", "exists")),
        (RemoteEntry("link", 5, 0), "size_mtime", True, (None, None), ("send", "type")),
        (RemoteEntry("file", 100, 1700000000), "checksum", True, ("aa", "aa"), ("skip", "same checksum")),
        (RemoteEntry("file", 100, 1700000000), "checksum", True, ("aa", "bb"), ("send", "checksum")),
        (RemoteEntry("file", 100, 5), "checksum", True, ("aa", "aa"), ("skip", "same checksum")),
        (RemoteEntry("link", 5, 0, leads_to="file"), "size_mtime", False, (None, None), ("skip", "exists")),
    ],
)
def test_decide(remote, compare, force, digests, expected):
    assert _plan.decide(LOCAL, remote, compare, force, *digests) == expected


def test_a_link_to_a_directory_is_a_directory_for_the_tree_and_anything_else_is_refused_by_name():
    to_dir = _plan.leading_to(RemoteEntry("link", 10), "directory")
    assert to_dir.is_directory and to_dir.kind == "link"
    _plan.check_directory_place("/r/current", "", to_dir)
    _plan.check_directory_place("/r/new", "new", None)
    for entry, words in ((_plan.leading_to(RemoteEntry("link"), None), "dangles"),
                         (_plan.leading_to(RemoteEntry("link"), "file"), "points to a file"),
                         (RemoteEntry("link"), "does not lead to a directory")):
        assert not entry.is_directory
        with pytest.raises(PlanError, match=words) as refused:
            _plan.check_directory_place("/r/data", "data", entry)
        assert "symlink at '/r/data'" in str(refused.value) and "'data' of src" in str(refused.value)
    with pytest.raises(PlanError, match="a file at '/r/data' where a directory should go"):
        _plan.check_directory_place("/r/data", "data", RemoteEntry("file"))


def test_dest_that_is_a_link_to_a_directory_receives_like_a_directory(tree):
    tree_info = _plan.scan_source(str(tree) + "/")
    assert _plan.dest_root(tree_info, "/srv/current", "directory") == "/srv/current"
    with pytest.raises(PlanError, match="symlink on the target that does not lead to a directory"):
        _plan.dest_root(tree_info, "/srv/current", "link")
    single = _plan.scan_source(str(tree / "disks" / "disk1.vmdk"))
    assert _plan.file_dest(single, "/srv/current", "directory", "disk1.vmdk") == "/srv/current/disk1.vmdk"
    # a link to a file where the file goes: the path itself, which decide() replaces (force) or keeps
    assert _plan.file_dest(single, "/srv/app.img", "link", "disk1.vmdk") == "/srv/app.img"


def test_decide_refuses_directory_in_place_of_file():
    with pytest.raises(PlanError, match="directory"):
        _plan.decide(LOCAL, RemoteEntry("directory"), "size_mtime", True)


def test_small_file_batches_give_every_connection_a_share_and_keep_file_order():
    batches = _plan.small_file_batches([1000] * 300, connections=8)
    assert [index for batch in batches for index in batch] == list(range(300))
    assert len(batches) == 8 and max(len(batch) for batch in batches) == 38


def test_small_file_batches_are_capped_in_files_and_bytes():
    many = _plan.small_file_batches([10] * 1000, connections=2)
    assert max(len(batch) for batch in many) == _plan.BATCH_MAX_FILES
    heavy = _plan.small_file_batches([_plan.SMALL_FILE_LIMIT] * 20, connections=1)
    assert all(len(batch) * _plan.SMALL_FILE_LIMIT <= _plan.BATCH_MAX_BYTES for batch in heavy)
    assert sum(len(batch) for batch in heavy) == 20


def test_small_file_batches_of_nothing_and_of_one():
    assert _plan.small_file_batches([], connections=8) == []
    assert _plan.small_file_batches([5], connections=8) == [[0]]
    assert _plan.small_file_batches([0, 0, 0], connections=1) == [[0, 1, 2]]
