"""The `nbd-mc` command line (click).

Exit status: 0 success, 1 the operation was refused or failed (the message says
why), 2 usage error.  `--json` prints the control reply's ``return`` object.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from . import engine, server
from .control import ControlClient, TlsFiles, parse_address
from .errors import NbdMcError, StateError


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def parse_size(text: str) -> int:
    """64K, 2M, 65536 ... (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        return int(num) * units[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 64K, 1M)") from None


class Failure(click.ClickException):
    """A refusal: 'nbd-mc: error: ...' on stderr, exit status 1."""

    exit_code = 1

    def show(self, file=None):
        click.echo(f"nbd-mc: error: {self.message}", err=True)


def refusals(fn):
    """Turn our errors and unreachable servers into exit status 1 with one line."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NbdMcError as e:
            cls = getattr(e, "error_class", "")
            prefix = f"{cls}: " if cls and cls not in ("StateError", "GenericError") else ""
            raise Failure(prefix + e.desc) from None
        except (ValueError, OSError) as e:
            raise Failure(str(e)) from None
    return wrapper


def emit(obj: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True) if as_json else text)


# --- shared client options -------------------------------------------------------
def control_options(fn):
    @click.option("--control", "control", metavar="ADDR", envvar="NBD_MC_CONTROL",
                  help="Control address: a unix socket path or tcp://HOST:PORT "
                       "(default $NBD_MC_CONTROL, else DIR/control.sock).")
    @click.option("--state-dir", "state_dir", metavar="DIR", type=click.Path(file_okay=False),
                  help="The server's state directory (its control socket is DIR/control.sock).")
    @click.option("--tls-certificates", "tls_dir", metavar="DIR", type=click.Path(file_okay=False),
                  help="x509 directory with ca-cert.pem and client-cert/key.pem, for tcp:// control.")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @functools.wraps(fn)
    def wrapper(*args, control, state_dir, tls_dir, as_json, **kwargs):
        ctx = click.get_current_context()
        as_json = as_json or bool(ctx.find_root().params.get("as_json"))
        target = Target(control, state_dir, tls_dir)
        return fn(*args, target=target, as_json=as_json, **kwargs)
    return wrapper


class Target:
    """Where a client command sends its request."""

    def __init__(self, control, state_dir, tls_dir):
        self.state_dir = state_dir
        self.tls_dir = tls_dir
        if not control and state_dir:
            control = os.path.join(state_dir, "control.sock")
        self.control = control

    def client(self) -> ControlClient:
        if not self.control:
            raise click.UsageError("no control address: give --control ADDR, --state-dir DIR "
                                   "or set NBD_MC_CONTROL")
        tls = TlsFiles(self.tls_dir) if self.tls_dir else None
        try:
            return ControlClient(self.control, tls=tls)
        except (OSError, ValueError) as e:
            raise Failure(f"cannot reach the nbd-mc server at {self.control}: {e}") from None

    def execute(self, name: str, **arguments) -> dict:
        with self.client() as c:
            return c.execute(name, **arguments)


# --- the group ----------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nbd-mc")
@click.option("--json", "as_json", is_flag=True, help="JSON output for every command.")
def main(as_json):
    """nbd-mc: a disk replica that can always return to the last checkpoint.

    The secondary runs `nbd-mc serve`; the primary's QEMU mirrors into it and
    `nbd-mc protect` commits an epoch at every checkpoint.  When the primary
    dies, `nbd-mc failover` returns the disks to the last commit.
    """


@main.command()
@click.argument("disks", nargs=-1, metavar="DISK...")
@click.option("--state-dir", required=True, metavar="DIR", type=click.Path(file_okay=False),
              help="Where the group's state and undo overlays live (created if missing).")
@click.option("--socket", "socket_path", metavar="PATH", help="NBD unix socket (default DIR/nbd.sock).")
@click.option("--port", type=click.IntRange(0, 65535), help="Serve NBD on TCP instead.")
@click.option("--bind", metavar="ADDR", help="Address to bind with --port.")
@click.option("--control", metavar="ADDR", help="Control address (default DIR/control.sock; "
              "tcp://HOST:PORT needs --tls-certificates).")
@click.option("--cluster-size", metavar="SIZE", default=None,
              help="Undo granularity, 4K..2M (default 64K; fixed when the group is created).")
@click.option("--durability", type=click.Choice(engine.DURABILITY_MODES), default=None,
              help="process: survive kill -9; power: also power loss (slower).  Default: "
                   "process for a new group, else the mode it was last served with.")
@click.option("--tls", type=click.Choice(["off", "on", "require"]), default="off", show_default=True,
              help="NBD over TLS (x509).")
@click.option("--tls-certificates", metavar="DIR", type=click.Path(file_okay=False),
              help="x509 directory (ca-cert.pem, server-cert.pem, server-key.pem, ...).")
@click.option("--thread-model", type=click.Choice(["parallel", "serialize"]), default="serialize",
              show_default=True, help="nbdkit thread model for the plugin: on few cores one "
              "request at a time beats threads fighting over Python's GIL (see README, Benchmarks).")
@click.option("--threads", type=click.IntRange(1, 256), help="nbdkit worker threads per connection.")
@click.option("--foreground", is_flag=True, help="Stay in the foreground (for supervisors).")
@click.option("--pidfile", metavar="PATH", help="Write nbdkit's pid here (default DIR/nbdkit.pid).")
@click.option("--json", "as_json", is_flag=True, help="Print addresses as JSON.")
@refusals
def serve(disks, state_dir, socket_path, port, bind, control, cluster_size, durability, tls,
          tls_certificates, thread_model, threads, foreground, pidfile, as_json):
    """Serve DISK... (PATH or NAME=PATH) as one consistency group.

    Creates the state directory, or reopens it (then the DISK list, if given,
    must match) and recovers it to the last commit.  Runs nbdkit in the
    background and returns once the NBD and control sockets answer.
    """
    if socket_path and port is not None:
        raise click.UsageError("give --socket or --port, not both")
    opts = server.ServeOptions(
        state_dir=state_dir, disks=[engine.parse_disk_spec(d) for d in disks], socket=socket_path,
        port=port, bind=bind, cluster_size=parse_size(cluster_size) if cluster_size else None,
        durability=durability, tls=tls, tls_certificates=tls_certificates, control=control,
        foreground=foreground, pidfile=pidfile, thread_model=thread_model, threads=threads)
    as_json = as_json or bool(click.get_current_context().find_root().params.get("as_json"))

    def announce(pid: int) -> None:
        with ControlClient(opts.control, tls=server.control_tls(opts)) as c:
            st = c.execute("query-status")
        names = [d["name"] for d in st["disks"]]
        info = {"pid": pid, "nbd": server.nbd_uri(opts), "control": opts.control,
                "exports": [e for n in names for e in (n, n + "@committed")],
                "uris": {n: server.nbd_uri(opts, n) for n in names},
                "committed": st["committed"], "protected": st["protected"], "role": st["role"],
                "log": opts.log_path}
        protected = "protected" if st["protected"] else "not protected yet (epoch 0: initial sync)"
        text = [f"nbd-mc: serving {', '.join(names)} (pid {pid}); committed epoch "
                f"{st['committed']}, {protected}, role {st['role']}"]
        for n in names:
            text.append(f"  {n}: {server.nbd_uri(opts, n)}   (last commit: {n}@committed)")
        text.append(f"  control: {opts.control}")
        emit(info, as_json, "\n".join(text))
        sys.stdout.flush()
        if foreground:
            from .notify import notify
            notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving, committed epoch "
                   f"{st['committed']}")

    pid = server.start(opts, on_ready=announce if foreground else None)
    if not foreground:
        announce(pid)


@main.command()
@click.option("--prometheus", is_flag=True, help="Print Prometheus text exposition format "
              "(for node_exporter's textfile collector; see README, Metrics).")
@click.option("--group", "group_label", metavar="NAME",
              help="The group label of --prometheus series (default: the control address).")
@click.option("--stale-after", type=click.FloatRange(0), default=60.0, show_default=True,
              metavar="SECONDS", help="--prometheus: nbd_mc_stale is 1 after this long "
              "without a commit.")
@click.option("--watch", is_flag=True, help="Refresh a live view until Ctrl-C (plain lines "
              "when not on a terminal).")
@click.option("--interval", "watch_interval", default="1s", show_default=True,
              metavar="DURATION", help="--watch: time between refreshes.")
@click.option("--count", type=click.IntRange(1), metavar="N",
              help="--watch: stop after N refreshes.")
@control_options
@refusals
def status(target, as_json, prometheus, group_label, stale_after, watch, watch_interval, count):
    """Show the group: committed epoch, protection, role, fencing, per-disk undo."""
    if prometheus or watch:
        where = target.control if not target.control or "://" in target.control \
            else os.path.abspath(target.control)
        return _status_metrics_or_watch(target, prometheus, group_label or where,
                                        stale_after, watch, watch_interval, count)
    st = target.execute("query-status")
    prot = "protected" if st["protected"] else "NOT protected"
    lines = [f"committed epoch {st['committed']} (open epoch {st['open_epoch']}), {prot}, "
             f"role {st['role']}, generation {st['generation']}"
             f"{', FENCED' if st['fenced'] else ''}, durability {st.get('durability', '?')}"]
    if st.get("group_id"):
        age = st.get("last_commit_age")
        lines.append(f"group {st['group_id']}; last commit "
                     + (f"{age:.1f} s ago" if age is not None else "never")
                     + (": STALE, the primary stopped checkpointing" if st.get("stale") else ""))
    lines.append(f"{'disk':<12} {'size':>10} {'cluster':>8} {'preserved':>10} {'undo':>10}  image")
    for d in st["disks"]:
        lines.append(f"{d['name']:<12} {human_size(d['size']):>10} {human_size(d['cluster_size']):>8} "
                     f"{d['preserved_clusters']:>10} {human_size(d['undo_bytes']):>10}  {d['image']}")
    emit(st, as_json, "\n".join(lines))


def _status_metrics_or_watch(target, prometheus, group, stale_after, watch, interval, count):
    """status --prometheus (metrics.py) and status --watch (watch.py)."""
    if prometheus and watch:
        raise click.UsageError("give --prometheus or --watch, not both")
    if watch:
        from .primary import parse_interval
        from .watch import watch as run_watch
        try:
            seconds = parse_interval(interval)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        target.client().close()  # a wrong address is a usage error, not a view
        run_watch(lambda: target.execute("query-status"), target.control, seconds, count)
        return
    from .metrics import render_down, render_status
    try:
        st = target.execute("query-status")
    except (Failure, NbdMcError, OSError) as e:
        click.echo(render_down(group), nl=False)
        raise Failure(getattr(e, "message", None) or getattr(e, "desc", None) or str(e)) from None
    click.echo(render_status(st, group, stale_after=stale_after), nl=False)


@main.command()
@click.argument("epoch", type=click.IntRange(0))
@control_options
@refusals
def commit(epoch, target, as_json):
    """Commit EPOCH (the open epoch; the committed one again is a harmless retry)."""
    r = target.execute("commit", epoch=epoch)
    emit(r, as_json, f"committed epoch {r['committed']} in {r['seconds'] * 1000:.2f} ms")


@main.command()
@control_options
@refusals
def rollback(target, as_json):
    """Return every disk to the last commit and keep serving."""
    r = target.execute("rollback")
    emit(r, as_json, f"rolled back to epoch {r['committed']}: {r['restored_clusters']} clusters "
                     f"restored in {r['seconds'] * 1000:.2f} ms")


@main.command()
@control_options
@refusals
def fence(target, as_json):
    """Refuse writes from every connection opened before now (split brain guard)."""
    r = target.execute("fence")
    emit(r, as_json, f"fenced: generation {r['generation']}; earlier connections can no longer write")


def _offline_group(state_dir: str) -> engine.Group:
    try:
        return engine.Group(state_dir)
    except StateError as e:
        raise Failure(str(e.desc)) from None


@main.command()
@click.option("--instant", is_flag=True,
              help="Skip the rollback: hand out the qcow2 overlay that already shows the last "
                   "commit (faster for big undo data; see README).")
@control_options
@refusals
def failover(instant, target, as_json):
    """Fence, roll back to the last commit and promote: print what the new primary opens.

    Works through the running server; with --state-dir and no server running it
    operates on the files directly.
    """
    online = True
    try:
        r = target.execute("failover", instant=instant)
    except Failure:
        if not target.state_dir or not os.path.isdir(target.state_dir):
            raise
        online = False
        group = _offline_group(target.state_dir)
        try:
            r = group.failover(instant=instant)
        finally:
            group.close()
    lines = [f"failover done in {r['seconds'] * 1000:.1f} ms: the disks show committed epoch "
             f"{r['committed']} (the last checkpoint); the old primary is fenced.",
             "Boot the new primary on these disks (same device model as the old primary; "
             "virtio-blk shown):"]
    for d in r["disks"]:
        lines.append(f"  {d['name']}: {d['path']} ({d['format']})")
        lines.append(f"      qemu-system-x86_64 ... -drive {d.get('drive') or ''} "
                     f"-device virtio-blk-pci,drive={d['name']}")
    if instant:
        lines.append("Each overlay shows the last checkpoint over its image (the backing file: "
                     "keep it); nbd-mc no longer writes either.")
    else:
        lines.append("The images hold the last checkpoint; no undo is kept any more.")
    if online:
        where = (f"--state-dir {target.state_dir}" if target.state_dir
                 else f"--control {target.control}")
        lines.append(f"Stop the server first so nothing else writes them: nbd-mc stop {where}"
                     + ("" if instant else "\n(or keep it serving and connect the new primary "
                                           "to the NBD exports: new connections may write)"))
    emit(r, as_json, "\n".join(lines))


@main.command()
@control_options
@refusals
def stop(target, as_json):
    """Shut the server down cleanly (control command quit)."""
    r = target.execute("quit")
    server.wait_gone(target.control, target.state_dir)
    emit(r, as_json, "server stopped")


@main.command()
@click.option("--state-dir", required=True, metavar="DIR", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@refusals
def recover(state_dir, as_json):
    """With no server running: bring the files to the last committed state."""
    if not os.path.isfile(os.path.join(state_dir, "state.json")):
        raise Failure(f"no nbd-mc state in {state_dir}")
    group = _offline_group(state_dir)
    try:
        rep = dict(group.recovered)
        rep["role"] = group.state.role
    finally:
        group.close()
    as_json = as_json or bool(click.get_current_context().find_root().params.get("as_json"))
    stale = f"; stale undo dropped for {', '.join(rep['stale_dropped'])}" if rep["stale_dropped"] else ""
    emit(rep, as_json, f"recovered: every disk is at committed epoch {rep['committed']} "
                       f"({rep['restored_clusters']} clusters restored{stale})")


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@refusals
def inspect(path, as_json):
    """Offline: what an overlay or a state directory holds, and whether it is valid."""
    from .inspect import inspect_path
    report = inspect_path(path)
    as_json = as_json or bool(click.get_current_context().find_root().params.get("as_json"))
    text = report.pop("text", "")
    emit(report, as_json, text)
    if not report["valid"]:
        sys.exit(1)


# --- protect (primary side): logic in nbd_mc/primary/ ---------------------------
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
                   "(see README, Metrics).")
@click.option("--drive-mirror", "legacy", is_flag=True,
              help="Use the older drive-mirror command (QEMU opens the NBD URI itself).")
@click.option("--stall-timeout", default="10s", show_default=True, metavar="DURATION",
              help="How long pausing the VM may wait for writes stuck on the secondary (and a "
                   "control command for its answer) before the secondary counts as hung and "
                   "is dropped; the guest waits at most the interval plus this.")
@click.option("--retry-for", default="forever", show_default=True, metavar="DURATION",
              help="How long to keep retrying a lost secondary before giving up "
                   "(0: stop at the first outage).")
@click.option("--quiet", "-q", is_flag=True, help="Only the closing summary and errors.")
@click.option("--json", "as_json", is_flag=True, help="Print the closing report as JSON.")
def protect(qmp_path, domain, connect_uri, drives, target, control, interval, epochs, hook,
            tls_dir, metrics_file, legacy, stall_timeout, retry_for, quiet, as_json):
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
    from . import primary
    if bool(qmp_path) == bool(domain):
        raise click.UsageError("give --qmp PATH or --libvirt DOMAIN (one of them)")
    try:
        opts = primary.Options(
            qmp=qmp_path, drives=primary.parse_drives(drives),
            target=primary.parse_nbd_uri(target), control=control,
            interval=primary.parse_interval(interval), epochs=epochs, hook=hook,
            tls_certificates=tls_dir, legacy_drive_mirror=legacy, libvirt=domain,
            connect=connect_uri, metrics_file=metrics_file,
            stall_timeout=primary.parse_interval(stall_timeout),
            retry_for=(None if retry_for == "forever"
                       else primary.parse_interval(retry_for, zero=True)))
        parse_address(control)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    as_json = as_json or bool(click.get_current_context().find_root().params.get("as_json"))
    console = primary.Console(quiet=quiet or as_json)
    report = primary.protect(opts, console)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        click.echo(primary.summary(report))
    if report.outcome != "detached":
        raise Failure(primary.failure_advice(report))
    if not as_json:
        click.echo("detached: the mirrors are removed and the VM runs on without protection")


if __name__ == "__main__":
    main()
