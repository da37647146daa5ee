"""fio job files for the nbd engine, and their JSON results.

Every workload is one fio job on one NBD connection (the `nbd` ioengine, which
uses libnbd) at iodepth 16. "First touch" 4 KiB writes use fio's strided zones
so that each write lands in a different cluster (see first_touch()).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import util

IODEPTH = 16
JOB = "bench"


@dataclass
class FioResult:
    rw: str
    iops: float
    bw_bytes: float        # bytes per second
    io_bytes: int
    runtime_s: float
    clat_p50_us: float | None = None
    clat_p99_us: float | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def mb_s(self):
        return self.bw_bytes / 1e6


def job_text(uri, rw, bs, *, size=None, offset=None, runtime=None, time_based=False,
             ramp=None, extra=None, iodepth=IODEPTH):
    lines = [
        "[global]",
        "ioengine=nbd",
        f"uri={uri}",
        f"iodepth={iodepth}",
        "group_reporting=1",
        f"[{JOB}]",
        f"rw={rw}",
        f"bs={bs}",
    ]
    if size is not None:
        lines.append(f"size={size}")
    if offset:
        lines.append(f"offset={offset}")
    if runtime is not None:
        lines.append(f"runtime={runtime}")
    if time_based:
        lines.append("time_based=1")
    if ramp:
        lines.append(f"ramp_time={ramp}")
    if rw.startswith("rand") and "zonemode" not in (extra or {}):
        lines.append("norandommap=1")
        lines.append("randrepeat=0")
    for k, v in (extra or {}).items():
        lines.append(f"{k}={v}")
    return "\n".join(lines) + "\n"


def first_touch(region_size, count, cluster_size, bs=4096):
    """fio options for `count` writes of `bs` bytes, each in a different cluster.

    fio's strided zone mode: the region is cut into `count` zones of whole
    clusters, and one `bs` write lands at a random block of each zone, zones in
    ascending order. (fio refuses `blockalign` together with its random map;
    an iolog replay would give a random order, but fio 3.33 with the nbd engine
    skips entries at the end of a replay and closes the connection with writes
    in flight, which kills nbdkit 1.32 on an assertion.)
    """
    zone = region_size // count // cluster_size * cluster_size
    if zone < cluster_size:
        raise ValueError(f"{count} first touches but only "
                         f"{region_size // cluster_size} clusters")
    return {"size": region_size, "extra": {
        "zonemode": "strided", "zonerange": zone, "zonesize": bs,
        "io_size": count * bs, "randrepeat": 0}}


def parse(text, rw):
    """The result of a one-job fio run from `--output-format=json` stdout."""
    # The nbd engine prints "fio: connected to NBD server" before the JSON.
    start = text.find("\n{")
    start = 0 if text.startswith("{") else start + 1
    if start < 0:
        raise ValueError("no JSON in fio output:\n" + text[-2000:])
    data = json.loads(text[start:])
    job = data["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}")
    ddir = "read" if "read" in rw else "write"
    d = job[ddir]
    pct = d.get("clat_ns", {}).get("percentile", {})
    p50 = pct.get("50.000000")
    p99 = pct.get("99.000000")
    return FioResult(
        rw=rw, iops=float(d["iops"]), bw_bytes=float(d["bw_bytes"]),
        io_bytes=int(d["io_bytes"]), runtime_s=d["runtime"] / 1000.0,
        clat_p50_us=p50 / 1000 if p50 else None,
        clat_p99_us=p99 / 1000 if p99 else None, raw=job)


def run(workdir, uri, rw, bs, timeout=None, **kw):
    """Write the job file into workdir, run fio, return a FioResult."""
    workdir = Path(workdir)
    jobfile = workdir / f"job-{rw}-{bs}-qd{kw.get('iodepth', IODEPTH)}.fio"
    jobfile.write_text(job_text(uri, rw, bs, **kw))
    res = util.run(["fio", "--output-format=json", str(jobfile)], check=False,
                   timeout=timeout or 1800)
    if res.returncode != 0:
        raise RuntimeError(f"fio {rw} {bs} failed ({res.returncode}): "
                           f"{res.stderr.strip()[-2000:]}")
    return parse(res.stdout, rw)
