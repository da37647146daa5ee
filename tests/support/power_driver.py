"""Power-loss trials: the crash matrix's workload on the power-loss file system.

One *run* = a fresh power-loss file system (support.powerloss) holding the images
and the state directory, `nbd-mc serve` on it (optionally armed with a crash
point), the deterministic workload of support.crash_driver (writes and
write-zeroes on two disks racing for preserves, commits, a rollback, a failover),
and then several *cuts*: what a power failure would leave behind --

* at the crash point (the server killed itself there: a power cut at that instant
  sees exactly what the kernel had been told to make durable), and/or
* at random instants of the running workload, sampled uniformly by the file
  system between any two mutating operations (``samples``),

each materialised ``durable`` only, or with a random ``prefix`` of the unsynced
writes, or a random ``reorder``-ed subset of them.  Each cut is one *crash state*:
it replaces the tree the server used (the paths stay the same: they go through a
symlink that now points at the cut), is recovered (`nbd-mc recover` or a restart
of `nbd-mc serve`) and checked with crash_driver's oracles: the state file names
the last acknowledged commit or the one in flight, the images equal the byte model
of that epoch, every overlay passes `qemu-img check` and shows it through QEMU's
qcow2 reader (`qemu-img compare`), a restarted server serves it and rolls back.

What the client knew at each instant travels with the samples as a *note*: the
last acknowledged commit, the one being sent, and the writer exports of an
acknowledged failover (a crash state after it must still be that promotion).  A
promoted group is read as its users read it (crash_driver): the image files, and
through a restarted server its writer exports, not the refused plain names.

Trims are sent as write-zeroes: the power-loss file system cannot punch holes, so
the server (correctly) skips a trim there, while the byte model expects zeros.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
from dataclasses import dataclass, field

import nbd
import pytest

from nbd_mc.statedir import StateDir

from support import crash_driver
from support.crash_driver import DISKS, DISK_SIZE, TrialFailure, _Crashed, _io
from support.powerloss import PowerLoss
from support.servers import GroupModel, Server, make_image, nbd_mc, pid_alive, wait_until

CUT_MODES = ("durable", "prefix", "reorder")


@dataclass
class PowerTrial:
    point: str | None             # crash point "NAME:N", or None: the workload runs to its end
    durability: str = "power"
    seed: int = 0
    samples: int = 0              # random instants sampled by the file system
    cuts: tuple = CUT_MODES       # how each instant is materialised
    recovery: str = "recover"     # "recover" or "serve" (restart)
    recovery_samples: int = 0     # instants of the recovery of the first cut, cut again

    @property
    def cluster_size(self) -> int:
        return crash_driver.CLUSTER_SIZES[self.seed % len(crash_driver.CLUSTER_SIZES)]

    def __str__(self):
        return (f"{self.point or 'run-to-end'} {self.durability} seed={self.seed} "
                f"cs={self.cluster_size} samples={self.samples} {self.recovery}")


@dataclass
class CutResult:
    where: str                    # "crash point" or "op N"
    mode: str
    committed: int | None = None
    promoted: bool = False        # the state was a group promoted by a failover
    read_through: str = ""        # how its data was read (crash_driver.Result.read_through)
    failures: list = field(default_factory=list)


@dataclass
class PowerResult:
    trial: PowerTrial
    killed: bool = False
    ops: int = 0
    cuts: list = field(default_factory=list)
    failures: list = field(default_factory=list)   # of the run itself (not of a cut)

    @property
    def violations(self) -> list:
        return [c for c in self.cuts if c.failures]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.violations


_numbers = itertools.count(1)


def _workload(seed: int, cs: int) -> list:
    steps = []
    for step in crash_driver.workload(seed, cs):
        if step[0] == "io":
            step = ("io", [(d, "zero" if k == "trim" else k, o, n, data)
                           for d, k, o, n, data in step[1]])
        steps.append(step)
    return steps


def mount_tree(tdir: str, seed: int = 0, samples: int = 0) -> tuple[PowerLoss, str]:
    """A power-loss file system at TDIR/fs, reached through the symlink TDIR/d (the
    path the server is given: a cut later replaces its target, not the path)."""
    fs = PowerLoss(os.path.join(tdir, "fs"), os.path.join(tdir, "pl.sock"),
                   seed=seed, samples=samples)
    link = os.path.join(tdir, "d")
    os.symlink("fs", link)
    return fs, link


def point_link_at(link: str, dest: str) -> None:
    """Make the server's paths lead to the tree ``dest`` (atomically)."""
    tmp = link + ".new"
    os.symlink(os.path.basename(dest), tmp)
    os.replace(tmp, link)


def run_power_trial(root: str, trial: PowerTrial) -> PowerResult:
    """One run in a fresh directory under ``root``; leaves nothing running or mounted."""
    res = PowerResult(trial)
    tdir = os.path.join(root, f"p{next(_numbers)}")
    os.makedirs(tdir)
    fs, link = mount_tree(tdir, trial.seed, trial.samples)
    srv = None
    try:
        rng = random.Random(trial.seed)
        images = {d: os.path.join(link, f"{d}.raw") for d in DISKS}
        initial = {d: make_image(images[d], DISK_SIZE, rng) for d in DISKS}
        fs.note({"acked": 0, "sending": None})
        fs.sync()  # the images exist before nbd-mc is asked to protect them
        srv = Server(tdir, images, state_dir=os.path.join(link, "st"),
                     durability=trial.durability, cluster_size=trial.cluster_size,
                     args=crash_driver.HISTORY)
        model, sent = _run(srv, fs, trial, res, initial)
        res.ops = fs.stats()["ops"]
        instants = [(None, "crash point" if res.killed else "end of run")]
        instants += [(i, f"op {s['op']}") for i, s in enumerate(fs.samples())]
        k = 0
        for sample, where in instants:
            for mode in trial.cuts:
                k += 1
                cut = CutResult(where, mode)
                res.cuts.append(cut)
                _check_cut(fs, srv, trial, cut, sample, mode, trial.seed * 100 + k,
                           os.path.join(tdir, f"cut{k}"), link, initial, model, sent)
        if trial.recovery_samples:
            _cuts_in_recovery(fs, srv, trial, res, tdir, link, initial, model, sent)
    except (Exception, pytest.fail.Exception) as e:  # a bug or a hang: report, never hide
        res.failures.append(f"{type(e).__name__}: {e}")
    finally:
        if srv is not None:
            srv.kill_all()
        fs.close()
    if res.ok:
        shutil.rmtree(tdir, ignore_errors=True)
    return res


def _run(srv: Server, fs: PowerLoss, trial: PowerTrial, res: PowerResult, initial: dict):
    model = GroupModel(initial)
    sent = {}  # epoch -> the contents a commit of it was sent with
    srv.start(crashpoint=trial.point)
    handles = {d: srv.connect(d) for d in DISKS}
    for i, step in enumerate(_workload(trial.seed, trial.cluster_size)):
        try:
            if step[0] == "io":
                _io(handles, step[1], model)
            elif step[0] == "commit":
                pending = model.epoch + 1
                sent[pending] = {n: bytes(b) for n, b in model.live.items()}
                fs.note({"acked": model.epoch, "sending": pending})
                r = srv.execute("commit", epoch=pending)
                if r["committed"] != pending:
                    raise TrialFailure(f"commit {pending} returned {r}")
                model.commit(pending)
                fs.note({"acked": pending, "sending": None})
            elif step[0] == "rollback":
                srv.execute("rollback")
                model.rollback()
            elif step[0] == "failover":
                target = model.epoch - crash_driver.BACK
                fs.note({"acked": model.epoch, "sending": None, "failover_to": target})
                r = srv.execute("failover", to_epoch=target)  # the last step: model stays
                fs.note({"acked": model.epoch, "sending": None, "failover_to": target,
                         "promoted": crash_driver.handed_exports(r)})
        except (_Crashed, ConnectionError, OSError, nbd.Error) as e:
            if srv.pid is not None and pid_alive(srv.pid):
                try:
                    wait_until(lambda: not pid_alive(srv.pid), "the server to die", timeout=5)
                except BaseException:
                    raise TrialFailure(f"step {i} {step[0]} failed while the server lives: {e!r}")
            res.killed = True
            break
    if res.killed:
        srv.wait_dead()
    else:
        srv.kill9()  # the power fails after the last step
    return model, sent


def _cuts_in_recovery(fs, srv, trial, res, tdir, link, initial, model, sent) -> None:
    """Power fails again while the first crash state is being recovered: the
    durable cut is copied onto a fresh power-loss file system (all of it durable),
    `nbd-mc recover` runs there while instants are sampled, and each instant is
    cut, recovered again and checked like any other crash state."""
    first = os.path.join(tdir, "first")
    info = fs.cut(first, "durable", trial.seed, None)
    fs2 = PowerLoss(os.path.join(tdir, "fsr"), os.path.join(tdir, "plr.sock"),
                    seed=trial.seed + 1, samples=trial.recovery_samples)
    try:
        shutil.copytree(first, fs2.mountpoint, dirs_exist_ok=True)
        fs2.note(info["note"])
        fs2.sync()
        point_link_at(link, fs2.mountpoint)
        nbd_mc("recover", "--state-dir", srv.state_dir)  # its outcome is checked below
        k = 0
        for i, sample in enumerate(fs2.samples()):
            for mode in trial.cuts:
                k += 1
                cut = CutResult(f"recovery op {sample['op']}", mode)
                res.cuts.append(cut)
                _check_cut(fs2, srv, trial, cut, i, mode, trial.seed * 1000 + k,
                           os.path.join(tdir, f"rcut{k}"), link, initial, model, sent)
    finally:
        fs2.close()


def _check_cut(fs, srv, trial, cut: CutResult, sample, mode, seed, dest, link, initial,
               model, sent) -> None:
    """Materialise one crash state at the server's paths, recover it, check it."""
    info = fs.cut(dest, mode, seed, sample)
    point_link_at(link, dest)
    note = info["note"]
    acked, sending = note["acked"], note["sending"]
    known = GroupModel(initial)
    known.history = {e: c for e, c in model.history.items() if e <= acked}
    known.epoch = acked
    inflight = (sending, sent[sending]) if sending is not None else None
    if acked == 0 and not os.path.exists(StateDir(srv.state_dir).state_file):
        return  # no commit was ever acknowledged: losing the whole group loses nothing
    ctrial = crash_driver.Trial("power", 1, trial.durability, seed, trial.recovery)
    ignored = crash_driver.Result(ctrial)
    try:
        crash_driver._check_after_crash(srv, ctrial, ignored, known, inflight, dest,
                                        note.get("failover_to"), note.get("promoted"))
        cut.committed = ignored.committed
    except TrialFailure as e:
        cut.failures.append(str(e))
    except (Exception, pytest.fail.Exception) as e:
        cut.failures.append(f"{type(e).__name__}: {e}")
    finally:
        cut.promoted, cut.read_through = ignored.promoted, ignored.read_through
        srv.kill_all()


def promoted_states(results) -> tuple[int, int]:
    """(crash states after a failover, of them read through a writer export)."""
    cuts = [c for r in results for c in r.cuts if c.promoted]
    return len(cuts), sum("writer export" in c.read_through for c in cuts)


def summarise(results) -> str:
    states = sum(len(r.cuts) for r in results)
    bad = [(r, c) for r in results for c in r.violations]
    promoted, served = promoted_states(results)
    lines = [f"{len(results)} runs, {states} crash states explored under power loss, "
             f"{len(bad)} violations, {sum(bool(r.failures) for r in results)} runs failed; "
             f"{promoted} states after a failover ({served} read through a writer export)"]
    lines += [f"RUN FAIL {r.trial}: {'; '.join(r.failures)}" for r in results if r.failures]
    lines += [f"VIOLATION {r.trial} at {c.where} ({c.mode}): {'; '.join(c.failures)}"
              for r, c in bad]
    return "\n".join(lines)
