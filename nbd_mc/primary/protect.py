"""`nbd-mc protect`: attach a running QEMU to the secondary and checkpoint it.

protect talks QMP to the primary's QEMU (qmp.py) and the control protocol to the
secondary (secondary.py).  It attaches the mirrors (mirrors.py), waits for the
initial sync, then every interval takes a checkpoint (checkpoint.py).  Anything
that makes a commit doubtful (a mirror error, a refused commit, a lost control
connection) ends checkpointing: the VM keeps running unprotected and protect
exits 1 saying why.
"""

from __future__ import annotations

import time
from dataclasses import replace

from ..control import ControlClient
from .checkpoint import checkpoint
from .console import Console, StopFlag, _mib
from .errors import PrimaryError, PrimaryGone, QmpCommandError
from .mirrors import (Mirrors, add_tls_creds, attach, check_drives, check_sizes, detach,
                      remove_leftovers, start_drive_mirrors, start_mirrors)
from .options import Options
from .qmp import Qmp
from .report import Report
from ..metrics import ProtectMetrics
from .secondary import connect, first_epoch, secondary_status


class Session:
    """One protect run's live objects: what the checkpoint loop works with.

    State (all owned by the single thread that runs protect(); nothing else
    touches them):
      qmp, ctl, mirrors -- the QMP session, control channel and our mirror jobs;
      epoch -- the epoch the next commit closes (committed + 1);
      report -- what happened so far; stop -- the stop request; console -- output.
    """

    def __init__(self, opts: Options, qmp: Qmp, ctl: ControlClient, mirrors: Mirrors,
                 epoch: int, report: Report, stop: StopFlag, console: Console,
                 metrics: ProtectMetrics | None = None):
        self.opts = opts
        self.qmp = qmp
        self.ctl = ctl
        self.mirrors = mirrors
        self.epoch = epoch
        self.report = report
        self.stop = stop
        self.console = console
        self.metrics = metrics or ProtectMetrics(None)  # --metrics-file (metrics.py)

    def checkpoint_loop(self) -> None:
        """Every interval a checkpoint, until --epochs N commits or a stop request.

        A stop request during the wait ends the loop at once; one arriving during a
        checkpoint lets that checkpoint finish (the handler only sets a flag).
        """
        opts, report, stop = self.opts, self.report, self.stop
        while not stop():
            stop.sleep(opts.interval)
            if stop():
                break
            cp = checkpoint(self.qmp, self.ctl, self.mirrors, self.epoch, opts.hook)
            report.pauses.append(cp.pause)
            if opts.hook:
                report.hook_times.append(cp.hook)
            if cp.committed:
                report.committed = self.epoch
                report.commits += 1
                self.epoch += 1
                if report.commits == 1 and self.epoch == 2:
                    self.console.say("  epoch 1 committed: the secondary is protected")
                if opts.epochs and report.commits >= opts.epochs:
                    break
            else:
                report.skipped += 1
                self.console.say(f"  epoch {self.epoch} not committed: {cp.skipped}; "
                                 "the VM continues")
            self.metrics.checkpointed(report, cp.committed, self.mirrors.progress()[0]
                                      if self.metrics.path else None)


def open_session(opts: Options):
    """The QMP session protect drives and its drives as QEMU names them: QEMU's own
    socket (``--qmp``), or libvirt's QMP passthrough (``--libvirt``, libvirt.py, where
    each ``--drive`` names a disk target and is mapped to its node)."""
    if not opts.libvirt:
        return Qmp(opts.qmp), opts.drives
    from .libvirt import LibvirtQmp
    qmp = LibvirtQmp(opts.libvirt, opts.connect)
    try:
        return qmp, qmp.resolve_drives(opts.drives)
    except BaseException:
        qmp.close()
        raise


def protect(opts: Options, console: Console | None = None, stop: StopFlag | None = None) -> Report:
    """Attach, sync, checkpoint until told to stop or something fails; detach.

    Returns the report; ``report.outcome`` is "detached" (exit 0) or "failed" (exit 1,
    ``report.error`` says what happened; the VM runs on, unprotected).
    """
    console = console or Console()
    own_stop = stop is None
    stop = stop or StopFlag().install()
    report = Report()
    t_start = time.monotonic()
    ctl = qmp = mirrors = None
    metrics = ProtectMetrics(opts.metrics_file, opts.libvirt or opts.qmp or "")
    try:
        try:
            metrics.start(report)
        except OSError as e:
            raise PrimaryError(f"--metrics-file: {e}") from None
        ctl = connect(opts.control, opts.tls_certificates)
        status = secondary_status(ctl)
        next_epoch = first_epoch(status, opts.drives)
        report.first_epoch = next_epoch
        report.committed = next_epoch - 1
        qmp, drives = open_session(opts)
        opts = replace(opts, drives=drives)
        sizes = check_drives(qmp, opts.drives)
        check_sizes(sizes, status, opts.drives)
        leftover = remove_leftovers(qmp, opts.drives)
        if leftover:
            console.say(f"nbd-mc protect: {leftover}")
        mirrors = Mirrors(qmp, opts.drives)
        state = ("not protected yet: epoch 0, the first commit after the sync makes it "
                 "protected" if next_epoch == 1 else
                 f"already protected at epoch {next_epoch - 1}: the full sync is kept as undo "
                 f"until epoch {next_epoch} commits")
        console.say(f"nbd-mc protect: {', '.join(f'{d.drive} -> {d.export}' for d in opts.drives)}"
                    f" on {opts.target.describe()}; secondary {state}")
        report.attached = True
        _attach_and_mirror(qmp, opts, mirrors)
        console.say(f"  mirroring {_mib(sum(sizes.values()))} (sync=full, write-blocking)")
        metrics.set_state("syncing", report)
        if not mirrors.wait_ready(lambda done, total: (console.sync_progress(done, total),
                                                       metrics.sync_progress(done, total, report)),
                                  stop):
            report.outcome = "detached"
            console.say("stopped before the initial sync finished: nothing was committed")
            return report
        report.initial_sync_bytes = sum(mirrors.synced.values())
        console.say(f"  mirrors ready; checkpointing every {opts.interval * 1000:g} ms"
                    + (f" for {opts.epochs} epochs" if opts.epochs else "") + " (Ctrl-C detaches)")
        metrics.set_state("checkpointing", report)
        Session(opts, qmp, ctl, mirrors, next_epoch, report, stop, console,
                metrics).checkpoint_loop()
        report.outcome = "detached"
    except PrimaryError as e:
        report.outcome = "failed"
        report.error = e.desc
        report.primary_gone = isinstance(e, PrimaryGone)
    finally:
        if mirrors is not None and qmp is not None:
            report.mirrored_bytes = _mirrored_bytes(mirrors, report)
            if not qmp.gone:
                try:
                    report.problems += detach(qmp, mirrors)
                except PrimaryError as e:
                    report.problems.append(e.desc)
        for c in (qmp, ctl):
            if c is not None:
                c.close()
        if own_stop:
            stop.restore()
        report.seconds = time.monotonic() - t_start
        metrics.set_state(report.outcome or "failed", report)
        if metrics.error:
            report.problems.append(metrics.error)
    return report


def _attach_and_mirror(qmp: Qmp, opts: Options, mirrors: Mirrors) -> None:
    if opts.legacy_drive_mirror:
        if opts.target.tls:
            raise PrimaryError("drive-mirror cannot take TLS credentials; use blockdev-mirror")
        start_drive_mirrors(qmp, opts.target, opts.drives)
        return
    creds = None
    if opts.target.tls:
        if not opts.tls_certificates:
            raise PrimaryError(f"{opts.target.uri} uses TLS: give --tls-certificates DIR")
        creds = add_tls_creds(qmp, opts.tls_certificates)
    attach(qmp, opts.target, opts.drives, creds)
    try:
        start_mirrors(qmp, opts.drives)
    except QmpCommandError as e:
        raise PrimaryError(f"cannot start the mirror: {e.desc}") from None


def _mirrored_bytes(mirrors: Mirrors, report: Report) -> int:
    try:
        return max(mirrors.progress()[0], report.initial_sync_bytes)
    except PrimaryError:
        return report.initial_sync_bytes
