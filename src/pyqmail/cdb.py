"""The cdb constant database (D. J. Bernstein's format), for users/cdb and morercpthosts.cdb."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path


def cdb_hash(key: bytes) -> int:
    h = 5381
    for c in key:
        h = (((h << 5) + h) & 0xFFFFFFFF) ^ c
    return h


class CDB:
    """Read-only access to a cdb file held in memory (these files are small)."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 2048:
            raise ValueError("cdb file too short")
        self.data = data

    @classmethod
    def open(cls, path: Path | str) -> CDB:
        return cls(Path(path).read_bytes())

    @classmethod
    def open_cached(cls, path: str) -> CDB:
        """open(path), reusing this process's last copy while the file is unchanged.

        cdb files are replaced by rename, never rewritten in place (tcprules,
        qmail-newu, qmail-newmrh), so the same inode, size and times mean the same
        contents: a long-lived process pays a stat per lookup instead of a read of
        the whole file.
        """
        st = os.stat(path)
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = _open_cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        db = cls.open(path)
        if len(_open_cache) >= 64:
            _open_cache.clear()
        _open_cache[path] = (stamp, db)
        return db

    def get(self, key: bytes) -> bytes | None:
        data = self.data
        h = cdb_hash(key)
        pos, slots = struct.unpack_from("<II", data, (h & 255) * 8)
        if slots == 0:
            return None
        start = (h >> 8) % slots
        for i in range(slots):
            slot_pos = pos + ((start + i) % slots) * 8
            slot_hash, rec = struct.unpack_from("<II", data, slot_pos)
            if rec == 0:
                return None
            if slot_hash == h:
                klen, dlen = struct.unpack_from("<II", data, rec)
                if data[rec + 8 : rec + 8 + klen] == key:
                    return data[rec + 8 + klen : rec + 8 + klen + dlen]
        return None


def cdb_build(records: Iterable[tuple[bytes, bytes]]) -> bytes:
    out = bytearray(2048)
    tables: list[list[tuple[int, int]]] = [[] for _ in range(256)]
    for key, value in records:
        h = cdb_hash(key)
        tables[h & 255].append((h, len(out)))
        out += struct.pack("<II", len(key), len(value)) + key + value
    header = bytearray()
    for entries in tables:
        slots = len(entries) * 2
        header += struct.pack("<II", len(out), slots)
        table = [(0, 0)] * slots
        for h, rec in entries:
            i = (h >> 8) % slots
            while table[i][1] != 0:
                i = (i + 1) % slots
            table[i] = (h, rec)
        for h, rec in table:
            out += struct.pack("<II", h, rec)
    out[0:2048] = header
    return bytes(out)


def cdb_write(path: Path | str, records: Iterable[tuple[bytes, bytes]]) -> None:
    """Build `<path>.tmp`, fsync, rename: readers see the old or the new file, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    data = cdb_build(records)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


_open_cache: dict[str, tuple[tuple[int, ...], CDB]] = {}
