"""`nbd-mc protect`, the primary side: its options and output.

The work is done by the package nbd_mc/primary/; this file only parses the command line,
prints, and maps the outcome to the exit status.  Kept apart from the
secondary's commands because the primary side grows its own options.
"""

from __future__ import annotations

import json
import sys

import click

from ..address import parse_address
from .common import Failure, json_wanted, main, size_option


@main.command()
@click.option("--qmp", "qmp_path", metavar="PATH",
              help="The primary QEMU's QMP unix socket (-qmp unix:PATH,server=on,wait=off).")
@click.option("--libvirt", "domain", metavar="DOMAIN",
              help="Instead of --qmp: a running libvirt domain (QMP through libvirt; "
                   "--drive names disk targets such as vda).")
@click.option("--connect", "connect_uri", metavar="URI", default="qemu:///system",
              show_default=True, help="libvirt connection URI for --libvirt.")
@click.option("--drive", "drives", required=True, multiple=True, metavar="ID[=EXPORT]",
              help="A QEMU drive (with --libvirt: a disk target, e.g. vda) to protect and the "
                   "secondary's export for it (default: ID). Repeat for every disk of the "
                   "consistency group.")
@click.option("--target", required=True, metavar="NBD_URI",
              help="The secondary's NBD server: nbd+unix:///?socket=PATH or nbd://HOST:PORT/ "
                   "(nbds... for TLS).")
@click.option("--control", required=True, metavar="ADDR", envvar="NBD_MC_CONTROL",
              help="The secondary's control address (socket path or tcp://HOST:PORT).")
@click.option("--interval", default="100ms", show_default=True, metavar="DURATION",
              help="Time the VM runs between checkpoints (e.g. 100ms, 2s).")
@click.option("--epochs", type=click.IntRange(1), metavar="N",
              help="Stop and detach after N commits.")
@click.option("--checkpoint-hook", "hook", metavar="CMD",
              help="Shell command run at each checkpoint while the VM is stopped and the "
                   "mirrors are drained, before the commit; NBD_MC_EPOCH is the epoch about to "
                   "be committed; a non-zero exit skips that commit.")
@click.option("--tls-certificates", "tls_dir", metavar="DIR", type=click.Path(file_okay=False),
              help="x509 client certificates (ca-cert.pem, client-cert.pem, client-key.pem) for "
                   "an nbds:// target and a tcp:// control address.")
@click.option("--metrics-file", metavar="PATH",
              help="Prometheus textfile rewritten atomically after every checkpoint "
                   "(see docs/metrics.md).")
@click.option("--drive-mirror", "legacy", is_flag=True,
              help="Use the older drive-mirror command (QEMU opens the NBD URI itself).")
@click.option("--stall-timeout", default="10s", show_default=True, metavar="DURATION",
              help="How long protect waits for QEMU and the secondary outside a "
                   "checkpoint's pause (a control command's answer, a sync or resync "
                   "round's progress) before the secondary counts as hung and is dropped; "
                   "inside a pause it waits at most 0.5 s, whatever this is.")
@click.option("--retry-for", default="forever", show_default=True, metavar="DURATION",
              help="How long to keep retrying a lost secondary before giving up "
                   "(0: stop at the first outage).")
@click.option("--verify", is_flag=True,
              help="Online verify: at every checkpoint compare one slice of each drive with "
                   "the secondary's committed epoch, walking the whole disks over and over.")
@click.option("--verify-slice", "verify_slice", default="4M", show_default=True, metavar="SIZE",
              help="Bytes verified per checkpoint (copied while the VM is paused).")
@click.option("--repair/--no-repair", "repair", default=None,
              help="With --verify: copy each range found different from the primary's disk "
                   "at the next checkpoint and verify it again (protect: on by default; "
                   "nbd-mc verify: off by default, it only reports).")
@click.option("--resync", "resync", type=click.Choice(["auto", "full", "checksum"]),
              default="auto", show_default=True,
              help="How to bring a secondary in step when no dirty bitmap covers its last "
                   "commit: checksum compares both disks block by block and copies what "
                   "differs, full copies everything; auto takes checksum when the "
                   "secondary's image holds data, full when it is empty.")
@click.option("--events", "events", metavar="FILE|-",
              help="Write protect's events as they happen, one JSON object a line "
                   "(state changes, resyncs, refusals, the closing report), appended to "
                   "FILE, or to standard output with - (the human lines then go to "
                   "standard error). Fields: docs/events.md.")
@click.option("--mode", "mode", type=click.Choice(["sync", "async"]), default="sync",
              show_default=True,
              help="sync: every guest write waits for the secondary (nothing committed is "
                   "ever behind the guest by more than one epoch); async: guest writes "
                   "complete at local-disk speed and each epoch ships in the background, "
                   "committing once it is all on the secondary (for slow links, see "
                   "docs/async.md).")
@click.option("--max-lag", "max_lag", default="10s", show_default=True, metavar="DURATION",
              help="async: how far the committed epoch may trail the primary; when the link "
                   "cannot keep up, checkpoints are taken anyway, one after another, and the "
                   "VM runs in short slices between pauses of at most 0.5 s until the "
                   "backlog has crossed (back-pressure). 'none' for no bound.")
@click.option("--rate", "rate", default="0", show_default=True, metavar="BYTES/s",
              help="Bandwidth per drive for the initial sync, resyncs and async shipping "
                   "(QEMU's job speed), e.g. 20M; 0 for unlimited.")
@click.option("--rate-file", "rate_file", metavar="PATH",
              help="A file holding the rate (e.g. '5M'); protect rereads it when it changes, "
                   "so the rate can be changed while protect runs.")
@click.option("--quiet", "-q", is_flag=True, help="Only the closing summary and errors.")
@click.option("--json", "as_json", is_flag=True, help="Print the closing report as JSON.")
def protect(qmp_path, domain, connect_uri, drives, target, control, interval, epochs, hook,
            tls_dir, metrics_file, legacy, stall_timeout, retry_for, quiet, as_json,
            events=None, verify=False, verify_slice="4M", verify_passes=None, repair=None,
            resync="auto", mode="sync", max_lag="10s", rate="0", rate_file=None):
    """Mirror a running QEMU's drives into the secondary and checkpoint them.

    Attaches the secondary's exports to QEMU, runs blockdev-mirror (sync=full,
    write-blocking) for every drive, waits for the initial sync, then every
    interval pauses the VM, checks the mirrors are drained, commits the next
    epoch on the secondary and resumes the VM.  Ctrl-C or SIGTERM finishes the
    current checkpoint, removes the mirrors and leaves the VM running (exit 0).
    If the secondary is lost, protect drops the mirrors (the VM runs on), retries
    until it answers and resyncs only what changed; it exits 1 when QEMU is gone,
    the secondary refuses for good, or --retry-for runs out.
    """
    from .. import primary  # here: qemu.qmp and asyncio would slow every other command's start
    from ..primary.rate import parse_rate
    if bool(qmp_path) == bool(domain):
        raise click.UsageError("give --qmp PATH or --libvirt DOMAIN (one of them)")
    if mode == "async" and legacy:
        raise click.UsageError("--mode async needs blockdev-mirror: drop --drive-mirror")
    try:
        opts = primary.Options(
            qmp=qmp_path, drives=primary.parse_drives(drives),
            target=primary.parse_nbd_uri(target), control=control,
            interval=primary.parse_interval(interval), epochs=epochs, hook=hook,
            tls_certificates=tls_dir, legacy_drive_mirror=legacy, libvirt=domain,
            connect=connect_uri, metrics_file=metrics_file,
            stall_timeout=primary.parse_interval(stall_timeout),
            retry_for=(None if retry_for == "forever"
                       else primary.parse_interval(retry_for, zero=True)),
            verify=verify, verify_slice=size_option(verify_slice), verify_passes=verify_passes,
            repair=True if repair is None else repair, resync=resync, events=events,
            mode=mode, max_lag=(None if max_lag.strip().lower() in ("none", "off")
                                else primary.parse_interval(max_lag)),
            rate=parse_rate(rate), rate_file=rate_file)
        parse_address(control)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if events and events != "-":
        try:
            open(events, "a").close()
        except OSError as e:
            raise click.BadParameter(f"{events}: {e.strerror}", param_hint="--events") from None
    as_json = json_wanted(as_json)
    # with --events - standard output carries only JSON lines: the human lines go to
    # standard error, and the closing report is the stream's last event
    console = primary.Console(stream=sys.stderr if events == "-" else None,
                              quiet=quiet or as_json)
    report = primary.protect(opts, console)
    to_stderr = events == "-"
    if as_json and not to_stderr:
        click.echo(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    elif not as_json:
        click.echo(primary.summary(report), err=to_stderr)
    if report.outcome != "detached":
        raise Failure(primary.failure_advice(report))
    if not as_json:
        click.echo("detached: the mirrors are removed and the VM runs on without protection",
                   err=to_stderr)
    unrepaired = _unrepaired(report.verify or {})
    if verify_passes and unrepaired:
        raise Failure(f"verify: {len(unrepaired)} range(s) differ between the "
                      "primary and the secondary's committed state (listed above)")
    if verify_passes and (report.verify or {}).get("passes", 0) < verify_passes:
        raise Failure("verify: stopped before a whole pass was checked")


def _unrepaired(v: dict) -> list:
    """The mismatches no repair covered (every one when nothing was repaired)."""
    fixed = (v.get("repaired") or {}).get("ranges") or []

    def covered(m):
        end = m["offset"] + m["length"]
        pos = m["offset"]
        for r in sorted(fixed, key=lambda r: r["offset"]):
            if r["disk"] == m["disk"] and r["offset"] <= pos < r["offset"] + r["length"]:
                pos = r["offset"] + r["length"]
        return pos >= end
    return [m for m in v.get("mismatches") or [] if not covered(m)]


def _verify_command() -> click.Command:
    """`nbd-mc verify`: protect for exactly one verify pass, then detach.

    The same options as protect (a verify is a protection run: it needs the mirror
    and the checkpoints to have committed states to compare), minus --epochs and
    --verify; exit 1 if any range differs (with --repair: differs and was not
    repaired).
    """
    params = [p for p in protect.params if p.name not in ("epochs", "verify")]

    def run(repair=None, **kwargs):
        click.get_current_context().invoke(protect, epochs=None, verify=True, verify_passes=1,
                                           repair=bool(repair), **kwargs)
    return click.Command(
        "verify", params=params, callback=run,
        help="Online verify (like drbdadm verify): protect until every drive has been "
             "compared once, slice by slice, with the secondary's committed state at a "
             "checkpoint; report differing ranges (exit 1) and detach.  Run it when protect "
             "is not running (for a running protect use protect --verify).")


main.add_command(_verify_command())
