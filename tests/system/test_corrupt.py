"""Corrupt and foreign files: `serve`, `recover` and `inspect` refuse with a precise
message (exit 1) and change nothing -- every file of the group is hashed before and
after (except the lock holder's pid, the server log and pid file: faulty.RUNTIME_FILES).

The group under test has undo data in both overlays (a clean stop in the middle of
an epoch), so a tool that wrongly accepted a file would change the images.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from click.testing import CliRunner

from support.faulty import file_hashes
from nbd_mc import cli, qcow2
from nbd_mc.secondary.engine import Group
from nbd_mc.errors import NbdMcError
from support.reliability import record
from support.servers import describe, make_image, nbd_mc, plugin_pids, read_file, run
from support.servers import write_file


C = 65536
SIZES = {"a": 1 << 20, "b": (1 << 20) + C}


class Group2:
    """Two disks with undo data, and a pristine copy of every file to restore."""

    def __init__(self, servers, sub: str):
        rng = random.Random(5)
        root = servers.path(sub)
        os.makedirs(root)
        self.root = root
        self.images = {d: os.path.join(root, f"{d}.raw") for d in SIZES}
        for d, size in SIZES.items():
            make_image(self.images[d], size, rng, data_fraction=1.0)
        self.srv = servers.new(self.images, state_dir=os.path.join(root, "st"))
        self.srv.start()
        self.srv.execute("commit", epoch=1)
        for d in SIZES:
            h = self.srv.connect(d)
            h.pwrite(rng.randbytes(2 * C), C)
            h.zero(C, 8 * C)
        self.srv.stop()
        self.st = self.srv.state_dir
        self.pristine = {p: read_file(p) for p in self._files()}

    def _files(self):
        out = list(self.images.values())
        for name in os.listdir(self.st):
            p = os.path.join(self.st, name)
            if os.path.isfile(p) and name not in ("lock", "nbdkit.log", "nbdkit.pid"):
                out.append(p)
        return out

    def restore(self) -> None:
        for p in self._files():
            if p not in self.pristine:
                os.unlink(p)
        for p, data in self.pristine.items():
            if os.path.isdir(p):
                shutil.rmtree(p)
            write_file(p, data)

    def overlay(self, d: str = "a") -> str:
        return os.path.join(self.st, f"{d}.undo.qcow2")

    def state(self) -> str:
        return os.path.join(self.st, "state.json")


# --- the corruptions -----------------------------------------------------------------
def truncate(size_fn):
    def f(g):
        p = g.overlay()
        os.truncate(p, size_fn(os.path.getsize(p)))
    return f


def qemu_img(*args):
    def f(g):
        r = run(["qemu-img", *[a.format(ov=g.overlay(), b=g.images["b"], a=g.images["a"])
                               for a in args]])
        assert r.returncode == 0, describe(r)
    return f


def header_bits(offset: int, bits: int):
    def f(g):
        with open(g.overlay(), "r+b") as fh:
            fh.seek(offset)
            v = struct.unpack(">Q", fh.read(8))[0]
            fh.seek(offset)
            fh.write(struct.pack(">Q", v | bits))
    return f


def replace_overlay(make):
    def f(g):
        os.unlink(g.overlay())
        make(g)
    return f


def foreign_qcow2(g):
    r = run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", g.images["a"], "-F", "raw",
             g.overlay()])
    assert r.returncode == 0, describe(r)


def l2_entry_offset(path: str, guest: int) -> int:
    ov = qcow2.UndoOverlay(path, -1, readonly=True)
    try:
        bits = ov.geo.l2_bits
        return ((ov.l1[guest >> bits] & qcow2.OFFSET_MASK)
                + (guest & ((1 << bits) - 1)) * 8 * ov.geo.entry_words)
    finally:
        ov.close()


def flip_l2(bit: int, guest: int = 1):
    def f(g):
        off = l2_entry_offset(g.overlay(), guest)
        with open(g.overlay(), "r+b") as fh:
            fh.seek(off)
            v = struct.unpack(">Q", fh.read(8))[0]
            fh.seek(off)
            fh.write(struct.pack(">Q", v ^ (1 << bit)))
    return f


def state_text(text):
    def f(g):
        write_file(g.state(), text if isinstance(text, bytes) else text.encode())
    return f


def state_edit(fn):
    def f(g):
        body = json.loads(read_file(g.state()))
        fn(body)
        write_file(g.state(), json.dumps(body).encode())
    return f


def image(fn):
    def f(g):
        fn(g.images["a"])
    return f


def _set(key, value):
    def f(body):
        body[key] = value
    return f


def _del(key):
    def f(body):
        del body[key]
    return f


def _disk(key, value):
    def f(body):
        body["disks"][0][key] = value
    return f


def _swap_images(body):
    a, b = body["disks"]
    a["image"], b["image"] = b["image"], a["image"]
    a["size"], b["size"] = b["size"], a["size"]


#: (name, corruption, message fragment the refusal must contain)
CASES = [
    # overlay: truncated
    ("overlay truncated to 0", truncate(lambda n: 0), "truncated header"),
    ("overlay truncated to 1000 bytes", truncate(lambda n: 1000), "truncated"),
    ("overlay truncated to half", truncate(lambda n: n // 2), "truncated"),
    ("overlay loses its last cluster", truncate(lambda n: n - C), "past end of file"),
    ("overlay cut inside its last cluster", truncate(lambda n: n - 1), "past end of file"),
    # overlay: foreign or mismatched
    ("overlay backing is another image", qemu_img("rebase", "-u", "-f", "qcow2", "-b", "{b}",
                                                  "-F", "raw", "{ov}"), "backing file is"),
    ("overlay backing does not exist", qemu_img("rebase", "-u", "-f", "qcow2", "-b",
                                                "/nonexistent.raw", "-F", "raw", "{ov}"),
     "backing file is"),
    ("overlay backing format qcow2", qemu_img("rebase", "-u", "-f", "qcow2", "-b", "{a}",
                                              "-F", "qcow2", "{ov}"), "backing format is qcow2"),
    ("overlay resized", qemu_img("resize", "-q", "-f", "qcow2", "{ov}", "+1M"),
     "does not match image size"),
    ("overlay has an internal snapshot", qemu_img("snapshot", "-q", "-c", "s1", "{ov}"),
     "internal snapshots"),
    ("overlay made by qemu-img", replace_overlay(foreign_qcow2), "not an nbd-mc overlay"),
    ("overlay is random bytes", replace_overlay(lambda g: write_file(g.overlay(),
                                                                     random.randbytes(3 * C))),
     "bad magic"),
    ("overlay is missing", replace_overlay(lambda g: None), "cannot open overlay"),
    ("overlay marked dirty", header_bits(72, qcow2.INCOMPAT_DIRTY), "dirty"),
    ("overlay marked corrupt", header_bits(72, qcow2.INCOMPAT_CORRUPT), "marked corrupt"),
    ("overlay unknown incompatible feature", header_bits(72, 1 << 7), "unsupported incompatible"),
    # overlay: one flipped bit in a data cluster's L2 entry (all 64 in test_every_l2_bit_flip)
    ("L2 entry bit 4 (reserved)", flip_l2(4), "is invalid"),
    ("L2 entry bit 9 (unaligned)", flip_l2(9), "not cluster aligned"),
    ("L2 entry bit 16 (onto metadata)", flip_l2(17), "overlaps"),
    ("L2 entry bit 40 (past the end)", flip_l2(40), "past end of file"),
    ("L2 entry bit 62 (compressed)", flip_l2(62), "compressed"),
    ("L2 entry bit 63 (COPIED)", flip_l2(63), "COPIED"),
    # state file
    ("state file empty", state_text(b""), "unreadable state file"),
    ("state file random bytes", state_text(random.Random(1).randbytes(600)), "state file"),
    ("state file truncated JSON", lambda g: write_file(g.state(), read_file(g.state())[:100]),
     "unreadable state file"),
    ("state file a JSON array", state_text("[]"), "unreadable state file"),
    ("state file NUL bytes", state_text(b"\0" * 4096), "unreadable state file"),
    ("state file other format", state_edit(_set("format", "qemu")), "unreadable state file"),
    ("state file version 2", state_edit(_set("version", 2)), "unreadable state file"),
    ("state file committed a string", state_edit(_set("committed", "one")), "unreadable"),
    ("state file committed negative", state_edit(_set("committed", -1)), "inconsistent"),
    ("state file role unknown", state_edit(_set("role", "boss")), "inconsistent"),
    ("state file no disks", state_edit(_set("disks", [])), "inconsistent"),
    ("state file disks missing", state_edit(_del("disks")), "unreadable state file"),
    ("state file disk with extra field", state_edit(_disk("colour", "red")), "unreadable"),
    ("state file behind the overlays", state_edit(_set("committed", 0)),
     "returns to epoch 1, but the state file says 0"),
    ("state file far ahead of the overlays", state_edit(_set("committed", 7)),
     "returns to epoch 1, but the state file says 7"),
    ("state file with the images swapped", state_edit(_swap_images),
     ("backing file is", "does not match image size")),
    # image
    ("image grown by 512 bytes", image(lambda p: os.truncate(p, SIZES["a"] + 512)),
     "resized behind"),
    ("image shrunk by a cluster", image(lambda p: os.truncate(p, SIZES["a"] - C)),
     "resized behind"),
    ("image missing", image(os.unlink), "does not exist"),
    ("image replaced by a directory", image(lambda p: (os.unlink(p), os.mkdir(p))),
     "not a regular file"),
]


_cli_lock = threading.Lock()


def run_serve(argv) -> tuple[int, str]:
    """`nbd-mc serve` as its own process: it starts the real nbdkit."""
    r = nbd_mc(*argv)
    return r.returncode, r.stdout + r.stderr


def run_in_process(argv) -> tuple[int, str]:
    """`recover` and `inspect` through the same click entry point as the installed
    command, in this process (saves an interpreter start per call)."""
    with _cli_lock:  # CliRunner swaps sys.stdout: one at a time
        r = CliRunner().invoke(cli.main, argv, catch_exceptions=False)
    return r.exit_code, r.output


def refusals(g: Group2, name: str, corrupt, fragment: str) -> list[str]:
    """Apply one corruption and run every tool; return what went wrong (nothing = pass)."""
    g.restore()
    corrupt(g)
    roots = [g.st, *g.images.values()]
    before = file_hashes(*roots)
    runs = [("serve", ["serve", "--state-dir", g.st]),
            ("recover", ["recover", "--state-dir", g.st]),
            ("inspect DIR", ["inspect", g.st])]
    if name.startswith(("overlay", "L2")) and os.path.exists(g.overlay()):
        runs.append(("inspect OVERLAY", ["inspect", g.overlay()]))
    problems = []
    fragments = fragment if isinstance(fragment, tuple) else (fragment,)
    for tool, argv in runs:
        rc, said = (run_serve if tool == "serve" else run_in_process)(argv)
        if rc != 1:
            problems.append(f"{name}: {tool} exited {rc}: {said.strip()[:300]}")
        elif tool != "inspect OVERLAY" and not any(f in said for f in fragments):
            problems.append(f"{name}: {tool} did not say {fragments}: {said.strip()[:300]}")
        elif "Traceback" in said:
            problems.append(f"{name}: {tool} printed a traceback")
        after = file_hashes(*roots)
        if after != before:
            changed = sorted(set(after.items()) ^ set(before.items()))
            problems.append(f"{name}: {tool} changed {sorted({p for p, _ in changed})}")
            before = after
    if plugin_pids(g.st):
        problems.append(f"{name}: nbdkit left running")
    return problems


def test_corrupt_and_foreign_files_are_refused(servers):
    groups = [Group2(servers, "g1"), Group2(servers, "g2")]
    # the pristine group is accepted (so each refusal is due to its corruption)
    r = nbd_mc("inspect", groups[0].st)
    assert r.returncode == 0, describe(r)
    chunks = [CASES[0::2], CASES[1::2]]

    def work(i):
        return [p for case in chunks[i] for p in refusals(groups[i], *case)]

    with ThreadPoolExecutor(2) as pool:
        problems = [p for ps in pool.map(work, range(2)) for p in ps]
    record("corrupt or foreign files (serve, recover, inspect)", len(CASES), len(problems),
           tool_runs=sum(3 + c[0].startswith(("overlay", "L2")) for c in CASES))
    assert not problems, "\n".join(problems)
    # and the pristine group still recovers and serves
    for g in groups:
        g.restore()
        r = nbd_mc("recover", "--state-dir", g.st)
        assert r.returncode == 0, describe(r)


def test_every_l2_bit_flip(servers):
    """Flip each of the 64 bits of a data cluster's L2 entry: every flip that
    qemu-img check calls corruption is refused by the engine (what serve and recover
    run), with nothing written.  Bit 0 turns the entry into a valid "zero, allocated"
    entry: a different but valid file, which no checker can tell from the real one."""
    g = Group2(servers, "g")
    refused, undetectable, problems = [], [], []
    for bit in range(64):
        g.restore()
        flip_l2(bit)(g)
        before = file_hashes(g.st, *g.images.values())
        check = run(["qemu-img", "check", "-q", "-f", "qcow2", g.overlay()]).returncode
        try:
            Group(g.st).close()
            accepted = True
        except NbdMcError:
            accepted = False
        if not accepted and file_hashes(g.st, *g.images.values()) != before:
            problems.append(f"bit {bit}: refused, but files changed")
        if accepted and check != 0:
            problems.append(f"bit {bit}: accepted, but qemu-img check exits {check}")
        (undetectable if accepted else refused).append(bit)
        if accepted:
            g.restore()
    record("L2 entry bit flips (engine)", 64, len(problems), refused=len(refused),
           valid_but_different=undetectable)
    assert not problems, problems
    # with extended L2 entries (subclusters) bit 0 is reserved: every flip is caught
    g.restore()
    probe = qcow2.UndoOverlay(g.overlay(), -1, readonly=True)
    extended = probe.subclusters
    probe.close()
    assert undetectable == ([] if extended else [0]), undetectable


@pytest.fixture(autouse=True)
def _no_leftovers(workdir):
    yield
    assert not plugin_pids(workdir + "/")
