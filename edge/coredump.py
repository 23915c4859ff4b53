"""No core dumps from a process that holds raw identifiers.

The daemon's memory holds what never reaches the disk by design: raw Bluetooth addresses
(presence table, pseudonym cache), NFC UIDs, POS serial buffers with unscrubbed card
numbers. A core dump (SIGABRT from systemd's watchdog, a crash in a C extension) would write
all of it out. `edge.service` sets `LimitCORE=0`; `disable_core_dumps()` sets the same limit
from inside, so a run outside systemd, or under an edited unit, does not dump core either.

RLIMIT_CORE (0, 0), not prctl(PR_SET_DUMPABLE, 0): the latter also makes /proc/<pid>
root-owned, which breaks non-root monitoring (the HIL rig reads RSS there). The hard limit
is 0 too, so nothing in the process can raise it again. With a piped `core_pattern` the
kernel still hands the dump to the helper, which is expected to honour the limit (%c):
systemd-coredump does and stores nothing.
"""

from __future__ import annotations

import contextlib
import resource


def disable_core_dumps() -> bool:
    """Set RLIMIT_CORE to (0, 0). True when that is the limit in force afterwards; never raises
    (lowering a limit is always allowed, but a seccomp filter may deny the call)."""
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        return resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
    except (OSError, ValueError):
        return False
