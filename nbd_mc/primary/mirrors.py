"""Block-job plumbing in the primary's QEMU: NBD client nodes on the secondary's
exports, write-blocking mirrors into them, and taking all of it away again.

For every protected drive an NBD block node points at the drive's export on the
secondary and ``blockdev-mirror sync=full copy-mode=write-blocking`` copies into
it: once the job is READY, a guest write completes only after the secondary has it.
"""

from __future__ import annotations

import os
import time
import urllib.parse

from .errors import PrimaryError, PrimaryGone, QmpCommandError, SecondaryFailed, SecondaryStalled
from .lifecycle import (CANCEL_TIMEOUT, HOLD_TIMEOUT, JOB_END_EVENTS, HeldStill,  # noqa: F401
                        delete_nodes, end_jobs, live_jobs, wait_gone)
from .options import DriveSpec, NbdTarget
from .qmp import Qmp

#: After ``stop`` the mirror's counters may lag its last write by an iteration.
DRAIN_TIMEOUT = 10.0
DRAIN_POLL = 0.001
TLS_OBJECT = "nbd-mc-tls"
#: Resync copies (resync.py) run as backup jobs named BACKUP_PREFIX + drive.
BACKUP_PREFIX = "nbd-mc-backup-"
#: The report's ``problems`` entry when drop() continued a VM (resume_after_copy_error).
RESUMED_AFTER_COPY_ERROR = ("the VM had stopped on a write error from a resync copy into the "
                            "secondary (QEMU 7.2 copy-before-write); continued it")


def check_drives(qmp: Qmp, drives: list[DriveSpec]) -> dict[str, int]:
    """Each --drive names a QEMU drive (BlockBackend or node name); returns their sizes.

    Checked up front so a typo is one clear line, not a failed blockdev-mirror.
    """
    sizes = {}
    known = []
    for b in qmp.cmd("query-block"):
        ins = b.get("inserted")
        if not ins:
            continue
        names = [n for n in (b.get("device"), ins.get("node-name")) if n]
        known.append(names[0])
        for n in names:
            sizes[n] = ins["image"]["virtual-size"]
    missing = [d.drive for d in drives if d.source not in sizes]
    if missing:
        raise PrimaryError(f"QEMU has no drive {', '.join(missing)} "
                           f"(its drives: {', '.join(known) or 'none'})")
    return {d.drive: sizes[d.source] for d in drives}


def check_sizes(sizes: dict[str, int], status: dict, drives: list[DriveSpec]) -> None:
    """A replica must have exactly its drive's size (QEMU's own message is vaguer)."""
    theirs = {d["name"]: d["size"] for d in status.get("disks", [])}
    wrong = [f"{d.drive} is {sizes[d.drive]} bytes but {d.export} is {theirs[d.export]}"
             for d in drives if theirs.get(d.export) not in (None, sizes[d.drive])]
    if wrong:
        raise PrimaryError("the secondary's disks must have the sizes of the drives: "
                           + "; ".join(wrong))


def add_tls_creds(qmp: Qmp, directory: str) -> str:
    """A client tls-creds-x509 object for an nbds:// secondary, made from DIRECTORY.

    One may be there already: an earlier attach of this protect (a lost secondary is
    attached again) or a protect killed before it could delete it.  It is replaced
    when no node uses it any more (so a changed --tls-certificates takes effect), and
    reused while one does.  Found by asking QEMU (`qom-list /objects`), not from
    object-add's refusal, whose wording differs between versions (7.2: "attempt to
    add duplicate property").
    """
    if TLS_OBJECT in _user_objects(qmp):
        try:
            qmp.cmd("object-del", id=TLS_OBJECT)
        except QmpCommandError:
            return TLS_OBJECT  # in use by a node still attached: keep it
    qmp.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": TLS_OBJECT,
                             "dir": os.path.abspath(directory), "endpoint": "client",
                             "verify-peer": True})
    return TLS_OBJECT


def _user_objects(qmp: Qmp) -> set[str]:
    """The ids of the objects made with object-add (7.2 has no /objects before the first)."""
    try:
        return {o["name"] for o in qmp.cmd("qom-list", path="/objects")}
    except QmpCommandError:
        return set()


def attach(qmp: Qmp, target: NbdTarget, drives: list[DriveSpec],
           tls_creds: str | None = None) -> None:
    """One NBD client node per drive, each on its own export of the secondary."""
    for d in drives:
        args = {"driver": "nbd", "node-name": d.node, "server": target.server,
                "export": d.export}
        if tls_creds:
            args["tls-creds"] = tls_creds
            if target.server["type"] == "unix":
                # a unix socket has no host name to check the certificate against
                args["tls-hostname"] = "localhost"
        try:
            qmp.cmd("blockdev-add", **args)
        except QmpCommandError as e:
            raise SecondaryFailed(f"cannot open export {d.export} on the secondary "
                                  f"({target.describe()}): {e}") from None


def start_mirrors(qmp: Qmp, drives: list[DriveSpec], sync: str = "full",
                  speed: int = 0) -> None:
    """sync=full copies the whole disk once; write-blocking then makes every guest
    write wait for the secondary, which is what lets a paused VM mean "all there".
    sync=none copies nothing: after an incremental resync (resync.py) the
    secondary already holds the disk.  ``speed`` (bytes/s, --rate) limits the copy
    of the disk, not the guest's writes."""
    for d in drives:
        qmp.cmd("blockdev-mirror", **{"job-id": d.job, "device": d.source, "target": d.node,
                                      "sync": sync, "copy-mode": "write-blocking",
                                      "on-target-error": "report",
                                      **({"speed": speed} if speed else {})})


def start_drive_mirrors(qmp: Qmp, target: NbdTarget, drives: list[DriveSpec]) -> None:
    """The same with the older drive-mirror: QEMU opens the NBD URI itself."""
    for d in drives:
        server = target.server
        if server["type"] == "unix":
            uri = f"nbd+unix:///{urllib.parse.quote(d.export)}?socket={server['path']}"
        else:
            uri = f"nbd://{server['host']}:{server['port']}/{urllib.parse.quote(d.export)}"
        qmp.cmd("drive-mirror", **{"job-id": d.job, "device": d.source, "target": uri,
                                   "format": "raw", "mode": "existing", "sync": "full",
                                   "copy-mode": "write-blocking", "on-target-error": "report"})


def jobs(qmp: Qmp) -> dict[str, dict]:
    return live_jobs(qmp)


def job_progress(qmp: Qmp, ids) -> tuple[int, int]:
    """(bytes copied, bytes to copy) summed over the jobs ``ids``."""
    js = jobs(qmp)
    return (sum(js[j]["offset"] for j in ids if j in js),
            sum(js[j]["len"] for j in ids if j in js))


def _job_failure(event: dict, ours: set) -> str | None:
    """What a QMP event says went wrong with one of our mirrors, if anything."""
    data = event.get("data") or {}
    job = data.get("device") or data.get("id")
    if job not in ours:
        return None
    name = event.get("event")
    if name == "BLOCK_JOB_ERROR":
        return (f"mirror {job}: {data.get('operation', 'I/O')} error on the "
                f"{'secondary' if data.get('operation') == 'write' else 'disk'} "
                f"(action {data.get('action')})")
    if name == "BLOCK_JOB_COMPLETED":
        return f"mirror {job} ended" + (f" with an error: {data['error']}" if data.get("error")
                                        else " (completed by someone else)")
    if name == "BLOCK_JOB_CANCELLED":
        return f"mirror {job} was cancelled by someone else"
    return None


class CopyWatch:
    """Our jobs' (bytes copied, bytes to copy), read at every poll of a wait: passed
    to ``report``, and with a ``stall`` bound a SecondaryStalled once the bytes
    copied have not moved for that long -- a secondary whose writes never complete
    (a disk hung in the kernel) would otherwise hold the wait for ever while its
    control channel still answers.  ``what`` names the copy, ``after`` ends the
    message."""

    def __init__(self, report=None, stall: float | None = None, what: str = "the copy",
                 after: str = ""):
        self.report, self.stall, self.what, self.after = report, stall, what, after
        self._moved, self._last = time.monotonic(), -1

    @property
    def wanted(self) -> bool:
        """Whether the jobs' progress needs reading at all (one query-block-jobs)."""
        return self.report is not None or self.stall is not None

    def update(self, done: int, total: int) -> None:
        if self.report:
            self.report(done, total)
        if done != self._last:
            self._moved, self._last = time.monotonic(), done
        elif self.stall is not None and time.monotonic() - self._moved > self.stall:
            raise SecondaryStalled(f"{self.what} copied nothing for {self.stall:g} s: the "
                                   f"secondary's writes do not complete{self.after}")


class Mirrors:
    """Our mirror jobs and what QEMU said about them since they started."""

    def __init__(self, qmp: Qmp, drives: list[DriveSpec]):
        self.qmp = qmp
        self.drives = drives
        self.ids = {d.job for d in drives}
        self.cursor = qmp.cursor
        self.failure: str | None = None
        self.ready: set = set()
        self.synced: dict[str, int] = {}  # bytes copied when each job became READY

    def scan(self) -> None:
        """Look at the new events: READY and failures (the first failure sticks)."""
        for seq, e in self.qmp.events_after(self.cursor):
            self.cursor = seq
            data = e.get("data") or {}
            if e.get("event") == "BLOCK_JOB_READY" and data.get("device") in self.ids:
                self.ready.add(data["device"])
                self.synced[data["device"]] = data.get("offset", 0)
            why = _job_failure(e, self.ids)
            if why and not self.failure:
                self.failure = why

    def check(self) -> None:
        self.scan()
        if self.failure:
            raise SecondaryFailed(self.failure)
        if self.qmp.gone:
            raise PrimaryGone(f"QEMU ({self.qmp.path}): {self.qmp.gone}")

    def progress(self) -> tuple[int, int]:
        """(bytes copied, bytes to copy) summed over our jobs."""
        return job_progress(self.qmp, self.ids)

    def wait_ready(self, report=None, stop_requested=lambda: False, poll: float = 0.25,
                   timeout: float | None = None, stall: float | None = None) -> bool:
        """Wait for BLOCK_JOB_READY of every mirror; report(done, total) meanwhile.

        Returns False if stop_requested() became true (or ``timeout`` passed) first.
        Mirrors that copied nothing for ``stall`` seconds raise SecondaryStalled: a
        secondary whose writes never complete would hold the sync for ever while
        its control channel still answers.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        watch = CopyWatch(report, stall, "the sync")
        while True:
            if deadline is not None and time.monotonic() > deadline:
                return False
            self.check()
            if self.ready >= self.ids:
                if report:
                    report(*self.progress())
                return True
            if stop_requested():
                return False
            if watch.wanted:
                watch.update(*self.progress())
            self.qmp.wait_event(lambda e: True, self.qmp.cursor, poll)

    def wait_drained(self, timeout: float = DRAIN_TIMEOUT) -> dict[str, dict]:
        """With the VM stopped: every mirror READY, no I/O error, nothing left to copy.

        ``stop`` drains guest I/O, and write-blocking means a finished guest write is
        on the secondary; the job's len - offset is what is still to be copied (its
        counters can trail by a moment, hence the bounded poll).  A job in ``standby``
        was held across the ``stop`` (lifecycle rule 5) and is being resumed: pending.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            js = jobs(self.qmp)
            self.check()
            pending = []
            for j in sorted(self.ids):
                info = js.get(j)
                if info is None:
                    raise SecondaryFailed(f"mirror {j} is gone from QEMU's block jobs")
                if info.get("io-status", "ok") != "ok":
                    raise SecondaryFailed(f"mirror {j}: I/O status {info['io-status']}")
                if info.get("status") == "standby" and info.get("ready"):
                    # held across the ``stop`` (JobsHeld): its resume is on its way
                    pending.append(f"{j}: standby")
                    continue
                if info.get("status") != "ready" or not info.get("ready"):
                    raise SecondaryFailed(f"mirror {j} is {info.get('status')}, not ready")
                if info["len"] - info["offset"]:
                    pending.append(f"{j}: {info['len'] - info['offset']} bytes")
            if not pending:
                return js
            if time.monotonic() > deadline:
                raise SecondaryFailed(f"the mirrors did not drain with the VM stopped "
                                      f"({', '.join(pending)} left after {timeout:.0f} s)")
            time.sleep(DRAIN_POLL)  # polling a counter with a deadline


def cancel_mirrors(qmp: Qmp, mirrors: Mirrors, timeout: float = CANCEL_TIMEOUT,
                   force: bool = False, watchdog=None) -> list[str]:
    """block-job-cancel each mirror and wait until QEMU lists none of them
    (lifecycle.end_jobs).  After READY that ends the job cleanly without a pivot: the
    VM goes on using its own disk.  ``force`` does not copy what is still dirty first
    (the secondary is lost anyway); a forced cancel of a mirror, and any cancel of
    one not READY yet (QEMU forces those), happens only with the VM paused
    (lifecycle rule 1); ``watchdog`` is told about that pause.  Returns problems."""
    return end_jobs(qmp, mirrors.ids, force=force, watchdog=watchdog, timeout=timeout)


def remove_nodes(qmp: Qmp, drives: list[DriveSpec]) -> list[str]:
    """blockdev-del our NBD nodes (those still there), once none of our jobs is left
    (lifecycle rule 4); returns problems."""
    return delete_nodes(qmp, [d.node for d in drives],
                        jobs=[j for d in drives for j in (d.job, BACKUP_PREFIX + d.drive)])


def yank(qmp: Qmp, drives: list[DriveSpec], timeout: float = 5.0) -> None:
    """Shut our NBD nodes' connections down at once, out of band: requests in flight
    to a hung secondary fail (the mirror reports a target error, the guest's write
    has already succeeded on its own disk), which ends a ``stop`` stuck draining
    them.  Over TCP that is always enough.  Over a unix socket a write waiting for
    socket-buffer space would stay stuck until the peer reads (QEMU does not wake a
    writer on hang-up); the maximum request protect asks for in ``claim`` there
    keeps any write from waiting for space (nbd_mc/blocksize.py)."""
    instances = [{"type": "block-node", "node-name": d.node} for d in drives]
    for inst in instances:
        try:
            qmp.execute("yank", {"instances": [inst]}, timeout=timeout, oob=True)
        except QmpCommandError:  # no such node (any more): nothing to shut
            pass


def drop(qmp: Qmp, drives: list[DriveSpec], hard: bool = False, watchdog=None) -> list[str]:
    """The secondary is lost: remove our mirrors, resync copies and NBD nodes, without
    waiting for the secondary (``hard`` first yanks the connections).  The VM keeps
    running on its own disks (paused for the moment of the forced cancel, see
    HeldStill; ``watchdog`` is told); the dirty bitmaps stay.  Returns problems."""
    if hard:
        yank(qmp, drives)
    ids = {d.job for d in drives} | {BACKUP_PREFIX + d.drive for d in drives}
    problems = cancel_mirrors(qmp, _Jobs(ids), timeout=CANCEL_TIMEOUT, force=True,
                              watchdog=watchdog)
    problems += remove_nodes(qmp, drives)
    if hard and resume_after_copy_error(qmp):
        problems.append(RESUMED_AFTER_COPY_ERROR)
    return problems


def resume_after_copy_error(qmp: Qmp) -> bool:
    """Continue a VM that a failed copy into the secondary stopped; True if it did.

    A resync's backup round copies through QEMU's copy-before-write filter, and in
    QEMU 7.2 that filter fails the guest's own write when its copy to the target
    fails (``blockdev-backup`` has no ``on-cbw-error``).  With the default
    ``werror=enospc`` a secondary that answers ENOSPC (its undo file system is
    full) so stops the VM with status ``io-error``, and nothing would ever
    continue it: checkpoints leave a VM they did not pause alone.  Called once
    our jobs are gone (no filter left): ``cont`` retries the write, which now goes
    to the VM's own disk only (found by the chaos soak's full undo file system).
    """
    if qmp.cmd("query-status").get("status") != "io-error":
        return False
    qmp.cmd("cont")
    return True


class _Jobs:
    """What cancel_mirrors needs of a Mirrors: the job ids."""

    def __init__(self, ids):
        self.ids = set(ids)


def remove_leftovers(qmp: Qmp, drives: list[DriveSpec], watchdog=None,
                     resume_paused: bool = True) -> str | None:
    """Clean up after an earlier protect that died without detaching (kill -9).

    Its mirror jobs, NBD nodes and fleecing filters (fleece.py) are still in QEMU
    and would make ours fail with "duplicate id" -- and its write-blocking mirrors
    would go on making guest writes wait for a secondary nobody watches, so their
    connections are yanked first; if it died mid-checkpoint it also left the VM
    paused (``resume_paused``: continue it; the watchdog decides that itself).
    Only one client can use a QMP socket at a time, so nobody else is driving them
    now.  The fleecing files of protects that are gone go too (any VM's: their
    directories name their protect's pid, fleece.remove_stale_files).  Returns what
    was done, or None if there was nothing to do.
    """
    from .fleece import FLEECE_PREFIX, remove_leftovers as remove_fleecing, remove_stale_files
    files = remove_stale_files()
    files_done = (f"removed {len(files)} fleecing file director{'y' if len(files) == 1 else 'ies'}"
                  f" of protects that are gone ({', '.join(files)})") if files else None
    present = {n.get("node-name") for n in qmp.cmd("query-named-block-nodes")}
    running = jobs(qmp)
    stale_jobs = [j for d in drives for j in (d.job, BACKUP_PREFIX + d.drive) if j in running]
    stale_nodes = [d.node for d in drives if d.node in present]
    fleecing = any((n or "").startswith(FLEECE_PREFIX) for n in present)
    if not stale_jobs and not stale_nodes and not fleecing:
        return files_done
    paused = qmp.cmd("query-status").get("status") == "paused"
    problems = [p for p in drop(qmp, drives, hard=True, watchdog=watchdog)
                if p != RESUMED_AFTER_COPY_ERROR]
    fleeced = remove_fleecing(qmp) if fleecing else []
    if problems:
        raise PrimaryError("cannot remove the mirrors an earlier protect left behind: "
                           + "; ".join(problems))
    done = f"removed {len(stale_jobs)} mirror(s) and {len(stale_nodes)} node(s) left by an " \
           "earlier protect that did not detach"
    if fleeced:
        done += "; " + "; ".join(fleeced)
    if files_done:
        done += "; " + files_done
    if paused and resume_paused:
        qmp.cmd("cont")
        done += "; resumed the VM it had left paused"
    return done


def detach(qmp: Qmp, mirrors: Mirrors, watchdog=None) -> list[str]:
    """Leave QEMU as we found it: no mirror, no NBD node; the VM keeps running."""
    problems = cancel_mirrors(qmp, mirrors, watchdog=watchdog)
    problems += remove_nodes(qmp, mirrors.drives)
    return problems
