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

Finished mess files are kept where they are (`keep_in_place`): the file stays at
mess/N/inode and qmail-clean gives it a second name, `m.<inode>`, in spare/q.
qmail-queue claims such a spare by unlinking that name (an unlink succeeds for one
process only) and writes the next message over it under the same mess name.  No
directory entry in mess/ changes, so the message needs no fsync of its mess/
directory: the entry has been durable since the file's first message was
committed (that commit fsync'd the directory).  With 20 SMTP sessions this cut the
machine's CPU per message by about a tenth.  A claim is refused while the number has a todo
or info file: after a power cut a finished message's unlinks may come back undone, and
qmail-send must never deliver one message's envelope with another's text.  The 36-hour
cleanup passes over mess files with a second name.

The message's envelope file stays too: qmail-clean leaves intd/N in place when it
removes todo/N, and keeps it with the mess file (removing it only when the mess file
is not kept), and qmail-queue writes the next envelope of number N over it in place.
That saves two renames per message (into the pool and out of it), and intd/ no longer
changes from one message to the next: ext4 without a journal writes a file's
directory at the file's next fsync once the file has been given a new name (as every
envelope is, by its todo link), and an unchanged directory costs no disk write there.
qmail-send reads envelopes only through todo/, so an intd file without a todo link is
never delivered from, whatever it holds.

A file is reused only once its removal from the queue is on disk: otherwise a power
cut could bring back an old name (todo/N, info/N) pointing at a new message's data.
qmail-send recycles into spare/s with hold_recycled set and publishes those spares
only after fsyncing the directories they left (QmailSend.release_finished, which also
holds back foop/N until then); qmail-clean fsyncs todo/ before a foop makes anything
claimable (clean._todo_durable).
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

from .constants import SPLIT
from .queue import libc_function

IN_PLACE = "m."  # pool names of finished mess files kept at their queue names
POOL_MAX = 5000  # spares per pool; past this, finished files are unlinked as before
_RECOUNT_EVERY = 500  # recycles between two counts of a pool
_EMPTY_PAUSE = 1.0  # seconds before an empty pool is listed again


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


# no such libc function: link and unlink instead
_renameat2: Any = libc_function(
    "renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
)


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
        self.names: list[str] = []  # spares to rename out of the pool
        self.kept: list[str] = []  # IN_PLACE names: spares still at their mess name
        # per list: when an empty listing may be made again
        self.empty_until = {False: 0.0, True: 0.0}
        self.recycles = 0
        self._nonce = f"{random.getrandbits(24):06x}"  # against a pid an earlier process had
        self.full = False
        # with hold_recycled: names recycled here and not yet published (see publish)
        self.hold_recycled = False
        self.held: set[str] = set()

    # -- giving back ----------------------------------------------------------------

    def recycle(self, path: str, name: str) -> bool:
        """Keep the finished file at path as a spare, under name plus a unique suffix.

        Returns True if the file is gone from path (recycled or already absent),
        False if the caller should unlink it as before.
        """
        if not self._has_room():
            return False
        # message numbers come back soon (mess files are reused at their names), so a
        # spare recycled earlier as plain `name` could still be waiting: pid, nonce and
        # count make this name one no other spare has
        pool_name = f"{name}.{os.getpid()}.{self._nonce}.{self.recycles}"
        try:
            rename_noreplace(path, f"{self.dir}/{pool_name}")
        except FileNotFoundError:
            return not os.path.exists(path)
        except OSError:  # FileExistsError too: a spare is never replaced
            return False
        if self.hold_recycled:
            self.held.add(pool_name)
        return True

    def publish(self) -> None:
        """Let this process take the spares it recycled since the last publish.

        For a pool only this process takes from (qmail-send's): it holds each recycled
        file back until the directory it was removed from has been fsync'd, so that no
        power cut can bring the old name back pointing at a new message's data.
        """
        self.held.clear()

    def _has_room(self) -> bool:
        if self.recycles % _RECOUNT_EVERY == 0:
            try:
                self.full = len(os.listdir(self.dir)) >= POOL_MAX
            except OSError:
                self.full = True  # no pool here
        self.recycles += 1
        return not self.full

    def _marker(self, n: int) -> str:
        return f"{self.dir}/{IN_PLACE}{n}"

    def is_kept_in_place(self, n: int, st: os.stat_result) -> bool:
        """Whether the mess file of number n (whose stat is st) is a spare kept at its name.

        Only this pool's marker makes it one: another second name (a pid/ file left by a
        qmail-queue killed between its link and its unlink) does not.
        """
        try:
            return os.path.samestat(st, os.stat(self._marker(n)))
        except OSError:
            return False

    def keep_in_place(self, path: str, n: int) -> bool:
        """Keep the finished mess file at path (mess/N/n) where it is, as a spare.

        Returns True if it is a spare now (or was already, or is gone), False if the
        caller should remove it as before (no room, no pool, any trouble).
        """
        if not self._has_room():
            return False
        marker = self._marker(n)
        try:
            os.link(path, marker)
        except FileExistsError:
            # asked twice (a foop sent again after a restart): the same file is fine
            try:
                return os.path.samestat(os.lstat(path), os.lstat(marker))
            except FileNotFoundError:
                return not os.path.lexists(path)
            except OSError:
                return False
        except FileNotFoundError:
            return not os.path.lexists(path)
        except OSError:
            return False
        return True

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
            name = self._next(in_place=False)
            if name is None:
                return None
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

    def take_in_place(self, queue: str) -> tuple[int, str] | None:
        """Claim a spare kept at its mess name (see keep_in_place) for a new message.

        Returns (descriptor, mess path) or None if none can be had.  The message
        number is the spare's inode, as for any mess file.  The file still holds old
        bytes and has fresh times; the caller must call finish() once it has written.
        """
        for _ in range(64):  # bounded: other processes may be claiming the same spares
            name = self._next(in_place=True)
            if name is None:
                return None
            number = name[len(IN_PLACE) :]
            if not number.isdigit() or number[0] == "0":
                continue
            n = int(number)
            marker = f"{self.dir}/{name}"
            try:
                # cheap to ask first: other processes list the same pool and claim
                # from it, so many names in this list are gone already
                seen = os.lstat(marker)
            except FileNotFoundError:
                continue
            except OSError:
                return None
            if not stat.S_ISREG(seen.st_mode) or seen.st_ino != n:
                continue
            if seen.st_nlink == 1:
                # its mess name is gone (a cleanup), so nobody can claim it: the marker
                # only keeps the inode from being freed
                _drop_name(marker)
                continue
            if seen.st_nlink != 2:
                continue
            target = f"{queue}/mess/{n % SPLIT}/{n}"
            try:
                fd = os.open(target, os.O_WRONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue  # gone since the lstat; the next look at the marker tells more
            except OSError:
                return None
            try:
                st = os.fstat(fd)
                # utime first: once the marker is gone the file has one name, and the
                # 36-hour cleanup must then already see it as new
                if (
                    os.path.samestat(st, seen)
                    and st.st_nlink == 2
                    and not _numbered_in_queue(queue, n)
                ):
                    os.utime(fd)
                    os.unlink(marker)  # the claim: succeeds for one process only
                    return fd, target
            except OSError:
                pass  # above all FileNotFoundError: another process claimed it first
            os.close(fd)
        return None

    def _next(self, in_place: bool) -> str | None:
        """The next pool name of the kind asked for, listing the pool when none is left."""
        names = self.kept if in_place else self.names
        if not names:
            if time.monotonic() < self.empty_until[in_place]:
                return None
            try:
                listed = os.listdir(self.dir)
            except OSError:
                listed = []
            # processes that listed the pool together should not all race for the
            # same names: each starts at its own place
            turn = random.randrange(len(listed)) if listed else 0
            listed = listed[turn:] + listed[:turn]
            held = self.held
            self.kept = [name for name in listed if name.startswith(IN_PLACE)]
            self.names = [n for n in listed if not n.startswith(IN_PLACE) and n not in held]
            names = self.kept if in_place else self.names
            if not names:
                self.empty_until[in_place] = time.monotonic() + _EMPTY_PAUSE
                return None
        return names.pop()


def _numbered_in_queue(queue: str, n: int) -> bool:
    """Whether message number n has a committed envelope or a delivery state in the queue.

    intd/n alone does not count: it is the kept envelope file of a finished message
    (or of an injection that died), which qmail-send never reads without todo/n.
    """
    for path in (f"{queue}/todo/{n}", f"{queue}/info/{n % SPLIT}/{n}"):
        try:
            os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError:
            return True  # unsure: not a spare
        return True
    return False


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
