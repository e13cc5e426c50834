"""Recycled queue files: finished files are kept, with their blocks, for the next message.

Every message used to cost the queue four new inodes (mess, intd, info and
local or remote) and four freed ones, with their data blocks.  On ext4 without
a journal (this project's machines) a freed inode is not reused for about a
minute and every new file scans past all such inodes; and with the `discard`
mount option every freed block is discarded on the device before the unlink or
truncate returns.  Under load most of the kernel's time went there (see
../shared/benchmarking.md).  Instead, a finished file is renamed, as it is,
into a pool directory, and a new queue file is made by renaming a spare from
the pool to its name and writing over the old bytes; the writer then cuts the
file to the length it wrote (`finish`), so at most the few blocks past the new
end are freed.  Names, contents and the order of writes and fsyncs in the
queue stay exactly qmail's; only where an inode and its blocks come from
changes.

Two pools, by owner, so that a root install keeps qmail's split: spare/q for
qmail-queue's files (mess, intd; recycled by qmail-clean) and spare/s for
qmail-send's (info, local, remote).  A missing pool directory, or any error,
falls back to plain creation and unlinking.  The pools hold old queue data, so
they are as private as the queue (mode 0700, the queue owner's).

A spare is used only if it is a regular file with a single name: after a power
cut on a filesystem without a journal, a rename may leave a second name behind
(fsck then counts both names), and such a file may be a live message; it is
then left alone.

No rename here ever replaces an existing name (renameat2 RENAME_NOREPLACE, or
link and unlink where the filesystem lacks it).  Pool names repeat, since
message numbers are inodes and inodes come back; a plain rename() then lets two
processes interleave so that one renames a different spare, taken under the
same name, over the mess file the other has just made from the first, and that
message is lost with its todo entry left behind.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import stat
import time
from collections.abc import Callable
from typing import Any

POOL_MAX = 5000  # spares per pool; past this, finished files are unlinked as before
_RECOUNT_EVERY = 500  # recycles between two counts of a pool
_EMPTY_PAUSE = 1.0  # seconds before an empty pool is listed again


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _find_renameat2() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no such libc function: link and unlink instead
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2: Any = _find_renameat2()


def rename_noreplace(src: str, dst: str) -> None:
    """Move src to dst as rename() does, but raise FileExistsError if dst exists."""
    global _renameat2
    if _renameat2 is not None:
        flags = _RENAME_NOREPLACE
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), src, None, dst)
        _renameat2 = None  # this kernel or filesystem cannot: link and unlink from now on
    os.link(src, dst)
    try:
        os.unlink(src)
    except OSError:
        _drop_name(dst)  # not half moved: the file keeps its one old name
        raise


class SparePool:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.names: list[str] = []
        self.empty_until = 0.0
        self.recycles = 0
        self.full = False

    # -- giving back ----------------------------------------------------------------

    def recycle(self, path: str, name: str) -> bool:
        """Keep the finished file at path as a spare called name.

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
        # a spare under this name is still waiting (the message number came back):
        # a second, unique name keeps both rather than freeing the waiting one
        for pool_name in (name, f"{name}.{os.getpid()}.{self.recycles}"):
            try:
                rename_noreplace(path, f"{self.dir}/{pool_name}")
            except FileExistsError:
                continue
            except FileNotFoundError:
                return not os.path.exists(path)
            except OSError:
                return False
            return True
        return False

    def remove(self, path: str, name: str) -> None:
        """Take a finished file out of the queue: kept as a spare if possible, else unlinked.

        Raises OSError as os.unlink does (a file already gone is not an error).
        """
        if not self.recycle(path, name):
            os.unlink(path)

    # -- taking ---------------------------------------------------------------------

    def take(self, target: str) -> int | None:
        """Rename a spare to target and open it for writing; None if no spare is left.

        The returned descriptor is positioned at 0, with the file's times set to now
        as a new file's would be (the 36 h cleanup reads the access time); the file
        still holds old bytes, so the caller must call finish() once it has written
        everything.
        """
        taken = self.take_as(lambda _inode: target)
        return None if taken is None else taken[0]

    def take_as(self, name_for: Callable[[int], str]) -> tuple[int, str] | None:
        """take() to the name name_for(inode) gives: a queue file named by its inode
        (mess/N/inode) is made in one rename, with no pid file to link from.

        Returns (descriptor, name) or None if no spare is left.
        """
        for _ in range(64):  # bounded: other processes may be taking the same spares
            if not self.names:
                if time.monotonic() < self.empty_until:
                    return None
                try:
                    names = os.listdir(self.dir)
                except OSError:
                    names = []
                if not names:
                    self.empty_until = time.monotonic() + _EMPTY_PAUSE
                    return None
                # processes that listed the pool together should not all race for the
                # same names: each starts at its own place
                turn = random.randrange(len(names))
                self.names = names[turn:] + names[:turn]
            name = self.names.pop()
            path = f"{self.dir}/{name}"
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # another process took it first
            except OSError:
                return None
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                continue  # not a clean spare (see above): it stays where it is, unused
            target = name_for(st.st_ino)
            try:
                rename_noreplace(path, target)
            except FileNotFoundError:
                continue
            except OSError:  # above all FileExistsError: a live file is never replaced
                return None
            try:
                fd = os.open(target, os.O_WRONLY | os.O_NOFOLLOW)
            except OSError:
                _drop_name(target)
                return None
            try:
                now = os.fstat(fd)
                # the same file that was checked, still with one name
                clean = (
                    stat.S_ISREG(now.st_mode)
                    and now.st_nlink == 1
                    and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
                )
            except OSError:
                clean = False
            if clean:
                try:
                    os.utime(fd)
                except OSError:
                    clean = False
            if clean:
                return fd, target
            # it changed under us: drop our name for it and touch nothing else
            os.close(fd)
            _drop_name(target)
        return None


def finish(fd: int, length: int) -> None:
    """Cut a file written from offset 0 to the length written (a spare's old tail goes).

    Harmless on a newly created file; call it before the fsync, so the length is
    durable with the data.
    """
    os.ftruncate(fd, length)


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
