"""multipush.sftp.verify takes chunk_size with the same units as multipush.sftp.push (issue 23)."""

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.multipush.sftp.plugins.modules import verify
from ansible_collections.multipush.sftp.plugins.plugin_utils._plan import PlanError, parse_size

SIZES = ["64M", "64m", "16MiB", "1G", "1.5GiB", "512K", "512 KiB", "64MB", "1TB", "2T", "65536", 65536, " 7 b "]
NOT_SIZES = ["64X", "lots", "-1M", "1.2.3", "", "M"]


@pytest.mark.parametrize("value", SIZES)
def test_verify_reads_a_size_as_push_does(value):
    assert verify.parse_size(value) == parse_size(value, "chunk_size")


@pytest.mark.parametrize("value", NOT_SIZES)
def test_verify_refuses_what_push_refuses(value):
    with pytest.raises(PlanError):
        parse_size(value, "chunk_size")
    with pytest.raises(ValueError):
        verify.parse_size(value)


def run_module(args, capsys):
    with patch_module_args(args):
        with pytest.raises(SystemExit):
            verify.main()
    return json.loads(capsys.readouterr().out)


def test_chunk_size_with_a_unit_gives_the_ranges_of_that_size(tmp_path, capsys):
    path = tmp_path / "data.bin"
    path.write_bytes(b"x" * (3 * 1024 + 5))
    with_unit = run_module({"path": str(path), "chunk_size": "1K", "checksum_algorithm": "crc32"}, capsys)
    in_bytes = run_module({"path": str(path), "chunk_size": 1024, "checksum_algorithm": "crc32"}, capsys)
    assert not with_unit.get("failed"), with_unit
    assert len(with_unit["chunk_checksums"]) == 4
    assert with_unit["chunk_checksums"] == in_bytes["chunk_checksums"]
    batch = run_module({"files": [{"path": str(path), "chunk_size": "2K"}], "checksum_algorithm": "crc32"}, capsys)
    assert len(batch["files"][0]["chunk_checksums"]) == 2


def test_a_bad_size_names_the_option_and_the_units(tmp_path, capsys):
    path = tmp_path / "data.bin"
    path.write_bytes(b"x")
    result = run_module({"path": str(path), "chunk_size": "64X"}, capsys)
    assert result["failed"]
    assert result["msg"] == ("chunk_size='64X' is not a size: use a number of bytes or a number with a unit "
                             "such as 512K, 64M or 1G")
    result = run_module({"path": str(path), "chunk_size": "0M"}, capsys)
    assert result["failed"] and result["msg"] == "chunk_size must be greater than 0, got 0"
