"""The three NBD servers compared, each serving one image on a unix socket.

* ``NbdkitFile``: nbdkit's own file plugin, no undo at all: the speed limit.
* ``Qsd``: qemu-storage-daemon with a copy-before-write node whose target is a
  qcow2 overlay backed by the image (``Qsd.start`` below): the same job as nbd-mc,
  done in C. A fresh, empty overlay is an open epoch where every cluster is a
  first touch; "a new epoch" is a restart on a re-created overlay. With
  ``undo=False`` it exports the raw node, no copy-before-write (the epoch-0 case).
* ``NbdMc``: our server through its public CLI (``nbd-mc serve``) and control
  socket. A fresh state directory is epoch 0 (no undo); committing epoch 1
  opens epoch 2, the first one that keeps undo data.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

from . import util
from .ctl import Control
from nbd_mc.statedir import StateDir


class ServerError(RuntimeError):
    pass


class Server:
    kind = "?"

    def __init__(self, workdir, label=None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.label = label or self.kind
        self.sock = self.workdir / "nbd.sock"
        self.pidfile = self.workdir / "server.pid"
        self.logfile = self.workdir / "server.log"
        self.image = None
        self.undo = False

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def pid(self):
        return util.read_pid(self.pidfile)

    def rss_kib(self):
        return util.rss_kib(self.pid())

    def _clean_files(self):
        for p in (self.sock, self.pidfile):
            if p.exists():
                p.unlink()

    def _wait_ready(self, proc=None, timeout=30):
        def ready():
            if proc is not None and proc.poll() is not None:
                raise ServerError(f"{self.label} exited with {proc.returncode}: "
                                  + self.logfile.read_text()[-2000:])
            return util.unix_connectable(self.sock)
        util.wait_for(ready, timeout, f"{self.label} on {self.sock}")

    def new_epoch(self):
        """Start a new epoch: every cluster is a first touch again."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class NbdkitFile(Server):
    kind = "nbdkit-file"

    def start(self, image, undo=True):
        self.image = Path(image)
        self._clean_files()
        self.log = open(self.logfile, "w")
        self.proc = subprocess.Popen(
            ["nbdkit", "-U", str(self.sock), "-P", str(self.pidfile), "-f",
             "--exit-with-parent", "file", str(self.image)],
            stdout=self.log, stderr=subprocess.STDOUT, env=util.env())
        self._wait_ready(self.proc)
        util.wait_for(lambda: self.pid() is not None, 10, "nbdkit pidfile")

    def stop(self):
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None
        self._clean_files()


class Qsd(Server):
    kind = "qsd"

    def start(self, image, undo=True):
        self.image = Path(image)
        self.undo = undo
        self.overlay = self.workdir / "UNDO.qcow2"
        self._launch()

    def _launch(self):
        self._clean_files()
        args = ["qemu-storage-daemon",
                "--blockdev", f"driver=file,filename={self.image},node-name=bf",
                "--blockdev", "driver=raw,file=bf,node-name=b"]
        node = "b"
        if self.undo:
            if self.overlay.exists():
                self.overlay.unlink()
            util.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.image),
                      "-F", "raw", str(self.overlay)])
            args += ["--blockdev", f"driver=file,filename={self.overlay},node-name=rf",
                     "--blockdev", "driver=qcow2,file=rf,node-name=rb,backing=b",
                     "--blockdev", "driver=copy-before-write,file=b,target=rb,node-name=cbw"]
            node = "cbw"
        args += ["--nbd-server", f"addr.type=unix,addr.path={self.sock}",
                 "--export", f"type=nbd,id=e0,node-name={node},writable=on,name=",
                 "--pidfile", str(self.pidfile)]
        self.log = open(self.logfile, "a")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=util.env())
        self._wait_ready(self.proc)

    def new_epoch(self):
        if self.undo:
            self.stop()
            self._launch()

    def stop(self):
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None
        self._clean_files()

    def undo_bytes(self):
        """Allocated bytes in the overlay (data clusters) after a stop."""
        res = util.run(["qemu-img", "map", "-U", "--output=json", str(self.overlay)])
        import json
        return sum(e["length"] for e in json.loads(res.stdout)
                   if e.get("data") and e.get("depth") == 0)


def nbd_mc_help():
    """`nbd-mc serve --help` text, or None when the server isn't there yet."""
    exe = util.VENV_BIN / "nbd-mc"
    if not exe.exists():
        return None
    try:
        res = util.run([str(exe), "serve", "--help"], check=False, timeout=30)
    except Exception:
        return None
    if res.returncode != 0 or "--state-dir" not in res.stdout:
        return None
    return res.stdout


class NbdMc(Server):
    kind = "nbd-mc"

    def __init__(self, workdir, label=None, extra_args=(), cluster_size=None,
                 durability=None):
        super().__init__(workdir, label)
        self.extra_args = list(extra_args)
        self.cluster_size = cluster_size
        self.durability = durability
        self.state_dir = self.workdir / "state"
        self.control_path = Path(StateDir(self.state_dir).control)
        self.ctl = None
        self.committed = 0
        self._pid = None

    def start(self, image, undo=True):
        self.image = Path(image)
        self._clean_files()
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        args = [str(util.VENV_BIN / "nbd-mc"), "serve", f"vda={self.image}",
                "--state-dir", str(self.state_dir), "--socket", str(self.sock),
                "--pidfile", str(self.pidfile)]
        if self.cluster_size:
            args += ["--cluster-size", str(self.cluster_size)]
        if self.durability:
            args += ["--durability", self.durability]
        args += self.extra_args
        with open(self.logfile, "a") as log:
            log.write("$ " + " ".join(args) + "\n")
            log.flush()
            res = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT,
                                 env=util.env(), timeout=120)
        if res.returncode != 0:
            raise ServerError(f"nbd-mc serve failed ({res.returncode}): "
                              + self.logfile.read_text()[-2000:])
        util.wait_for(lambda: self.pid() is not None, 30, "nbd-mc pidfile")
        self._pid = self.pid()
        self._wait_ready()
        util.wait_for(lambda: util.unix_connectable(self.control_path), 30,
                      "nbd-mc control socket")
        self.ctl = Control(self.control_path)
        self.committed = int(self.ctl.greeting.get("nbd-mc", {}).get("committed", 0))
        self.undo = undo
        if undo:
            self.new_epoch()

    def pid(self):
        return self._pid or util.read_pid(self.pidfile)

    def new_epoch(self):
        """Commit the open epoch: the next one keeps undo data."""
        self.commit()

    def commit(self):
        r = self.ctl.execute("commit", epoch=self.committed + 1)
        self.committed = int(r.get("committed", self.committed + 1))
        return r

    def status(self):
        return self.ctl.execute("query-status")

    def execute(self, command, **args):
        return self.ctl.execute(command, **args)

    def stop(self):
        pid = self.pid()
        if self.ctl is not None:
            try:
                self.ctl.execute("quit")
            except Exception:
                pass
            self.ctl.close()
            self.ctl = None
        if pid is not None:
            try:
                util.wait_for(lambda: not util.pid_alive(pid), 15, "nbd-mc to quit")
            except TimeoutError:
                util.kill_pid(pid)
        self._pid = None
        self._clean_files()
