"""`nbd-mc protect`: attach a running QEMU to the secondary, checkpoint it, and
keep doing so across outages of the secondary.

protect talks QMP to the primary's QEMU (qmp.py) and the control protocol to the
secondary (secondary.py).  It brings the secondary in step (resync.py: a full
sync the first time, an incremental one from the dirty bitmaps of bitmaps.py
when it can), then every interval takes a checkpoint (checkpoint.py).

When the secondary is lost -- a mirror error, a refused commit, a lost or hung
control connection, a stop that stalls on its writes -- protect drops the mirror
(the VM runs on, on its own disks; no guest write fails), says so in one line,
and retries with backoff until the secondary answers; then it resyncs and
checkpoints again.  It ends on Ctrl-C/SIGTERM, after --epochs commits, when QEMU
is gone, when the secondary refuses for good (promoted, fenced, another group's
disks) or after --retry-for without a secondary.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

from . import verify
from .. import blocksize
from ..control import ControlClient
from ..errors import NbdMcError
from .metrics import ProtectMetrics
from .bitmaps import Bitmaps, epoch_name, source_nodes
from .checkpoint import PAUSE_DEADLINE, checkpoint, run_hook
from .console import Console, StopFlag, _mib
from .features import QemuFeatures
from .errors import (PrimaryError, PrimaryGone, QmpCommandError, QmpTimeout, SecondaryFailed,
                     SecondaryRefused, why)
from . import shipping
from .mirrors import (BACKUP_PREFIX, Mirrors, add_tls_creds, attach, check_drives, check_sizes,
                      detach, drop, remove_leftovers, start_drive_mirrors, start_mirrors)
from .observer import Observer
from .options import Options
from .phase import Phase, check_transition
from .plan import plan_resync
from .qmp import Qmp
from .ranges import RangeWriter
from .rate import Rate
from .repair import Repairs
from .report import Report
from .resync import ChecksumUnsupported, Resync, checksum_sync, incremental, round_stall
from .side import PrimarySide
from .secondary import claim_writer, connect, first_epoch, secondary_status
from .source import (READ_TIMEOUT, NbdExport, PrimarySource, SourceError, SourceUnavailable,
                     qemu_owner_from_xml, qemu_owner_of_pidfile, qemu_owner_of_socket)
from .watchdog import Watchdog

#: Retry delays after losing the secondary: doubling from the first to the last (a
#: probe is one connect and one query-status: cheap; a secondary back in the same second
#: is resynced at once).
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 0.5
#: QMP commands wait at least this long (a blockdev-add connects over the network).
MIN_QMP_TIMEOUT = 2.0
#: A probe of a secondary that may be hung must not hang protect.
PROBE_TIMEOUT = 5.0


class Protector:
    """One protect run.

    State (all owned by the single thread that runs protect(); the signal handler
    only sets ``stop``'s flag):
      qmp      -- the QMP session, for the whole run (PrimaryGone ends the run);
      ctl      -- the control channel; None while the secondary is lost (after a
                  sync a claim.WriterControl: its commits name our writer id);
      writer_drives -- opts.drives with the exports of the writer id this sync
                  claimed (nbd_mc/secondary/writer.py): what the NBD nodes open; opts.drives
                  keeps the secondary's disk names;
      mirrors  -- our write-blocking mirrors; None while detached;
      bitmaps  -- our dirty bitmaps in QEMU (bitmaps.group: the secondary's group);
      epoch    -- the epoch the next commit closes (committed + 1);
      phase    -- where the run is (phase.Phase: connecting, syncing, in step,
                  protected, lost, ...), changed only by _enter along
                  phase.TRANSITIONS; a commit is allowed only in step
                  (``phase.in_step``), ``ctl`` and ``mirrors`` are None while LOST;
      lost_since -- since when the VM is unprotected (monotonic): set when the
                  run attaches and when the secondary is lost, None once in step;
      lost_reason -- why, for the next resync's report entry;
      drop_pending -- LOST only: dropping the mirrors timed out (QEMU busy): try
                  again before the next probe;
      verifier -- --verify's walk (nbd_mc/verify.py), or None; it survives outages
                  (a slice captured at a checkpoint that did not commit is captured
                  again at the next one);
      repairs  -- the targeted resync of what verify found (repair.py), or None
                  (no --verify, or --no-repair); survives outages like the walk;
      source   -- how the primary's drives are read by verify, repairs and the
                  checksum sync (source.PrimarySource: local raw files or QEMU's
                  read-only NBD export), or None, with ``source_refusal`` saying
                  why; with --verify open for the whole run, otherwise only
                  during a sync that may need it (QEMU runs one NBD server:
                  ours should not sit there longer than it is used);
      ranges   -- the ranges.RangeWriter of the current claim (libnbd connections to
                  the writer exports), opened on first use, None after a new claim
                  or an outage;
      rate     -- --rate and its --rate-file (rate.py): the speed of our copy jobs;
      shipper  -- --mode async's bookkeeping (shipping.Shipper: lag, backlog,
                  back-pressure), None in sync mode;
      features -- what this QEMU offers (features.QemuFeatures, from its QMP schema),
                  asked once at the start;
      observer -- the one object told what happens (observer.py: console, metrics
                  file, event stream; it holds the report);
      report, stop, watchdog -- the outcome and control of the run.
    """

    def __init__(self, opts: Options, console: Console, stop: StopFlag):
        self.opts = opts
        self.stop = stop
        self.report = Report()
        self.qmp: Qmp | None = None
        self.ctl: ControlClient | None = None
        self.mirrors: Mirrors | None = None
        self.bitmaps: Bitmaps | None = None
        self.watchdog: Watchdog | None = None
        self.epoch = 0
        self.phase = Phase.CONNECTING
        self.lost_since: float | None = None
        self.lost_reason = "initial sync"
        self.drop_pending = False
        self.writer_drives = opts.drives
        self.verifier = None
        self.repairs: Repairs | None = None
        self.source: PrimarySource | None = None
        self.source_refusal = ""
        self.ranges: RangeWriter | None = None
        self.rate = Rate(opts.rate, opts.rate_file)
        self.shipper = shipping.Shipper(opts.max_lag) if opts.mode == "async" else None
        self.report.mode = opts.mode
        self.features: QemuFeatures | None = None
        # the console, --metrics-file and --events (observer.py; no-ops without them)
        self.observer = Observer(console, ProtectMetrics(opts.metrics_file,
                                                         opts.libvirt or opts.qmp or "",
                                                         events=opts.events), self.report)

    # --- the run --------------------------------------------------------------------
    def run(self) -> Report:
        opts, report, observer = self.opts, self.report, self.observer
        t_start = time.monotonic()
        try:
            try:
                self.observer.start()
            except OSError as e:
                raise PrimaryError(f"--metrics-file: {e}") from None
            self.ctl = self._connect()
            status = secondary_status(self.ctl)
            next_epoch = first_epoch(status, opts.drives)
            report.first_epoch = next_epoch
            report.committed = next_epoch - 1
            # Every QMP command is bounded by the stall timeout: with I/O stuck on a hung
            # secondary QEMU may not answer anything, and protect must get to the yank
            self.qmp, drives = open_session(opts, max(opts.stall_timeout, MIN_QMP_TIMEOUT))
            self.opts = opts = replace(opts, drives=drives)
            # what this QEMU offers, from its QMP schema (never from a version string)
            self.features = QemuFeatures.ask(self.qmp)
            self.features.require()
            sizes = check_drives(self.qmp, opts.drives)
            check_sizes(sizes, status, opts.drives)
            self.sizes = sizes
            # (before the leftovers: removing a mirror pauses the VM for a moment)
            self.watchdog = Watchdog(opts.qmp, opts.libvirt, opts.connect, opts.drives)
            leftover = remove_leftovers(self.qmp, opts.drives, self.watchdog)
            if leftover:
                observer.say(f"nbd-mc protect: {leftover}")
            # (after the leftovers: a mirror filter hides the drive's file)
            if opts.verify or opts.resync == "checksum" and not opts.legacy_drive_mirror:
                self._open_source()
            if opts.resync == "checksum" and self.source is None:
                raise PrimaryError(f"--resync checksum: {self.source_refusal}")
            if opts.verify:
                self.verifier = self._verifier()
            self.bitmaps = Bitmaps(self.qmp, opts.drives, source_nodes(self.qmp, opts.drives))
            self.side = PrimarySide(self.qmp, opts.drives,
                                    None if opts.legacy_drive_mirror else self.bitmaps,
                                    opts.stall_timeout, self.watchdog,
                                    owner=qemu_identity(self.qmp, opts)[1])
            state = ("not protected yet: epoch 0, the first commit after the sync makes it "
                     "protected" if next_epoch == 1 else
                     f"already protected at epoch {next_epoch - 1}: what the sync writes is "
                     f"kept as undo until epoch {next_epoch} commits")
            observer.say(f"nbd-mc protect: "
                         f"{', '.join(f'{d.drive} -> {d.export}' for d in opts.drives)}"
                         f" on {opts.target.describe()}; secondary {state}")
            report.attached = True
            self.lost_since = time.monotonic()
            try:
                if not self._sync(status):
                    report.outcome = "detached"
                    observer.say("stopped before the initial sync finished: nothing was committed")
                    return report
            except (SecondaryFailed, QmpTimeout) as e:
                self._lose(e)
            self._loop()
            report.outcome = "detached"
        except PrimaryError as e:
            report.outcome = "failed"
            report.error = e.desc
            report.primary_gone = isinstance(e, PrimaryGone)
            report.refused = isinstance(e, SecondaryRefused)
        finally:
            self._finish()
            report.seconds = time.monotonic() - t_start
            self._enter(Phase.DETACHED if report.outcome == "detached" else Phase.FAILED)
            if self.observer.error:
                report.problems.append(self.observer.error)
        return report

    def _loop(self) -> None:
        """Checkpoint every interval; when the secondary is lost, get it back."""
        opts, report, stop = self.opts, self.report, self.stop
        while not stop():
            if not self.phase.in_step:
                status = self._reconnect()
                if status is None:
                    continue
                try:
                    if not self._sync(status):
                        return
                except (SecondaryFailed, QmpTimeout) as e:
                    self._lose(e)
                continue
            stop.sleep(self.shipper.wait(opts.interval) if self.shipper else opts.interval)
            if stop():
                break
            try:
                self._poll_rate()
                if self.shipper is not None and not self._ship_or_wait():
                    continue
                if self._checkpoint() and (opts.epochs and report.commits >= opts.epochs
                                           or self.verifier is not None and self.verifier.done
                                           and not (self.repairs and self.repairs.busy)):
                    break
            except (SecondaryFailed, QmpTimeout) as e:
                self._lose(e)

    def _enter(self, phase: Phase, reason: str | None = None) -> None:
        """The one place the phase changes (phase.py: the table of transitions);
        observers hear of it unless it is no news for them.  ``reason``: why the
        secondary was lost."""
        check_transition(self.phase, phase)
        self.phase = phase
        if phase.heard:
            self.observer.state(phase.state, reason)

    def _progress(self, label: str, poll_rate: bool = True):
        """The progress callback of a (re)sync: the observer hears of it, and a
        changed --rate-file reaches the running copy jobs meanwhile."""
        def progress(done: int, total: int) -> None:
            self.observer.progress(label, done, total)
            if poll_rate:
                self._poll_rate()
        return progress

    # --- async mode and --rate --------------------------------------------------------------
    def _job_ids(self) -> set:
        return {d.job for d in self.opts.drives} | {BACKUP_PREFIX + d.drive
                                                     for d in self.opts.drives}

    def _poll_rate(self) -> None:
        """A changed --rate-file: the new rate goes to our running jobs."""
        said = self.rate.error
        line = self.rate.poll(self.qmp, self._job_ids())
        if line:
            self.observer.say(line)
        if self.rate.error and self.rate.error != said:
            self.observer.say(f"  {self.rate.error}")
        self.observer.rate(self.rate.speed)

    def _ship_or_wait(self) -> bool:
        """--mode async, before a checkpoint: True to take it now (the backlog is
        small, or the lag reached --max-lag: back-pressure), False to extend the
        epoch (shipping.Shipper.decide)."""
        sh = self.shipper
        d = sh.decide(self.qmp, self.opts.drives)
        self._link_metrics(d)
        if d.action == "extend":
            if not sh.behind:
                sh.behind = True
                self.observer.say(f"  the link is behind: {_mib(d.backlog.left)} to ship, "
                                  f"epoch lag {d.lag:.1f} s; epoch {self.epoch} extended "
                                  f"until it crosses (--max-lag "
                                  f"{'none' if sh.max_lag is None else f'{sh.max_lag:g} s'})")
            return False
        if d.action == "force":
            if sh.press():
                self.report.backpressure += 1
                self.observer.say(f"  epoch lag {d.lag:.1f} s reached --max-lag "
                                  f"{sh.max_lag:g} s with {_mib(d.backlog.left)} still to "
                                  f"ship: back-pressure, the VM runs in slices between "
                                  f"pauses of at most {PAUSE_DEADLINE:g} s until it has "
                                  f"crossed")
            elif sh.outrunning(d.lag):
                rate = (f" (the link carries {_mib(sh.throughput)}/s)"
                        if sh.throughput else "")
                self.observer.say(f"  back-pressure is not holding --max-lag: epoch lag "
                                  f"{d.lag:.1f} s with {_mib(d.backlog.left)} still to "
                                  f"ship{rate}; the guest writes faster than the link "
                                  f"carries in its slices between the pauses "
                                  f"(docs/async.md)")
        elif sh.behind and not sh.pressing:  # (back-pressure's end is its commit's line)
            self.observer.say(f"  the link caught up (epoch lag {d.lag:.1f} s)")
        sh.behind = False
        return True

    def _link_metrics(self, d=None) -> None:
        """What operators watch on a link (DRBD's oos, pending, lag), for the metrics
        file: bytes the committed epoch lacks, bytes not yet on the secondary, the lag."""
        if not self.observer.watching_link:
            return
        try:
            if d is None:
                backlog = shipping.backlog(self.qmp, self.opts.drives) if self.shipper \
                    else None
            else:
                backlog = d.backlog
            out_of_sync = (self.bitmaps.dirty_bytes(epoch_name(self.bitmaps.group,
                                                               self.epoch - 1))
                           if self.bitmaps is not None and self.bitmaps.group else 0)
            in_flight = backlog.left if backlog is not None else 0
        except PrimaryError:  # (QEMU gone: the loop finds out next)
            return
        self.observer.link(out_of_sync, in_flight,
                           self.shipper.lag() if self.shipper is not None else None)

    # --- one checkpoint ---------------------------------------------------------------
    def _checkpoint(self) -> bool:
        """Returns whether the epoch committed."""
        opts, report = self.opts, self.report
        bitmaps = self.side.bitmaps
        # --verify copies its slice in the hook, with the VM stopped and drained, and
        # the repairs copy what an earlier slice found different
        hook = self.verifier.hook(opts.hook, run_hook) if self.verifier else opts.hook
        if self.repairs is not None and self.repairs.busy:
            hook = self._repair_hook(hook)
        drain = None
        if self.shipper is not None:
            mirrors = self.mirrors

            def drain(give_way_at):  # (forced or not: back-pressure is slices, Shipper.press)
                return shipping.drain(self.qmp, mirrors, opts.stall_timeout,
                                      give_way_at).left
        cut = time.monotonic()
        cp = checkpoint(self.side, self.ctl, self.mirrors, self.epoch, hook, drain=drain)
        mirrored = None
        if self.observer.watching_link:
            try:  # (QEMU gone just after the commit: the commit is counted all the same)
                mirrored = self.mirrors.progress()[0]
            except PrimaryError:
                pass
        report.pauses.append(cp.pause)
        if cp.extended:  # no refusal, no event: the epoch goes on
            if not self.shipper.pressing:  # the guest wrote between the look and the stop
                self.observer.say(f"  epoch {self.epoch} extended: {_mib(cp.extended)} "
                                  f"written just before the checkpoint still to ship "
                                  f"{PAUSE_DEADLINE:g} s after the stop; the VM continues")
            self.shipper.gave_way(cp.extended, opts.interval)  # (or a back-pressure slice)
            return False
        self.observer.checkpointed(cp.committed, mirrored, self.epoch, cp.skipped)
        if opts.hook:
            report.hook_times.append(cp.hook)
        if not cp.committed:
            report.skipped += 1
            self.observer.say(f"  epoch {self.epoch} not committed: {cp.skipped}; "
                              "the VM continues")
            return False
        report.committed = self.epoch
        report.commits += 1
        if self.shipper is not None:
            if self.shipper.pressing:
                self.observer.say(f"  back-pressure over: epoch {self.epoch} crossed, "
                                  f"{self.shipper.slices} paused slice(s) so far")
            self.shipper.committed(cut)
        self._link_metrics()
        if bitmaps is not None:
            bitmaps.committed(self.epoch)
        if self.phase is Phase.IN_STEP:
            self._enter(Phase.PROTECTED)
            self.observer.say(f"  epoch {self.epoch} committed: the secondary is protected")
        self.epoch += 1
        if self.verifier is not None:  # the VM runs again: compare the slice with the commit
            try:
                if self.repairs is not None:  # the ranges copied at this checkpoint
                    self.repairs.after_commit(self.ctl, self.epoch - 1)
                self.verifier.after_commit(self.ctl, self.epoch - 1)
            except (OSError, NbdMcError) as e:
                raise SecondaryFailed(f"lost the control connection to the secondary while "
                                      f"verifying epoch {self.epoch - 1}: {why(e)}") from None
        return True

    def _repair_hook(self, hook):
        def at_checkpoint(epoch: int):
            skipped = hook(epoch)
            if not skipped:
                self.repairs.at_checkpoint(self._ranges(), epoch)
            return skipped
        return at_checkpoint

    def _ranges(self) -> RangeWriter:
        """The libnbd writer connections of the current claim (ranges.py), reading
        the primary's drives from the current source (None: it cannot read)."""
        if self.ranges is not None and self.ranges.source is not self.source:
            self._close_ranges()
        if self.ranges is None:
            self.ranges = RangeWriter(self.opts.target, self.writer_drives, self.source,
                                      self.opts.tls_certificates, self.opts.stall_timeout)
        return self.ranges

    def _close_ranges(self) -> None:
        if self.ranges is not None:
            self.ranges.close()
            self.ranges = None

    # --- losing the secondary and getting it back ---------------------------------------
    def _lose(self, e: PrimaryError) -> None:
        """Drop the mirrors, keep the VM running, remember why."""
        if isinstance(e, PrimaryGone):
            raise e
        if self.opts.retry_for == 0:
            raise e  # --retry-for 0: the first outage ends protect, as before
        if self.stop():  # a stop request interrupted a resync: not an outage
            self._enter(Phase.STOPPING)
            self._drop()
            return
        self.report.outages += 1
        self.lost_since = self.lost_since or time.monotonic()
        self.lost_reason = e.desc
        self.observer.progress_end()
        self.observer.say(f"nbd-mc protect: secondary lost: {e.desc}; the VM runs on "
                          "unprotected, retrying")
        self._enter(Phase.LOST, e.desc)
        self._close_ranges()
        if self.repairs is not None:
            self.repairs.abandon()
        self._drop()
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None

    def _drop(self) -> None:
        self.mirrors = None
        try:
            problems = drop(self.qmp, self.opts.drives, hard=True, watchdog=self.watchdog)
            self.drop_pending = False
            for p in problems:
                self.report.problems.append(p)
        except QmpTimeout as e:
            self.drop_pending = True
            self.observer.say(f"  QEMU is alive but busy ({e.desc}); will retry")

    def _reconnect(self) -> dict | None:
        """Wait (with backoff) and try the secondary once; its status, or None."""
        self._attempt = getattr(self, "_attempt", 0) + 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(self._attempt - 1, 10))
        self.stop.sleep(delay)
        if self.stop():
            return None
        if (self.opts.retry_for is not None and self.lost_since is not None
                and time.monotonic() - self.lost_since > self.opts.retry_for):
            raise PrimaryError(f"the secondary did not come back within "
                               f"{self.opts.retry_for:g} s (--retry-for); last: "
                               f"{self.lost_reason}")
        if self.drop_pending:
            self._drop()
            if self.drop_pending:
                return None
        try:
            self.ctl = self._connect(timeout=PROBE_TIMEOUT)
        except SecondaryRefused:
            raise
        except PrimaryError:
            return None
        try:
            status = secondary_status(self.ctl)
            first_epoch(status, self.opts.drives)
            check_sizes(self.sizes, status, self.opts.drives)
        except SecondaryFailed:
            self.ctl.close()
            self.ctl = None
            return None
        self._attempt = 0
        return status

    def _connect(self, timeout: float | None = None) -> ControlClient:
        return connect(self.opts.control, self.opts.tls_certificates,
                       timeout=timeout or max(self.opts.stall_timeout, PROBE_TIMEOUT))

    # --- syncing ------------------------------------------------------------------------------
    def _sync(self, status: dict) -> bool:
        """_sync_now; without --verify nothing reads the drives until the next sync:
        the libnbd connections and the source (QEMU's export, if any) go."""
        try:
            return self._sync_now(status)
        finally:
            if self.verifier is None:
                self._close_ranges()
                self._close_source()

    def _sync_now(self, status: dict) -> bool:
        """Bring the secondary in step with the VM and start the write-blocking mirrors.

        Which resync, and why, is plan_resync's (plan.py: incremental when a bitmap
        of this group covers the secondary's committed epoch, otherwise a checksum
        sync or a full one); this says it in one line and runs it (_incremental,
        _checksum, _full).  Returns False if a stop request came first."""
        opts, qmp, bitmaps, observer = self.opts, self.qmp, self.bitmaps, self.observer
        committed = int(status["committed"])
        group = status.get("group_id") or None
        if self.ctl.timeout != opts.stall_timeout:
            # the probe's short-timeout connection makes way for one with the stall
            # timeout; a secondary that went away in between is an outage like any
            # other (connect raises a plain PrimaryError, which would end protect)
            self.ctl.close()
            self.ctl = None
            try:
                self.ctl = self._connect()
            except SecondaryRefused:
                raise
            except PrimaryError as e:
                raise SecondaryFailed(e.desc) from None
        previous = bitmaps.group
        bitmaps.group = group
        bitmaps.prune_foreign()
        # claim = new-session (older connections can no longer write) plus a new writer
        # id: every sync mirrors into exports that no earlier session can open; over
        # a unix socket they advertise requests small enough that QEMU never waits
        # for buffer space (nbd_mc/blocksize.py: where a yank could not free it)
        self._close_ranges()
        self.ctl, self.writer_drives = claim_writer(
            self.ctl, opts.drives, observer.say, opts.stale_after,
            blocksize.qemu_max_request(opts.target.server))
        self.epoch = committed + 1
        t0 = time.monotonic()
        self._enter(Phase.RESYNCING if self.report.resyncs else Phase.SYNCING)
        self._attach()
        plan = plan_resync(status, previous, bitmaps.epochs, resync=opts.resync,
                           drive_mirror=opts.legacy_drive_mirror,
                           image_data=self._image_data, source_refusal=self._source_refusal)
        if plan.kind == "bitmap":
            r = self._incremental(plan, committed)
        elif plan.kind == "checksum":
            done = self._checksum(plan, committed)
            if done is None:
                return False
            r, plan = done
        if plan.kind == "full":
            r = self._full(plan, committed, t0)
            if r is None:
                return False
        observer.progress_end()
        if self.shipper is not None:
            if plan.kind != "full":  # the resync ends with write-blocking mirrors (resync.py)
                try:
                    self.mirrors = shipping.to_background(qmp, self.mirrors, self.rate.speed,
                                                          opts.stall_timeout, self.watchdog)
                except QmpCommandError as e:
                    raise SecondaryFailed(f"cannot switch to the background mirror: "
                                          f"{e.desc}") from None
            self.shipper.reset()
        r.from_epoch = committed
        r.reason = self.lost_reason + plan.reason
        self.report.resyncs.append(r)
        if len(self.report.resyncs) == 1:
            self.report.initial_sync_bytes = r.bytes
        if self.lost_since is not None:
            self.report.unprotected += time.monotonic() - self.lost_since
        self.lost_since = None
        self._enter(Phase.IN_STEP)
        observer.say(f"  in step: {_mib(r.bytes)} copied in {r.seconds:.1f} s; "
                     f"checkpointing every {opts.interval * 1000:g} ms"
                     + (" (async: epochs ship in the background)" if self.shipper else "")
                     + (f" for {opts.epochs} epochs" if opts.epochs else "")
                     + " (Ctrl-C detaches)")
        return True

    def _incremental(self, plan, committed: int) -> Resync:
        """The incremental resync (resync.incremental); sets the mirrors."""
        self.observer.say(plan.line(self.bitmaps.dirty_bytes(
            epoch_name(self.bitmaps.group, committed)), committed))
        try:
            r, self.mirrors = incremental(self.side, committed, self._progress("resync"),
                                          self.stop, speed=self.rate.speed)
        except QmpCommandError as e:  # a refused copy job or mirror: the target's fault
            raise SecondaryFailed(f"the resync failed: {e.desc}") from None
        return r

    def _checksum(self, plan, committed: int):
        """The checksum sync (resync.checksum_sync); sets the mirrors.  Returns
        (what it did, the plan), or (None, a full plan) when it gave way to a full
        sync before copying (plan.Plan.unsupported, unreadable), or None if a stop
        request came first."""
        self.observer.say(plan.line(sum(self.sizes.values()), committed))
        try:
            done = checksum_sync(self.side, self.ctl, self._ranges(), self.sizes, committed,
                                 self._progress("checksum sync", poll_rate=False), self.stop,
                                 rate=lambda: self.rate.speed)
        except QmpCommandError as e:
            raise SecondaryFailed(f"the checksum sync failed: {e.desc}") from None
        except ChecksumUnsupported as e:
            return None, plan.unsupported(e.desc)
        except SourceError as e:  # the full sync rewrites whatever the walk copied
            return None, plan.unreadable(e.desc)
        if done is None:
            return None
        r, self.mirrors = done
        return r, plan

    def _full(self, plan, committed: int, t0: float) -> Resync | None:
        """The full sync (a sync=full mirror of every drive); sets the mirrors.
        None if a stop request came first."""
        opts = self.opts
        self.observer.say(plan.line(sum(self.sizes.values()), committed))
        if not opts.legacy_drive_mirror:
            self.bitmaps.drop_all()
        self.mirrors = Mirrors(self.qmp, opts.drives)
        self._start_full()
        label = "initial sync" if not self.report.resyncs else "full resync"
        if not self.mirrors.wait_ready(self._progress(label), self.stop,
                                       stall=round_stall(self.opts.stall_timeout,
                                                         self.rate.speed)):
            return None
        r = Resync(full=True, reason="", bytes=sum(self.mirrors.synced.values()), mode="full")
        r.seconds = time.monotonic() - t0
        return r

    def _image_data(self) -> int:
        """Bytes of data in the secondary's image (NBD block status), for plan_resync."""
        ranges = self._ranges()
        return sum(ranges.allocated(d.drive, self.sizes[d.drive]) for d in self.opts.drives)

    def _source_refusal(self) -> str | None:
        """Why the primary's drives cannot be read for a checksum sync, for
        plan_resync; opens the source if it is not open yet."""
        if self.source is None:
            self._open_source()
        return None if self.source is not None else self.source_refusal

    def _attach(self) -> None:
        opts, qmp = self.opts, self.qmp
        if opts.legacy_drive_mirror:
            if opts.target.tls:
                raise PrimaryError("drive-mirror cannot take TLS credentials; use blockdev-mirror")
            return
        creds = None
        if opts.target.tls:
            if not opts.tls_certificates:
                raise PrimaryError(f"{opts.target.uri} uses TLS: give --tls-certificates DIR")
            creds = add_tls_creds(qmp, opts.tls_certificates)
        attach(qmp, opts.target, self.writer_drives, creds)

    def _start_full(self) -> None:
        opts, qmp = self.opts, self.qmp
        if opts.legacy_drive_mirror:
            start_drive_mirrors(qmp, opts.target, self.writer_drives)
            return
        try:
            if self.shipper is not None:
                shipping.start_background(qmp, opts.drives, "full", self.rate.speed)
            else:
                start_mirrors(qmp, opts.drives, speed=self.rate.speed)
        except QmpCommandError as e:
            raise SecondaryFailed(f"cannot start the mirror: {e.desc}") from None

    def _open_source(self) -> None:
        """The primary's data source (source.py), when something may read it: verify,
        or a checksum sync (--resync auto|checksum).  A drive that is no local raw
        file is read through QEMU's own read-only NBD export; if that cannot be set
        up either, ``source_refusal`` says why."""
        opts = self.opts
        key, owner = qemu_identity(self.qmp, opts)
        try:
            self.source = PrimarySource.open(self.qmp, opts.drives, key, owner,
                                             timeout=max(opts.stall_timeout, READ_TIMEOUT))
        except SourceUnavailable as e:
            self.source_refusal = (f"the primary's drives cannot be read: {e.desc} (they are "
                                   "read from a local raw image file, or else through a "
                                   "read-only NBD export QEMU makes of the drive)")
            return
        exported = [d for d, r in self.source.drives.items() if isinstance(r, NbdExport)]
        if exported:
            self.observer.say(f"nbd-mc protect: reading {', '.join(exported)} through QEMU's "
                              f"read-only NBD export ({self.source.socket})")

    def _close_source(self) -> None:
        if self.source is not None:
            self.report.problems += self.source.close()
            self.source = None

    def _verifier(self) -> verify.Verifier:
        if self.source is None:
            raise PrimaryError(f"cannot verify: {self.source_refusal}")
        try:
            targets = verify.targets_for(self.opts.drives, self.sizes, self.source)
            v = verify.Verifier(targets, self.source, self.opts.verify_slice,
                                self.opts.verify_passes, self.observer.say)
        except (ValueError, OSError) as e:
            raise PrimaryError(f"cannot verify: {e}") from None
        if self.opts.repair:
            self.repairs = Repairs(v.stats, self.observer.say)
            v.repair = self.repairs.queue
        return v

    # --- the end --------------------------------------------------------------------------
    def _finish(self) -> None:
        """Leave QEMU as we found it (the dirty bitmaps stay: a later protect resyncs
        from them); close everything."""
        report, qmp = self.report, self.qmp
        self.observer.progress_end()
        if qmp is not None and report.attached:
            if self.mirrors is not None:
                report.mirrored_bytes = _mirrored_bytes(self.mirrors, report)
            if not qmp.gone:
                try:
                    if self.mirrors is not None:
                        report.problems += detach(qmp, self.mirrors, self.watchdog)
                    else:
                        report.problems += drop(qmp, self.opts.drives, watchdog=self.watchdog)
                except PrimaryError as e:
                    report.problems.append(e.desc)
        if self.verifier is not None:
            report.verify = self.verifier.stats.as_dict(self.verifier.slice_size)
            if self.repairs is not None:
                report.verify["repair_pending"] = [
                    {"disk": p.target.disk, "offset": p.offset, "length": p.length}
                    for p in self.repairs.pending + [p for p, _ in self.repairs.copied]]
            self.verifier.close()
        self._close_ranges()
        self._close_source()
        if self.watchdog is not None:
            self.watchdog.close()
        for c in (qmp, self.ctl):
            if c is not None:
                c.close()
        if self.lost_since is not None and report.resyncs:
            report.unprotected += time.monotonic() - self.lost_since
        if self.shipper is not None:
            report.lags = self.shipper.lags
            report.extended = self.shipper.extended
            report.backpressure_slices = self.shipper.slices


def open_session(opts: Options, timeout: float):
    """The QMP session protect drives and its drives as QEMU names them: QEMU's own
    socket (``--qmp``), or libvirt's QMP passthrough (``--libvirt``, libvirt.py, where
    each ``--drive`` names a disk target and is mapped to its node)."""
    if not opts.libvirt:
        return Qmp(opts.qmp, timeout=timeout), opts.drives
    from .libvirt import LibvirtQmp
    qmp = LibvirtQmp(opts.libvirt, opts.connect, timeout=timeout)
    try:
        return qmp, qmp.resolve_drives(opts.drives)
    except BaseException:
        qmp.close()
        raise


def qemu_identity(qmp, opts: Options) -> tuple[str, tuple[int, int] | None]:
    """What names this QEMU for source.py's NBD socket, and who QEMU runs as (the
    owner of its QMP socket; under libvirt its DAC label), if we can tell."""
    if not opts.libvirt:
        return "qmp:" + os.path.realpath(opts.qmp), qemu_owner_of_socket(opts.qmp)
    try:
        key, xml = "libvirt:" + qmp.dom.UUIDString(), qmp.live_xml()
    except Exception:  # libvirt's errors (or PrimaryError): the name alone still works
        key, xml = "libvirt:" + opts.libvirt, ""
    # the DAC label names QEMU's user; without one (no security driver), the QEMU
    # process itself does, through the pid file of a local libvirtd
    return key, (qemu_owner_from_xml(xml)
                 or qemu_owner_of_pidfile(f"/run/libvirt/qemu/{opts.libvirt}.pid"))


def protect(opts: Options, console: Console | None = None, stop: StopFlag | None = None) -> Report:
    """Attach, sync, checkpoint until told to stop or protection cannot go on; detach.

    Returns the report; ``report.outcome`` is "detached" (exit 0) or "failed" (exit 1,
    ``report.error`` says what happened; the VM runs on, unprotected).
    """
    console = console or Console()
    own_stop = stop is None
    stop = stop or StopFlag().install()
    try:
        return Protector(opts, console, stop).run()
    finally:
        if own_stop:
            stop.restore()


def _mirrored_bytes(mirrors: Mirrors, report: Report) -> int:
    try:
        return max(mirrors.progress()[0], report.initial_sync_bytes)
    except PrimaryError:
        return report.initial_sync_bytes
