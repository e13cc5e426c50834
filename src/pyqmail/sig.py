"""Signal dispositions for per-message code paths, without the signal module's enums.

signal.signal() and signal.getsignal() turn every handler they return into an
enum member: about 1-4 us a call, against 0.1-0.3 us for the C functions behind
them.  A delivery worker sets and checks dispositions several times per message,
so it uses these.  Handlers come back as the C module gives them: SIG_DFL and
SIG_IGN as the plain ints 0 and 1, which compare equal to signal.SIG_DFL and
signal.SIG_IGN.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

try:
    import _signal  # type: ignore[import-not-found]  # CPython's C module behind `signal`

    set_handler: Callable[[int, Handler], Handler] = _signal.signal
    get_handler: Callable[[int], Handler] = _signal.getsignal
except (ImportError, AttributeError):  # another Python: the public functions do the same
    set_handler = signal.signal
    get_handler = signal.getsignal
