"""The primary's side of a checkpoint or a resync, as one object.

Every step that pauses the VM or copies into the secondary -- a checkpoint
(checkpoint.py), the incremental rounds and their paused final round, the
checksum sync (resync.py) -- talks to the same QEMU about the same drives, counts
writes in the same dirty bitmaps, is bounded by the same stall timeout and tells
the same watchdog when it pauses the VM.  They used to take these as six to
eleven parameters that always travelled together; a PrimarySide carries them, made
once per run by protect.py (and by a test or a library user that drives a
checkpoint itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (annotations only: no import cycle, nothing loaded at run time)
    from .bitmaps import Bitmaps
    from .options import DriveSpec
    from .qmp import Qmp
    from .watchdog import Watchdog


@dataclass
class PrimarySide:
    """What the checkpoint and resync steps share.  Fixed for a run once made (the
    bitmaps object learns the secondary's group itself: bitmaps.py).

      qmp           the QMP session (qmp.py, or libvirt.py's passthrough);
      drives        the protected drives (options.DriveSpec: QEMU's name, its NBD
                    node and job, the secondary's disk);
      bitmaps       the per-epoch dirty bitmaps (bitmaps.py); None when no bitmap
                    is counted (--drive-mirror, a library user without them): a
                    checkpoint then starts none, and no resync can be incremental;
      stall_timeout how long a QMP command outside the pause may wait (protect's
                    --stall-timeout); None: the session's own timeout;
      watchdog      told "pausing"/"resumed" around every pause we make
                    (watchdog.py), or None;
      owner         (uid, gid) QEMU runs as, for the fleecing files a resync round
                    creates (fleece.py), or None if unknown.
    """

    qmp: Qmp
    drives: list[DriveSpec]
    bitmaps: Bitmaps | None = None
    stall_timeout: float | None = None
    watchdog: Watchdog | None = None
    owner: tuple[int, int] | None = None
