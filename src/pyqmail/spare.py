"""Recycled queue files: finished files are emptied and kept for the next message.

Every message used to cost the queue four new inodes (mess, intd, info and
local or remote) and four freed ones.  On ext4 without a journal (this
project's machines) a freed inode is not reused for about a minute, and every
new file scans past all such inodes, so under load most of the kernel's time
went into allocating queue files (see ../shared/benchmarking.md).  Instead,
a finished file is truncated and renamed into a pool directory, and a new
queue file is made by renaming a spare from the pool to its name.  Names,
contents and the order of writes and fsyncs in the queue stay exactly
qmail's; only where an inode comes from changes.

Two pools, by owner, so that a root install keeps qmail's split: spare/q for
qmail-queue's files (mess, intd; recycled by qmail-clean) and spare/s for
qmail-send's (info, local, remote).  A missing pool directory, or any error,
falls back to plain creation and unlinking.

A spare is used only if it is still an empty regular file with one name: after
a power cut on a filesystem without a journal, a rename may leave a second name
behind, and such a file may be a live message; it is then left alone.
"""

from __future__ import annotations

import os
import random
import stat
import time

POOL_MAX = 5000  # spares per pool; past this, finished files are unlinked as before
_RECOUNT_EVERY = 500  # recycles between two counts of a pool
_EMPTY_PAUSE = 1.0  # seconds before an empty pool is listed again


class SparePool:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.names: list[str] = []
        self.empty_until = 0.0
        self.recycles = 0
        self.full = False

    # -- giving back ----------------------------------------------------------------

    def recycle(self, path: str, name: str) -> bool:
        """Empty the finished file at path and keep it as a spare called name.

        Returns True if the file is gone from path (recycled or already absent),
        False if the caller should unlink it as before.
        """
        if self.recycles % _RECOUNT_EVERY == 0:
            try:
                self.full = len(os.listdir(self.dir)) >= POOL_MAX
            except OSError:
                self.full = True  # no pool here
        self.recycles += 1
        if self.full:
            return False
        try:
            os.truncate(path, 0)
            os.rename(path, f"{self.dir}/{name}")
        except FileNotFoundError:
            return not os.path.exists(path)
        except OSError:
            return False
        return True

    # -- taking ---------------------------------------------------------------------

    def take(self, target: str) -> int | None:
        """Rename a spare to target and open it for writing; None if no spare is left.

        The returned descriptor is positioned at 0 on an empty file whose times are
        now, as a freshly created file's would be.
        """
        for _ in range(64):  # bounded: other processes may be taking the same spares
            if not self.names:
                if time.monotonic() < self.empty_until:
                    return None
                try:
                    self.names = os.listdir(self.dir)
                except OSError:
                    self.names = []
                if not self.names:
                    self.empty_until = time.monotonic() + _EMPTY_PAUSE
                    return None
                # processes that listed the pool together should not all race for the
                # same names
                random.shuffle(self.names)
            name = self.names.pop()
            try:
                os.rename(f"{self.dir}/{name}", target)
            except FileNotFoundError:
                continue  # another process took it first
            except OSError:
                return None
            try:
                fd = os.open(target, os.O_WRONLY | os.O_NOFOLLOW)
            except OSError:
                _drop_name(target)
                return None
            try:
                st = os.fstat(fd)
                clean = stat.S_ISREG(st.st_mode) and st.st_size == 0 and st.st_nlink == 1
                if clean:
                    os.utime(fd)
            except OSError:
                clean = False
            if clean:
                return fd
            # not a clean spare: drop our name for it and touch nothing else
            os.close(fd)
            _drop_name(target)
        return None


def _drop_name(path: str) -> None:
    """Undo a take, so the caller can create path as if no spare had been tried."""
    try:
        os.unlink(path)
    except OSError:
        pass


_pools: dict[str, SparePool] = {}


def pool(queue: object, which: str) -> SparePool:
    """This process's view of queue/spare/<which> ("q" or "s")."""
    directory = f"{queue}/spare/{which}"
    found = _pools.get(directory)
    if found is None:
        found = _pools[directory] = SparePool(directory)
    return found
