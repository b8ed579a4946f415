"""Test data helpers: incompressible files made quickly, digests, tree snapshots."""

from __future__ import annotations

import hashlib
import zlib
import os
import stat
from pathlib import Path

MIB = 1024 * 1024


def random_file(path: Path, size: int, seed: int = 1) -> Path:
    """Incompressible content, different in every 1 MiB block, cheap to make."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = hashlib.sha512(str(seed).encode()).digest() * 16384  # 1 MiB
    with open(path, "wb") as handle:
        written = 0
        counter = 0
        while written < size:
            piece = (counter.to_bytes(8, "big") + block[8:])[: size - written]
            handle.write(piece)
            written += len(piece)
            counter += 1
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def crc32(path: Path) -> str:
    """The file's CRC-32 as push reports it by default (checksum_algorithm: crc32)."""
    value = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(MIB), b""):
            value = zlib.crc32(block, value)
    return f"{value:08x}"


def tree_snapshot(root: Path) -> dict:
    """Relative path -> (kind, content digest or link target, mode, mtime), to compare two trees."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            found[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            found[rel] = ("dir", stat.S_IMODE(info.st_mode), int(info.st_mtime))
        else:
            found[rel] = ("file", sha256(path), stat.S_IMODE(info.st_mode), int(info.st_mtime))
    return found


def leftovers(root: Path) -> list[str]:
    """Temp files of the push left under root."""
    return [str(p) for p in root.rglob("*.multipush.tmp")] if root.exists() else []
