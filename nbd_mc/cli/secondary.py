"""The secondary's commands: serve, status, commit, rollback, fence, fence-primary, failover,
stop, recover and inspect.  Each one is a request to the running server (see
nbd_mc/secondary/commands.py) or, for recover, inspect and an offline failover, work on
the files of a state directory with no server running."""

from __future__ import annotations

import os
import sys
import time

import click

from ..secondary import boot, engine, history as hist, launch, writer
from ..statedir import StateDir
from ..control import ControlClient, ControlError
from ..secondary.disk import COMMITTED_SUFFIX, parse_disk_spec
from ..errors import NbdMcError, StateError
from ..units import human_size
from .common import (Failure, control_options, emit, json_wanted, main, refusals,
                     size_option)


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
              help="qcow2 cluster size of the undo overlay, 4K..2M (default 64K; fixed when "
                   "the group is created).")
@click.option("--subclusters", type=click.Choice(["on", "off"]), default=None,
              help="Undo granularity: on = 1/32 cluster (qcow2 extended L2 entries, clusters "
                   ">= 16K), off = whole clusters.  Default on where the cluster size allows; "
                   "fixed when the group is created.")
@click.option("--durability", type=click.Choice(engine.DURABILITY_MODES), default=None,
              help="process: survive kill -9; power: also power loss (slower).  Default: "
                   "process for a new group, else the mode it was last served with.")
@click.option("--tls", type=click.Choice(["off", "on", "require"]), default="off", show_default=True,
              help="NBD over TLS (x509).")
@click.option("--tls-certificates", metavar="DIR", type=click.Path(file_okay=False),
              help="x509 directory (ca-cert.pem, server-cert.pem, server-key.pem, ...).")
@click.option("--thread-model", type=click.Choice(["parallel", "serialize"]), default="serialize",
              show_default=True, help="nbdkit thread model for the plugin: on few cores one "
              "request at a time beats threads fighting over Python's GIL (see bench/README.md).")
@click.option("--threads", type=click.IntRange(1, 256), help="nbdkit worker threads per connection.")
@click.option("--foreground", is_flag=True, help="Stay in the foreground (for supervisors).")
@click.option("--pidfile", metavar="PATH", help="Write nbdkit's pid here (default DIR/nbdkit.pid).")
@click.option("--history", "history_keep", metavar="DURATION",
              help="Keep retained checkpoints for DURATION (e.g. 1h, 30d; 'off' or 0 drops "
                   "history), served read-only as NAME@epoch-N (see docs/history.md).  Kept "
                   "across restarts; default: what the group was last served with.")
@click.option("--history-every", metavar="INTERVAL", help="With --history: retain the first "
              "commit at or after each INTERVAL boundary (default 10s; 0 retains every commit).")
@click.option("--history-max", metavar="SIZE", help="With --history: bound the space the "
              "checkpoints hold; the oldest go first.")
@click.option("--json", "as_json", is_flag=True, help="Print addresses as JSON.")
@refusals
def serve(disks, state_dir, socket_path, port, bind, control, cluster_size, subclusters,
          durability, tls, tls_certificates, thread_model, threads, foreground, pidfile, as_json,
          history_keep, history_every, history_max):
    """Serve DISK... (PATH or NAME=PATH) as one consistency group.

    Creates the state directory, or reopens it (then the DISK list, if given,
    must match) and recovers it to the last commit.  Runs nbdkit in the
    background and returns once the NBD and control sockets answer.
    """
    if socket_path and port is not None:
        raise click.UsageError("give --socket or --port, not both")
    opts = launch.ServeOptions(
        state_dir=state_dir, disks=[parse_disk_spec(d) for d in disks], socket=socket_path,
        port=port, bind=bind, cluster_size=size_option(cluster_size),
        subclusters=None if subclusters is None else subclusters == "on",
        durability=durability, tls=tls, tls_certificates=tls_certificates, control=control,
        foreground=foreground, pidfile=pidfile, thread_model=thread_model, threads=threads,
        history=_history_option(history_keep, history_every, history_max))
    as_json = json_wanted(as_json)

    def announce(pid: int) -> None:
        with ControlClient(opts.control, tls=launch.control_tls(opts)) as c:
            st = c.execute("query-status")
        names = [d["name"] for d in st["disks"]]
        info = {"pid": pid, "nbd": launch.nbd_uri(opts), "control": opts.control,
                "exports": [e for n in names for e in (n, n + COMMITTED_SUFFIX)],
                "uris": {n: launch.nbd_uri(opts, n) for n in names},
                "committed": st["committed"], "protected": st["protected"], "role": st["role"],
                "log": opts.log_path}
        protected = ("protected" if st["protected"] else
                     "promoted by a failover (the images are the new primary's disks)"
                     if st["role"] == "primary" else
                     "not protected yet (epoch 0: initial sync)" if not st["committed"] else
                     "not protected")
        text = [f"nbd-mc: serving {', '.join(names)} (pid {pid}); committed epoch "
                f"{st['committed']}, {protected}, role {st['role']}"]
        for n in names:
            text.append(f"  {n}: {launch.nbd_uri(opts, n)}   (last commit: {n}{COMMITTED_SUFFIX})")
        if st["role"] == "primary":  # promoted: only the writer exports are served
            exports = writer.writer_exports(names, st.get("writer"))
            info["exports"] = list(exports.values())
            info["uris"] = {n: launch.nbd_uri(opts, e) for n, e in exports.items()}
            text[1:] = [f"  {n}: {u}   (the new primary's writer export)"
                        for n, u in info["uris"].items()]
        text.append(f"  control: {opts.control}")
        emit(info, as_json, "\n".join(text))
        sys.stdout.flush()
        if foreground:
            from ..notify import notify
            notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving, committed epoch "
                   f"{st['committed']}")

    pid = launch.start(opts, on_ready=announce if foreground else None)
    if not foreground:
        announce(pid)


def _history_option(keep, every, most):
    """serve's --history, --history-every, --history-max as launch.ServeOptions.history."""
    if keep is None:
        if every is not None or most is not None:
            raise click.UsageError("--history-every and --history-max need --history DURATION")
        return None
    try:
        seconds = hist.parse_duration(keep)
        interval = hist.parse_duration(every) if every is not None else 10.0
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    return (seconds, interval, size_option(most) or 0)


@main.command()
@click.option("--prometheus", is_flag=True, help="Print Prometheus text exposition format "
              "(for node_exporter's textfile collector; see docs/metrics.md).")
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
             f"{', FENCED' if st['fenced'] else ''}, durability {st.get('durability', '?')}"
             + (f", writer {st['writer']}" if st.get("writer") else "")]
    if st.get("group_id"):
        age = st.get("last_commit_age")
        lines.append(f"group {st['group_id']}; last commit "
                     + (f"{age:.1f} s ago" if age is not None else "never")
                     + (": STALE, the primary stopped checkpointing" if st.get("stale") else ""))
    h = st.get("history") or {}
    if h.get("enabled") or h.get("count"):
        lines.append(f"history: {h['count']} checkpoints, {human_size(h['bytes'])}"
                     + (f", oldest epoch {h['oldest_epoch']} ({_ago(h['oldest_age'])})"
                        if h.get("oldest_epoch") is not None else ""))
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
        from ..primary import parse_interval
        from ..watch import watch as run_watch
        try:
            seconds = parse_interval(interval)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        target.client().close()  # a wrong address is a usage error, not a view
        run_watch(lambda: target.execute("query-status"), target.control, seconds, count)
        return
    from ..secondary.metrics import render_down, render_status
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
    try:
        r = target.execute("commit", epoch=epoch)
    except ControlError as e:
        if e.committed is not None:  # every commit error says where the group stands
            state = "committed" if e.committed >= epoch else "not committed"
            e.desc += f" (the state file holds epoch {e.committed}: epoch {epoch} is {state})"
        raise
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
    """Stop every write to this replica, from connections open now and later (split
    brain guard).  Refused after a failover promoted this node: see fence-primary."""
    r = target.execute("fence")
    emit(r, as_json, f"fenced: generation {r['generation']}; no connection can write to this "
                     "replica any more, open or new (`nbd-mc failover` promotes it)")


@main.command("fence-primary")
@control_options
@refusals
def fence_primary(target, as_json):
    """After an in-place failover: stop the new primary's writes through this server.

    Its VM then gets I/O errors on its own disk; `nbd-mc failover` run again on
    this node gives the disk back."""
    r = target.execute("fence-primary")
    emit(r, as_json, f"new primary fenced: generation {r['generation']}; its writes through "
                     "this server are refused from now on (its VM gets I/O errors on its own "
                     "disk); `nbd-mc failover` gives them back")


def _warn_if_mirrored(target) -> None:
    """Say what the primary will do when a secondary it mirrors into stops: the
    caller may not know protection is running (it goes on; scripts and the HA
    agent stop secondaries on purpose)."""
    try:
        st = target.execute("query-status")
    except Exception:  # noqa: BLE001 - the quit below reports an unreachable server
        return
    if st.get("role") == "secondary" and st.get("protected") and st.get("writer") \
            and not st.get("stale"):
        age = st.get("last_commit_age")
        when = f", last commit {age:.1f} s ago" if isinstance(age, (int, float)) else ""
        click.echo(f"warning: a primary is mirroring into this secondary (writer "
                   f"{st['writer']}{when}): its `nbd-mc protect` will "
                   "see the secondary lost, remove its mirrors and keep the VM running "
                   f"UNPROTECTED; epoch {st['committed']} stays the last checkpoint here",
                   err=True)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min ago"
    return f"{seconds / 3600:.1f} h ago"


@main.command("history")
@control_options
@refusals
def history_command(target, as_json):
    """List the retained checkpoints (serve --history): epoch, commit time, bytes held.

    Each is served read-only as NAME@epoch-N and is a qcow2 file any qcow2 reader
    opens; `failover --to-epoch N` returns the disks to it.  Through the running
    server, or with --state-dir and no server running from the files directly.
    """
    try:
        r = target.execute("query-history")
    except Failure:
        if not target.state_dir or not os.path.isdir(target.state_dir):
            raise
        r = hist.offline_listing(target.state_dir)
    lines = []
    if not r["count"]:
        lines.append("no retained checkpoints" + ("" if r["enabled"] else
                                                  " (history is off: serve --history DURATION)"))
    else:
        lines.append(f"{r['count']} retained checkpoints, {human_size(r['bytes'])}; history "
                     f"reaches back to epoch {r['oldest_epoch']} ({_ago(r['oldest_age'])})")
        lines.append(f"{'epoch':>8}  {'committed at (UTC)':<23} {'age':>12} {'bytes':>10}")
        import datetime
        for c in r["checkpoints"]:
            when = datetime.datetime.fromtimestamp(c["time"], datetime.timezone.utc)
            lines.append(f"{c['epoch']:>8}  {when.strftime('%Y-%m-%d %H:%M:%S.%f')[:23]:<23} "
                         f"{_ago(c['age']):>12} {human_size(c['bytes']):>10}")
        lines.append(f"read one: NAME@epoch-N (NBD), or qemu-img convert -f qcow2 -O raw "
                     f"{next(iter(r['checkpoints'][-1]['files'].values()))} copy.raw")
    emit(r, as_json, "\n".join(lines))


def _offline_group(state_dir: str) -> engine.Group:
    try:
        return engine.Group(state_dir)
    except StateError as e:
        raise Failure(str(e.desc)) from None


@main.command()
@click.option("--instant", is_flag=True,
              help="Skip the rollback: hand out the qcow2 overlay that already shows the last "
                   "commit (faster for big undo data; see docs/failover.md).")
@click.option("--to-epoch", "to_epoch", type=click.IntRange(0), metavar="N",
              help="Return to retained epoch N instead of the last commit (see `nbd-mc "
                   "history`, docs/history.md).")
@control_options
@refusals
def failover(instant, to_epoch, target, as_json):
    """Fence, roll back to the last commit and promote: print what the new primary opens.

    Works through the running server; with --state-dir and no server running it
    operates on the files directly.
    """
    online = True
    args = {"instant": instant}
    if to_epoch is not None:
        args["to_epoch"] = to_epoch
    try:
        r = target.execute("failover", **args)
    except Failure:
        if not target.state_dir or not os.path.isdir(target.state_dir):
            raise
        online = False
        group = _offline_group(target.state_dir)
        try:
            r = group.failover(instant=instant, to_epoch=to_epoch)
        finally:
            group.close()
        r["disks"] = boot.with_drive_options(r["disks"])  # as the server's reply has it
    which = ("the retained checkpoint you chose" if to_epoch is not None
             else "the last checkpoint")
    lines = [f"failover done in {r['seconds'] * 1000:.1f} ms: the disks show committed epoch "
             f"{r['committed']} ({which}); the old primary is fenced."]
    lines += boot.advice(r["disks"])
    if instant:
        lines.append("Each overlay shows the last checkpoint over its image (the backing file: "
                     "keep it); nbd-mc no longer writes either.")
    else:
        lines.append("The images hold the last checkpoint; no undo is kept any more.")
    if online:
        where = (f"--state-dir {target.state_dir}" if target.state_dir
                 else f"--control {target.control}")
        lines.append(f"Stop the server first so nothing else writes them: nbd-mc stop {where}")
    if not instant:
        lines.append(_writer_export_advice(r["disks"], online))
    emit(r, as_json, "\n".join(lines))


@main.command()
@click.option("--force", is_flag=True,
              help="If the server does not answer (hung, or its control socket is gone), "
                   "stop the nbdkit of DIR's pid file: SIGTERM, then SIGKILL. Needs "
                   "--state-dir. Safe: the next serve recovers to the last commit.")
@click.option("--timeout", default="30s", show_default=True, metavar="DURATION",
              help="How long to wait for the server to answer and to go.")
@control_options
@refusals
def stop(target, as_json, force, timeout):
    """Shut the server down cleanly (control command quit)."""
    from ..primary.options import parse_interval
    try:
        seconds = parse_interval(timeout)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--timeout") from None
    if force and not target.state_dir:
        raise click.UsageError("--force needs --state-dir DIR (its pid file names the server)")
    if not force:                   # a hung server would hold the warning for its timeout
        _warn_if_mirrored(target)
    deadline = time.monotonic() + seconds
    try:
        with target.client(timeout=seconds / 2 if force else seconds) as c:
            r = c.execute("quit")
        launch.wait_gone(target.control, target.state_dir,
                         max(1.0, deadline - time.monotonic()))
        how = "server stopped"
    except (Failure, OSError, NbdMcError) as e:
        if not force:
            raise
        why = e.message if isinstance(e, Failure) else getattr(e, "desc", None) or str(e)
        how = launch.force_stop(target.state_dir, max(1.0, deadline - time.monotonic()))
        r = {"forced": True, "why": why, "how": how}
        how = f"the server did not answer ({why}): {how}"
    emit(r, as_json, how)


@main.command("set-aside")
@click.option("--state-dir", required=True, metavar="DIR", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@refusals
def set_aside(state_dir, as_json):
    """With no server running: move the group to DIR.diverged, so that serve starts a
    fresh group (epoch 0) on the same images (a failback of an old live disk)."""
    r = launch.set_aside(state_dir)
    emit(r, json_wanted(as_json), f"group of {', '.join(r['disks'])} (committed epoch "
         f"{r['committed']}, role {r['role']}) set aside in {r['moved_to']}; "
         f"serve starts a fresh group on the same images")


@main.command()
@click.option("--state-dir", required=True, metavar="DIR", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@refusals
def recover(state_dir, as_json):
    """With no server running: bring the files to the last committed state."""
    if not os.path.isfile(StateDir(state_dir).state_file):
        raise Failure(f"no nbd-mc state in {state_dir}")
    group = _offline_group(state_dir)
    try:
        rep = dict(group.recovered)
        rep["role"] = group.state.role
    finally:
        group.close()
    as_json = json_wanted(as_json)
    stale = f"; stale undo dropped for {', '.join(rep['stale_dropped'])}" if rep["stale_dropped"] else ""
    emit(rep, as_json, f"recovered: every disk is at committed epoch {rep['committed']} "
                       f"({rep['restored_clusters']} clusters restored{stale})")


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@refusals
def inspect(path, as_json):
    """Offline: what an overlay or a state directory holds, and whether it is valid."""
    from ..secondary.inspect import inspect_path
    report = inspect_path(path)
    as_json = json_wanted(as_json)
    text = report.pop("text", "")
    emit(report, as_json, text)
    if not report["valid"]:
        sys.exit(1)


def _writer_export_advice(disks: list, online: bool) -> str:
    """The lines `nbd-mc failover` prints about writing through NBD instead of
    booting on the images."""
    lines = [("Or keep the server running and" if online else "Or serve the state directory "
              "again and") + " connect the new primary to its writer exports (the only "
             "ones that accept writes now; the plain names are read-only):"]
    for d in disks:
        lines.append(f"  {d['name']}: {d.get('uri') or d.get('export')}")
    return "\n".join(lines)
