"""Process names as ps, top and perf show them (Linux's comm), one per qmail program.

Every pyqmail process is a fork of one Python interpreter, so without this they all
show up as `pyqmail`: naming them qmail-send, qmail-smtpd, qmail-local... lets an
administrator (and a profiler) tell them apart, as with qmail's separate binaries.
The command line (`ps -f`, pgrep -f) stays that of the program that was started.
"""

from __future__ import annotations

import os

COMM_MAX = 15  # the kernel keeps at most this many bytes of a name


def set_process_name(name: str) -> None:
    """Name this process (its main thread); best effort, silently nothing elsewhere."""
    try:
        fd = os.open("/proc/self/comm", os.O_WRONLY)
    except OSError:
        return
    try:
        os.write(fd, name.encode("utf-8", "replace")[:COMM_MAX])
    except OSError:
        pass
    finally:
        os.close(fd)
