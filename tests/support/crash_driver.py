"""The crash matrix driver: a write + commit workload against the real server,
killed with SIGKILL at a named point, then recovered and checked against a model.

One *trial* = start `nbd-mc serve` (two disks) with ``NBD_MC_CRASHPOINT=POINT:N``,
run a deterministic workload (concurrent writes / write-zeroes / trims on both
disks, commits, one rollback, a final `failover --to-epoch` two epochs back) with
every commit retained as history (``--history 1h --history-every 0``) until
nbdkit kills itself at the N-th time it reaches POINT, then:

* before any recovery: every overlay passes `qemu-img check` (leaks allowed) and,
  opened with QEMU's own qcow2 reader, shows the disk at exactly one committed
  epoch (the state file's, or -- only while a commit is half done -- the one the
  overlay itself records);
* recovery, by `nbd-mc recover` or by restarting `nbd-mc serve --state-dir`
  (optionally crashing the restart again, inside its recovery);
* every retained checkpoint the state file lists, before and after recovery, is
  exact: its layer file, opened by `qemu-img compare` (the backing chain), shows
  the model at that epoch; after recovery no unlisted layer file is left;
* after it: the state file names epoch E, E is the last acknowledged commit or the
  one in flight at the kill (or, when the kill fell inside the final failover
  after it recorded its target, that target: recovery finishes the return),
  every image equals the model at E byte for byte,
  every overlay is clean (`qemu-img check` exit 0) and shows E; a restarted
  server serves E on both exports and still rolls back correctly.

A group that a failover promoted is read the way its users read it: with no
server, the image files; a restarted server serves it only through the writer
exports `failover` hands out (asked again: failover is idempotent on a primary),
which must show E and take the new primary's writes, while the plain and
``@committed`` names are refused (nbd_mc/secondary/writer.py).  Once a failover was
acknowledged, the crash state must still be that promotion, with the same writer.

Used by tests/system/test_crash_matrix.py (a sample covering every point in both
durability modes) and by `make soak` (every point at every hit count).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
from dataclasses import dataclass, field

import nbd
import pytest

from nbd_mc import crashpoints, qcow2
from nbd_mc.secondary import writer
from nbd_mc.secondary.state import lock_held
from support.servers import (GroupModel, Server, describe, make_image, nbd_mc, pid_alive, qemu_img_check,
                     read_all, read_file, run, wait_until, write_file)

DISKS = ("a", "b")
DISK_SIZE = 3 << 20          # with 4 KiB clusters: two L2 tables per disk
CLUSTER_SIZES = (4096, 65536)
EPOCHS = 5                   # commits after the first one
ROLLBACK_AT = 2              # the epoch in which the workload rolls back once
BACK = 2                     # the final failover returns this many epochs back
HISTORY = ("--history", "1h", "--history-every", "0")

#: Points the workload reaches in both durability modes (all of them).
POINTS = tuple(p for p in crashpoints.POINTS if p != "recover.after-apply")
#: Points that only a recovery passes: armed when a restart follows a crash.
RECOVERY_POINTS = ("recover.after-apply", "apply.after-run", "drop.after-l1", "drop.before-epoch")


@dataclass
class Trial:
    point: str                    # a crash point name, or "*" (every point counts)
    hit: int = 1                  # kill at the hit-th time the point is reached
    durability: str = "process"
    seed: int = 0
    recovery: str = "recover"     # "recover" (offline) or "serve" (restart)
    second: str | None = None     # crash point armed in the restart (recovery == "serve")

    @property
    def cluster_size(self) -> int:
        return CLUSTER_SIZES[self.seed % len(CLUSTER_SIZES)]

    @property
    def spec(self) -> str:
        return f"{self.point}:{self.hit}"

    def __str__(self):
        s = f"{self.spec} {self.durability} seed={self.seed} cs={self.cluster_size} {self.recovery}"
        return s + (f" then {self.second}" if self.second else "")


@dataclass
class Result:
    trial: Trial
    killed: bool = False          # the server died at the armed point
    killed_in: str = ""           # the workload step it died in
    second_killed: bool = False   # the restart died at the second point
    committed: int | None = None  # the epoch the group recovered to
    promoted: bool = False        # the crash state was a group promoted by a failover
    read_through: str = ""        # how the recovered data was read: "image file", plus
                                  # "live export" or "writer export" when served again
    failures: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


_trial_numbers = itertools.count(1)  # a directory per trial (next() is atomic)


class TrialFailure(Exception):
    pass


# --- the workload ------------------------------------------------------------------
def workload(seed: int, cluster_size: int) -> list:
    """Deterministic steps: ("io", ops) | ("commit",) | ("rollback",) | ("failover",).

    Ops of one "io" step are in flight together; on one disk they never overlap
    byte-wise, but they do share clusters (so two requests race for one preserve).
    """
    rng = random.Random(seed * 7919 + cluster_size)
    steps = [("commit",)]  # epoch 1: the group becomes protected
    for epoch in range(EPOCHS):
        steps += [("io", _batch(rng, cluster_size)), ("io", _batch(rng, cluster_size))]
        if epoch == ROLLBACK_AT:
            steps += [("rollback",), ("io", _batch(rng, cluster_size))]
        steps.append(("commit",))
    steps += [("io", _batch(rng, cluster_size)), ("failover",)]
    return steps


def _batch(rng: random.Random, cs: int) -> list:
    ops = []
    for disk in DISKS:
        used = []
        for _ in range(rng.randint(3, 6)):
            for _attempt in range(20):
                length = rng.choice([rng.randint(1, 8) * 512, rng.randint(1, 3 * cs // 512) * 512,
                                     cs, 2 * cs])
                offset = rng.randrange(0, DISK_SIZE - length + 1, 512)
                if rng.random() < 0.4:  # cluster-aligned, the common case for a mirror
                    offset -= offset % cs
                    length = min(length, DISK_SIZE - offset)
                if all(offset + length <= a or b <= offset for a, b in used):
                    break
            else:
                continue
            used.append((offset, offset + length))
            kind = rng.choices(("write", "zero", "trim"), (70, 15, 15))[0]
            data = rng.randbytes(length) if kind == "write" else None
            ops.append((disk, kind, offset, length, data))
    return ops


# --- running a trial -----------------------------------------------------------------
class _Crashed(Exception):
    """The server went away in the middle of a step."""


def run_trial(root: str, trial: Trial) -> Result:
    """One trial in a fresh directory under ``root``; never leaves nbdkit running."""
    res = Result(trial)
    tdir = os.path.join(root, f"t{next(_trial_numbers)}")
    shutil.rmtree(tdir, ignore_errors=True)
    os.makedirs(tdir)
    rng = random.Random(trial.seed)
    images = {d: os.path.join(tdir, f"{d}.raw") for d in DISKS}
    initial = {d: make_image(images[d], DISK_SIZE, rng) for d in DISKS}
    srv = Server(tdir, images, durability=trial.durability, cluster_size=trial.cluster_size,
                 args=HISTORY)
    try:
        _run(srv, trial, res, initial, tdir)
    except TrialFailure as e:
        res.failures.append(str(e))
    except (Exception, pytest.fail.Exception) as e:  # a bug or a hang: report, never hide
        res.failures.append(f"{type(e).__name__}: {e}")
    finally:
        try:
            srv.stop()
        except BaseException:
            srv.kill_all()
        srv.kill_all()
    if res.ok:
        shutil.rmtree(tdir, ignore_errors=True)
    return res


def _fail(msg: str):
    raise TrialFailure(msg)


def _run(srv: Server, trial: Trial, res: Result, initial: dict, tdir: str) -> None:
    model = GroupModel(initial)
    mark = os.path.join(tdir, "crashpoint.mark")
    r = srv.start(crashpoint=trial.spec, mark=mark, check=False)
    if r.returncode != 0:
        if not os.path.exists(mark):
            _fail(f"serve failed: {describe(r)}")
        res.killed, res.killed_in = True, f"serve's start ({read_file(mark).decode().strip()})"
        _check_after_startup_kill(srv, trial, initial, tdir)
        return
    handles = {d: srv.connect(d) for d in DISKS}
    inflight = None  # (epoch, contents) of a commit whose reply never came
    failover_to = None  # the epoch the final failover was sent to return to
    handed = None       # {disk: writer export} the acknowledged failover handed out
    steps = workload(trial.seed, trial.cluster_size)
    finished = False
    for i, step in enumerate(steps):
        try:
            if step[0] == "io":
                _io(handles, step[1], model)
            elif step[0] == "commit":
                pending = model.epoch + 1
                inflight = (pending, {n: bytes(b) for n, b in model.live.items()})
                r = srv.execute("commit", epoch=pending)
                if r["committed"] != pending:
                    _fail(f"commit {pending} returned {r}")
                inflight = None
                model.commit(pending)
            elif step[0] == "rollback":
                r = srv.execute("rollback")
                if r["committed"] != model.epoch:
                    _fail(f"rollback returned {r}, model at {model.epoch}")
                model.rollback()
            elif step[0] == "failover":
                target = failover_to = model.epoch - BACK
                r = srv.execute("failover", to_epoch=target)
                if r["committed"] != target:
                    _fail(f"failover --to-epoch {target} returned {r}")
                handed = handed_exports(r)
                model.settle(target)
                finished = True
        except (_Crashed, ConnectionError, OSError, nbd.Error) as e:
            if srv.pid is not None and pid_alive(srv.pid):
                # Not our kill: a real error reply or a hang.  Give the server a moment
                # to die (the kill may be racing the reply of another request).
                try:
                    wait_until(lambda: not pid_alive(srv.pid), "the server to die", timeout=5)
                except BaseException:
                    _fail(f"step {i} {step[0]} failed while the server lives: {e!r}")
            res.killed = True
            res.killed_in = f"{i}:{step[0]}"
            break
    if not res.killed:
        if not finished:
            _fail("workload ended without failover")
        try:
            status = srv.execute("query-status")
        except (ConnectionError, OSError):
            # killed after the failover's reply, deleting the layers (a thread)
            wait_until(lambda: not pid_alive(srv.pid), "the server to die", timeout=5)
            res.killed, res.killed_in = True, "after the failover's reply"
        else:
            if status["role"] != "primary" or status["committed"] != model.epoch:
                _fail(f"after failover: {status}")
    srv.wait_dead() if res.killed else srv.quit()
    _check_after_crash(srv, trial, res, model, inflight, tdir, failover_to, handed)


def _check_after_startup_kill(srv: Server, trial: Trial, initial: dict, tdir: str) -> None:
    """Killed inside `serve`'s start (the first state file's write, say): nothing
    was ever committed or written.  Serving again (what systemd does) must bring the
    group up at epoch 0 with the images as they were, its overlays checking clean --
    whichever recovery the trial names: `recover` has no group to recover yet."""
    wait_until(lambda: not lock_held(srv.state_dir), "the killed serve to let go")
    srv.start()
    status = srv.execute("query-status")
    if status["committed"] != 0 or status["role"] != "secondary":
        _fail(f"after a kill in serve's start: {status}")
    srv.quit()
    _check_overlays(srv, tdir, {d: {0: initial[d]} for d in DISKS}, clean=True,
                    when="after a kill in serve's start")
    _check_images(srv, initial, "after a kill in serve's start")


def handed_exports(reply: dict) -> dict:
    """{disk: export} from a ``failover`` reply: what the new primary writes through."""
    return {d["name"]: d["export"] for d in reply["disks"]}


def _io(handles: dict, ops: list, model: GroupModel) -> None:
    cookies = []
    for disk, kind, offset, length, data in ops:
        h = handles[disk]
        if kind == "write":
            c = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset)
            model.write(disk, offset, data)
        elif kind == "zero":
            c = h.aio_zero(length, offset)
            model.zero(disk, offset, length)
        else:
            c = h.aio_trim(length, offset)
            model.zero(disk, offset, length)  # the image's hole reads as zeros
        cookies.append((h, c))
    for h in handles.values():
        while h.aio_in_flight() > 0:
            if h.aio_is_dead() or h.aio_is_closed():
                raise _Crashed("connection lost")
            h.poll(-1)
    for h, c in cookies:
        h.aio_command_completed(c)


# --- the oracles ---------------------------------------------------------------------------
def _overlay_epoch(path: str) -> int | None:
    ov = qcow2.UndoOverlay(path, -1, readonly=True)
    try:
        return ov.epoch
    finally:
        ov.close()


def _shows(overlay: str, expected_file: str) -> bool:
    r = run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", overlay, expected_file])
    if r.returncode not in (0, 1):
        _fail(f"qemu-img compare {overlay}: {describe(r)}")
    return r.returncode == 0


def _check_overlays(srv: Server, tdir: str, allowed: dict, clean: bool, when: str) -> None:
    """Every overlay passes qemu-img check and shows one of ``allowed[disk]``
    ({label: contents}) through QEMU's qcow2 reader."""
    for d in DISKS:
        ov = srv.overlay(d)
        r = qemu_img_check(ov)
        if r.returncode not in ((0,) if clean else (0, 3)):
            _fail(f"{when}: qemu-img check {d}: {describe(r)}")
        shown = None
        for label, content in allowed[d].items():
            path = os.path.join(tdir, f"expect-{d}-{label}.raw")
            if not os.path.exists(path):
                write_file(path, content)
            if _shows(ov, path):
                shown = label
                break
        if shown is None:
            _fail(f"{when}: overlay of {d} shows none of the epochs {sorted(allowed[d])}")


def _check_layers(srv: Server, tdir: str, history: dict, when: str) -> None:
    """Every retained checkpoint the state file lists is exact (qemu-img reads its
    layer file's backing chain); after recovery, every layer checks clean and no
    unlisted layer file is left."""
    state = srv.state()
    listed = set()
    for n, _t in state.get("history") or []:
        if state.get("rewind") is not None:
            listed.update(f"{d}.epoch-{n}.qcow2" for d in DISKS)
            if n > state["rewind"]:
                continue  # being applied by the return to the rewind epoch: not retained
        if n not in history:
            _fail(f"{when}: the state lists epoch {n}, never committed")
        for d in DISKS:
            layer = os.path.join(srv.state_dir, f"{d}.epoch-{n}.qcow2")
            listed.add(os.path.basename(layer))
            r = qemu_img_check(layer)
            # leaks (exit 3) only before recovery: it gives back what a copy into
            # the open layer the kill interrupted had allocated
            if r.returncode not in ((0, 3) if when.startswith("after the kill") else (0,)):
                _fail(f"{when}: qemu-img check {layer}: {describe(r)}")
            path = os.path.join(tdir, f"expect-{d}-{n}.raw")
            if not os.path.exists(path):
                write_file(path, history[n][d])
            if not _shows(layer, path):
                _fail(f"{when}: retained epoch {n} of {d} is not the model's epoch {n}")
    if when != "after the kill":
        stray = {f for f in os.listdir(srv.state_dir) if ".epoch-" in f} - listed
        if stray:
            _fail(f"{when}: layer files the state does not list: {sorted(stray)}")


def _check_after_crash(srv: Server, trial: Trial, res: Result, model: GroupModel,
                       inflight, tdir: str, failover_to: int | None = None,
                       handed: dict | None = None) -> None:
    """``handed``: the writer exports an acknowledged failover handed out (None if
    no failover was acknowledged before the crash)."""
    state = srv.state()
    committed = state["committed"]
    rewind = state.get("rewind")
    candidates = {model.epoch: model.history[model.epoch]}
    if inflight is not None:
        candidates[inflight[0]] = inflight[1]
    if failover_to is not None and failover_to in model.history:  # its reply never came
        candidates[failover_to] = model.history[failover_to]
    if committed not in candidates:
        _fail(f"state file says committed {committed}; acknowledged {model.epoch}, "
              f"in flight {inflight[0] if inflight else None}")
    expected = candidates[committed]
    history = dict(model.history)
    history[committed] = expected
    _check_layers(srv, tdir, history, "after the kill")
    if rewind is not None:
        # A failover --to-epoch recorded its target: the images are on their way
        # there by design (no overlay shows one epoch); recovery finishes the way.
        if rewind not in history:
            _fail(f"state file returns to epoch {rewind}, never committed")
        committed, expected = rewind, history[rewind]
    res.committed = committed
    res.promoted = state["role"] == "primary"
    if handed is not None:
        have = writer.writer_exports(DISKS, state["writer"]) if res.promoted else {}
        if have != handed:
            _fail(f"failover was acknowledged with exports {handed}; the state file has "
                  f"role {state['role']}, writer {state['writer']}")

    # Before recovery: each overlay shows the committed epoch -- or, while a commit
    # is half done, the epoch its own record names (recovery drops it as stale).
    allowed = {}
    for d in DISKS:
        allowed[d] = {committed: expected[d]}
        rec = _overlay_epoch(srv.overlay(d))
        if rec is None or rec > state["committed"]:
            _fail(f"overlay of {d} returns to epoch {rec}, state says {committed}")
        if rec < committed and rec in history:
            allowed[d][rec] = history[rec][d]
    if rewind is None:
        _check_overlays(srv, tdir, allowed, clean=False, when="after the kill")

    exact = {d: {committed: expected[d]} for d in DISKS}
    if trial.recovery == "serve":
        if trial.second:
            r = srv.start(with_disks=False, crashpoint=trial.second, check=False)
            if r.returncode == 0:  # recovery did not pass the point: stop, go on unarmed
                srv.quit()
            else:
                res.second_killed = True
                wait_until(lambda: not lock_held(srv.state_dir), "the killed restart to let go")
                if rewind is None and srv.state().get("rewind") is None:
                    _check_overlays(srv, tdir, {d: dict(allowed[d]) for d in DISKS},
                                    clean=False, when="after the second kill")
                _check_layers(srv, tdir, history, "after the kill")
        if not res.second_killed:
            srv.start(with_disks=False)
            res.read_through = _check_served(srv, state, committed, expected)
            srv.quit()
            _check_overlays(srv, tdir, exact, clean=True, when="after restart")
            _check_images(srv, expected, "after restart")
            _check_layers(srv, tdir, history, "after restart")
            res.read_through = f"image file, {res.read_through}"
            return
    r = nbd_mc("recover", "--state-dir", srv.state_dir, "--json")
    if r.returncode != 0:
        _fail(f"recover failed: {describe(r)}")
    rep = json.loads(r.stdout)
    if rep["committed"] != committed:
        _fail(f"recover reports epoch {rep['committed']}, state file {committed}")
    _check_images(srv, expected, "after recover")
    res.read_through = "image file"
    _check_overlays(srv, tdir, exact, clean=True, when="after recover")
    _check_layers(srv, tdir, history, "after recover")
    # recover is idempotent: a second run restores nothing and changes nothing
    before = {d: read_file(srv.image(d)) for d in DISKS}
    r = nbd_mc("recover", "--state-dir", srv.state_dir, "--json")
    if r.returncode != 0 or json.loads(r.stdout)["restored_clusters"] != 0:
        _fail(f"second recover: {describe(r)}")
    if any(read_file(srv.image(d)) != before[d] for d in DISKS):
        _fail("a second recover changed an image")




def _check_images(srv: Server, expected: dict, when: str) -> None:
    for d in DISKS:
        got = read_file(srv.image(d))
        if got != expected[d]:
            off = next(i for i in range(len(got)) if got[i] != expected[d][i]) \
                if len(got) == len(expected[d]) else -1
            _fail(f"{when}: image of {d} differs from the committed epoch at byte {off}")


def _check_served(srv: Server, state: dict, committed: int, expected: dict) -> str:
    """A restarted server serves epoch ``committed``; returns which exports showed it."""
    st = srv.execute("query-status")
    if st["committed"] != committed:
        _fail(f"restarted server reports epoch {st['committed']}, state file {committed}")
    if st["role"] == "primary":
        _check_promoted_served(srv, st, committed, expected)
        srv.close_clients()
        return "writer export"
    promoted = False
    for d in DISKS:
        if read_all(srv.connect(f"{d}@{st['writer']}" if promoted else d)) != expected[d]:
            _fail(f"restarted server: live export {d} is not the committed epoch")
        if committed and not promoted and read_all(srv.connect(f"{d}@committed")) != expected[d]:
            _fail(f"restarted server: {d}@committed is not the committed epoch")
    if st["role"] == "secondary" and not st["fenced"] and committed:
        # still a working replica: write, then roll back to the same epoch
        rng = random.Random(committed)
        for d in DISKS:
            h = srv.connect(d)
            for _ in range(4):
                off = rng.randrange(0, DISK_SIZE - 8192, 512)
                h.pwrite(rng.randbytes(8192), off)
        srv.execute("rollback")
        for d in DISKS:
            if read_all(srv.connect(d)) != expected[d]:
                _fail(f"restarted server: rollback did not return {d} to epoch {committed}")
    srv.close_clients()
    return "live export"


def _refused(srv: Server, export: str) -> bool:
    try:
        srv.connect(export)
    except nbd.Error:
        return True
    return False


def _check_promoted_served(srv: Server, st: dict, committed: int, expected: dict) -> None:
    """A promoted group, served again, as its new primary sees it: ``failover``
    (idempotent on a primary) hands out the writer exports, which show the epoch
    and take writes; the plain and committed names are refused (the one-writer
    rule).  A write is put back as it was, so the files still equal ``expected``."""
    r = srv.execute("failover")
    if r["committed"] != committed:
        _fail(f"promoted group: failover again reports epoch {r['committed']}, "
              f"state file {committed}")
    exports = handed_exports(r)
    if not st["writer"] or exports != writer.writer_exports(DISKS, st["writer"]):
        _fail(f"promoted group: failover hands out {exports}, status says writer {st['writer']}")
    rng = random.Random(committed)
    for d in DISKS:
        h = srv.connect(exports[d])
        if read_all(h) != expected[d]:
            _fail(f"promoted group: writer export {exports[d]} is not the committed epoch")
        off = rng.randrange(0, DISK_SIZE - 8192, 512)
        data = rng.randbytes(8192)
        h.pwrite(data, off)
        if h.pread(8192, off) != data:
            _fail(f"promoted group: a write through {exports[d]} does not read back")
        h.pwrite(expected[d][off:off + 8192], off)
        h.flush()
        for name in (d, f"{d}@{writer.COMMITTED}"):
            if not _refused(srv, name):
                _fail(f"promoted group: export {name} opens (only {exports[d]} may)")


# --- plans ------------------------------------------------------------------------------
def sample_plan(seed: int = 1) -> list[Trial]:
    """Every point in both durability modes (hit counts and recovery paths vary),
    a few sweeps of "any point", and crashes inside a restart's recovery."""
    rng = random.Random(seed)
    trials = []
    for mode in ("process", "power"):
        for i, point in enumerate(POINTS):
            hit = 1 if point.startswith(("failover", "rollback", "rewind", "history.before")) \
                else rng.choice((1, 1, 2, 3))
            recovery = "serve" if (i + (mode == "power")) % 2 else "recover"
            trials.append(Trial(point, hit, mode, rng.randrange(1 << 30), recovery))
        for _ in range(2):
            trials.append(Trial("*", rng.randint(1, 120), mode, rng.randrange(1 << 30),
                                rng.choice(("serve", "recover"))))
        for second in RECOVERY_POINTS:
            trials.append(Trial(rng.choice(("preserve.before-l1", "write.after-image",
                                            "zero.before-image", "rollback.between-disks")),
                                1, mode, rng.randrange(1 << 30), "serve", f"{second}:1"))
        # the workload runs to its end (failover is reached once): the promoted group,
        # served again, is read through the writer exports
        trials.append(Trial("failover.before-promote", 2, mode, seed, "serve"))
    return trials


def full_plan(seeds=(1, 2), modes=("process", "power")) -> list[list[Trial]]:
    """`make soak`: every named point at hit counts 1..6, both recovery paths
    alternately, and crashes inside a restart's recovery; the "*" sweep is
    open-ended (tests/system/test_crash_matrix.py).

    Returned as *chains*, each run in order by run_chain: the hit counts of one point
    (seed, mode) are one chain, which ends at the first trial that ran to its end
    without being killed: the workload passed the point fewer times, and a higher
    hit count would only run the same workload to its end again (the points that
    commits, the rollback and the failover pass are passed equally often by every
    seed's workload; the write and preserve points, far more than six times)."""
    chains = []
    for seed in seeds:
        for mode in modes:
            for point in POINTS:
                chains.append([Trial(point, hit, mode, seed * 1000 + hit,
                                     "serve" if (hit + seed) % 2 else "recover")
                               for hit in range(1, 7)])
            for second in RECOVERY_POINTS:
                for first in ("preserve.before-l2", "write.after-image", "commit.after-state",
                              "apply.after-run", "failover.after-fence"):
                    chains.append([Trial(first, 1, mode, seed, "serve", f"{second}:1")])
    return chains


def run_chain(root: str, chain: list[Trial]) -> list[Result]:
    """The trials of a chain in order, up to and including the first one that was not
    killed (see full_plan)."""
    results = []
    for trial in chain:
        results.append(run_trial(root, trial))
        if not results[-1].killed:
            break
    return results
