"""Workload 12: reading the primary's drive from its raw file or through QEMU's export.

    .venv/bin/python -m bench.verify_source [--size 1G] [--slice 4M] [--work DIR] [--out F]

Online verify, the targeted repair and the checksum sync read the primary's drive
through nbd_mc/primary/source.py: the local raw image file when the drive is one,
otherwise a read-only NBD export QEMU makes of the drive's node (qcow2 and
network drives).  This measures what the second way costs, on SIZE bytes of
random data (no holes: every byte is read), a real QEMU (-machine none):

1. reads alone, with the VM stopped as at a checkpoint: the whole drive slice by
   slice (SLICE each, the verify capture) from the raw file, from the same raw
   image through QEMU's export, and from a qcow2 copy through the export --
   median and worst time per slice (what a slice adds to the VM's pause) and MiB/s;
   one warm-up pass first (the page cache holds the images, as on a busy host);
2. the whole verify walk, end to end: `nbd-mc verify --json --interval 10ms
   --verify-slice SLICE` against `nbd-mc serve` (an empty replica: the run's full
   sync puts the data there first), once with the raw drive and once with the
   qcow2 drive -- the report's ``mib_per_s`` and ``capture_ms``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import util
from nbd_mc.statedir import StateDir

MiB = util.MiB


def _qemu(work: Path, drives: dict[str, tuple[Path, str]]):
    """QEMU with ``{drive: (image, format)}``; (process, QMP path for nbd-mc, test QMP)."""
    qmp_p, qmp_t = work / "p.qmp", work / "t.qmp"
    for p in (qmp_p, qmp_t):
        if p.exists():
            p.unlink()
    argv = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
            "-qmp", f"unix:{qmp_p},server=on,wait=off", "-qmp", f"unix:{qmp_t},server=on,wait=off"]
    for drive, (img, fmt) in drives.items():
        argv += ["-drive", f"if=none,id={drive},file={img},format={fmt}"]
    proc = subprocess.Popen(argv, stdout=open(work / "qemu.log", "w"), stderr=subprocess.STDOUT,
                            env=util.env())
    util.wait_for(lambda: util.unix_connectable(qmp_t), 30, "QEMU")
    return proc, qmp_p, qmp_t


def _stop_qemu(proc) -> None:
    proc.kill()
    proc.wait(30)


def reads(work: Path, raw: Path, qcow2: Path, size: int, slice_size: int) -> dict:
    from nbd_mc.primary import DriveSpec, Qmp
    from nbd_mc.primary.source import PrimarySource
    proc, qmp_p, _ = _qemu(work, {"d_raw": (raw, "raw"), "d_qcow2": (qcow2, "qcow2")})
    out = {}
    try:
        qmp = Qmp(str(qmp_p))
        qmp.cmd("stop")  # as at a checkpoint
        drives = [DriveSpec("d_raw", "a"), DriveSpec("d_qcow2", "b")]
        cases = (("raw file", False, "d_raw"), ("raw through QEMU's export", True, "d_raw"),
                 ("qcow2 through QEMU's export", False, "d_qcow2"))
        for label, prefer_export, drive in cases:
            src = PrimarySource.open(qmp, drives, f"bench:{qmp_p}", prefer_export=prefer_export)
            try:
                buf = bytearray(slice_size)
                times = []
                for rep in range(2):  # the first pass warms the page cache
                    times = []
                    t_all = time.perf_counter()
                    for off in range(0, size, slice_size):
                        n = min(slice_size, size - off)
                        t0 = time.perf_counter()
                        src.read_into(drive, memoryview(buf)[:n], off)
                        times.append(time.perf_counter() - t0)
                    seconds = time.perf_counter() - t_all
                out[label] = {"kind": src[drive].kind,
                              "slice_ms_median": round(statistics.median(times) * 1000, 3),
                              "slice_ms_worst": round(max(times) * 1000, 3),
                              "mib_per_s": round(size / MiB / seconds, 1)}
            finally:
                src.close()
        qmp.cmd("cont")
        qmp.close()
    finally:
        _stop_qemu(proc)
    return out


def walk(work: Path, image: Path, fmt: str, size: int, slice_size: int) -> dict:
    nbd_mc = str(util.VENV_BIN / "nbd-mc")
    st = work / f"st-{fmt}"
    subprocess.run(["rm", "-rf", str(st)], check=True)
    rep = work / "replica.raw"
    with open(rep, "wb") as f:
        f.truncate(0)
        f.truncate(size)
    util.run([nbd_mc, "serve", f"vda={rep}", "--state-dir", str(st)])
    proc, qmp_p, _ = _qemu(work, {"drive0": (image, fmt)})
    try:
        r = util.run([nbd_mc, "verify", "--qmp", str(qmp_p), "--drive", "drive0=vda",
                      "--target", f"nbd+unix:///?socket={st}/nbd.sock", "--control",
                      StateDir(st).control, "--interval", "10ms", "--verify-slice",
                      str(slice_size), "--json"], check=False, timeout=1800)
        if r.returncode:
            raise RuntimeError(f"nbd-mc verify failed: {r.stdout}{r.stderr}")
        v = json.loads(r.stdout)["verify"]
    finally:
        _stop_qemu(proc)
        subprocess.run([nbd_mc, "stop", "--state-dir", str(st)], capture_output=True,
                       env=util.env())
    return {"mib_per_s": v["mib_per_s"], "capture_ms": v["capture_ms"],
            "check_ms": v["check_ms"], "verified_bytes": v["verified_bytes"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.verify_source",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--slice", default="4M")
    ap.add_argument("--work", default=str(util.ROOT / "bench" / "work" / "verify-source"))
    ap.add_argument("--out", help="write the figures as JSON here")
    a = ap.parse_args(argv)
    size, slice_size = util.parse_size(a.size), util.parse_size(a.slice)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    raw, qcow2 = work / "primary.raw", work / "primary.qcow2"
    with open(raw, "wb") as f:  # random data everywhere: every byte is really read
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    if qcow2.exists():
        qcow2.unlink()
    util.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)])
    res = {"size": size, "slice": slice_size, "reads": reads(work, raw, qcow2, size, slice_size),
           "walk": {"raw file": walk(work, raw, "raw", size, slice_size),
                    "qcow2 through QEMU's export": walk(work, qcow2, "qcow2", size,
                                                        slice_size)}}
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    for label, r in res["reads"].items():
        print(f"read {label}: {r['slice_ms_median']} ms per {a.slice} slice (worst "
              f"{r['slice_ms_worst']}), {r['mib_per_s']} MiB/s", file=sys.stderr)
    for label, r in res["walk"].items():
        print(f"verify walk, {label}: {r['mib_per_s']} MiB/s, capture median "
              f"{r['capture_ms']['median']} ms ({r['capture_ms']['per_mib']} ms/MiB)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
