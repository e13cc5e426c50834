"""Compile-time values of qmail (conf-*), fixed for pyqmail."""

from __future__ import annotations

SPLIT = 23  # conf-split: queue subdirectories 0..SPLIT-1
SPAWN = 120  # conf-spawn: slot limit per spawner (travels as one byte)
BREAK = "-"  # conf-break: user/extension delimiter
PATRN = 0o002  # conf-patrn: forbidden mode bits on home and .qmail files

DEATH = 86400  # qmail-queue self-timeout
OSSIFIED = 129600  # 36 h: stale mess/pid cleanup threshold (atime)
SLEEP_TODO = 1500
SLEEP_CLEANUP = 76431
SLEEP_SYSFAIL = 123
SLEEP_FOREVER = 86400
SLEEP_FUZZ = 1
REPORTMAX = 10000
ADDRESS_LIMIT = 1002

# exit codes used between qmail programs (qlx.h / qmail-queue)
EXIT_OK = 0
EXIT_PERM = 100
EXIT_TEMP = 111
