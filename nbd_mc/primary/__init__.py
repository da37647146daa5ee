"""The primary side: attach a running QEMU to the secondary and checkpoint it.

One concept per module:
  errors      -- what can stop protect (PrimaryError, PrimaryGone, ...)
  options     -- the command-line vocabulary (DriveSpec, NbdTarget, Options)
  qmp         -- a blocking QMP session on a private event-loop thread
  libvirt     -- the same session through libvirt's API, for --libvirt DOMAIN
                 (imported by protect only when used)
  secondary   -- the secondary's control channel: status, group check, commit
  mirrors     -- block-job plumbing: NBD nodes, write-blocking mirrors, detaching
  bitmaps     -- dirty bitmaps per epoch: what changed since the secondary's commit
  plan        -- which resync brings the secondary in step, and why (a pure function)
  resync      -- bringing the secondary in step: incremental rounds, a checksum sync
                 or a full sync
  side        -- PrimarySide: what the checkpoint and resync steps share (QMP, drives,
                 bitmaps, stall timeout, watchdog, QEMU's user)
  fleece      -- the fleecing snapshot a resync round copies from (our own
                 copy-before-write filter: the secondary never meets a guest write)
  source      -- reading a drive from outside QEMU: its local raw file, or QEMU's own
                 read-only NBD export of its node (verify, repair, checksum sync)
  ranges      -- copying chosen byte ranges into the secondary with libnbd, as its writer
  repair      -- the targeted resync of ranges online verify found different
  checkpoint  -- one checkpoint: stop, drained, hook, commit, cont (gives way after
                 PAUSE_DEADLINE: the vCPUs never wait for the secondary)
  watchdog    -- a child that resumes the VM and removes the mirrors if protect dies
  report      -- what protect did (summary and --json)
  phase       -- protect's phase (connecting, syncing, in step, lost, ...) and its
                 transitions
  observer    -- the one object protect tells what happens: console, metrics file,
                 event stream
  protect     -- the orchestration of a whole run
  console     -- the terminal: stop requests, progress, summary, failure advice

The names below are the package's public interface (the CLI, the demo and the
tests use them).
"""

from .checkpoint import HOOK_TIMEOUT, Checkpoint, checkpoint, resume, run_hook, vm_running
from .console import Console, StopFlag, failure_advice, summary
from .bitmaps import Bitmaps, epoch_name, source_nodes
from .errors import (PrimaryError, PrimaryGone, QmpCommandError, QmpTimeout, SecondaryFailed,
                     SecondaryRefused, SecondaryStalled)
from .mirrors import (CANCEL_TIMEOUT, DRAIN_TIMEOUT, JOB_END_EVENTS, TLS_OBJECT, Mirrors,
                      add_tls_creds, attach, cancel_mirrors, check_drives, check_sizes, detach,
                      drop, jobs, remove_leftovers, remove_nodes, start_drive_mirrors,
                      start_mirrors, yank)
from .options import (NODE_PREFIX, DriveSpec, NbdTarget, Options, parse_drive, parse_drives,
                      parse_interval, parse_nbd_uri)
from .protect import Protector, protect
from .resync import Resync
from .side import PrimarySide
from .qmp import CONNECT_TIMEOUT, QMP_TIMEOUT, Qmp
from .report import Report
from .secondary import claim_writer, commit, first_epoch, new_session, secondary_status

__all__ = [n for n in dir() if not n.startswith("_")]
