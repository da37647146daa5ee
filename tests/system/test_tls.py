"""Both channels, secured: NBD over TLS (x509, the directory layout nbdkit and QEMU
use, made by `make certs`) and the control channel (unix socket 0600, or tcp://
only with TLS and a client certificate from the same CA), through the real server.

Client certificates are required on NBD too (`serve` runs nbdkit with
--tls-verify-peer): without that, TLS would only encrypt, and anyone able to
reach the port could write to the replica.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import ssl

import nbd
import pytest

from nbd_mc.control import ControlClient
from nbd_mc.tls import TlsFiles
from support.reliability import record
from support.servers import (REPO, GroupModel, Server, describe, make_image, nbd_mc, plugin_pids, read_all,
                     read_file, run, short_tmpdir)

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pki():
    """Certificates: ours (via `make certs`), a foreign CA's, and two incomplete dirs."""
    root = short_tmpdir("nbdmc-tls-")
    d = {"root": root, "good": os.path.join(root, "certs"), "other": os.path.join(root, "other"),
         "ca-only": os.path.join(root, "ca-only"), "foreign-client": os.path.join(root, "mixed")}
    r = run(["make", "-s", "-C", REPO, "certs", f"DIR={d['good']}"])
    assert r.returncode == 0, describe(r)
    files = sorted(os.listdir(d["good"]))
    assert files == ["ca-cert.pem", "ca-key.pem", "client-cert.pem", "client-key.pem",
                     "server-cert.pem", "server-key.pem"], files
    r = run([os.path.join(REPO, "tools", "make-certs.sh"), d["other"]])
    assert r.returncode == 0, describe(r)
    os.makedirs(d["ca-only"])
    shutil.copy(os.path.join(d["good"], "ca-cert.pem"), d["ca-only"])
    os.makedirs(d["foreign-client"])
    shutil.copy(os.path.join(d["good"], "ca-cert.pem"), d["foreign-client"])
    for f in ("client-cert.pem", "client-key.pem"):
        shutil.copy(os.path.join(d["other"], f), d["foreign-client"])
    yield d
    shutil.rmtree(root, ignore_errors=True)


class TlsGroup:
    def __init__(self, pki, *, port=None, control_port=None):
        self.root = short_tmpdir("nbdmc-tlsg-")
        rng = random.Random(17)
        self.images = {d: os.path.join(self.root, f"{d}.raw") for d in ("vda", "vdb")}
        self.model = GroupModel({d: make_image(p, 2 * MiB, rng) for d, p in self.images.items()})
        args = ["--tls", "require", "--tls-certificates", pki["good"]]
        if port:
            args += ["--port", str(port), "--bind", "127.0.0.1"]
        self.control = f"tcp://127.0.0.1:{control_port}" if control_port else None
        if self.control:
            args += ["--control", self.control]
        self.srv = Server(self.root, self.images, args=args)
        self.port = port
        self.pki = pki

    def start(self):
        r = self.srv.start()
        return r

    def execute(self, name, **arguments):
        if self.control:
            with ControlClient(self.control, tls=TlsFiles(self.pki["good"])) as c:
                return c.execute(name, **arguments)
        return self.srv.execute(name, **arguments)

    def nbd(self, export="", certs="good", tls=True):
        h = nbd.NBD()
        if tls:
            h.set_tls(nbd.TLS_REQUIRE)
            h.set_tls_certificates(self.pki[certs])
        h.set_export_name(export)
        if self.port:
            h.connect_tcp("localhost", str(self.port))
        else:
            h.connect_unix(self.srv.sock)
        return h

    def qemu_opts(self, export, creds=True):
        if self.port:
            server = f"server.type=inet,server.host=localhost,server.port={self.port}"
        else:  # a unix socket has no host name: say which name the certificate must carry
            server = f"server.type=unix,server.path={self.srv.sock},tls-hostname=localhost"
        opts = f"driver=nbd,{server},export={export}"
        return opts + (",tls-creds=tls0" if creds else "")

    def qemu_object(self, certs="good"):
        return ["--object", f"tls-creds-x509,id=tls0,dir={self.pki[certs]},endpoint=client"]

    def stop(self):
        try:
            self.srv.stop()
        finally:
            self.srv.kill_all()
        assert not plugin_pids(self.root + "/")
        shutil.rmtree(self.root, ignore_errors=True)


def refused(fn) -> bool:
    try:
        h = fn()
    except nbd.Error:
        return True
    h.shutdown()
    return False


def check_nbd_tls(g: TlsGroup, uri_scheme: str) -> int:
    """The NBD channel of a TLS group: returns how many cases it checked."""
    cases = 0
    # plaintext clients are refused: libnbd and nbdinfo
    assert refused(lambda: g.nbd("vda", tls=False))
    target = (f"localhost:{g.port}" if g.port else "")
    plain = (f"nbd://{target}/vda" if g.port else f"nbd+unix:///vda?socket={g.srv.sock}")
    r = run(["nbdinfo", plain])
    assert r.returncode != 0, describe(r)
    # TLS without a client certificate, or with one from another CA: refused
    assert refused(lambda: g.nbd("vda", certs="ca-only"))
    assert refused(lambda: g.nbd("vda", certs="foreign-client"))
    # a client that does not trust the server's CA refuses it
    assert refused(lambda: g.nbd("vda", certs="other"))
    cases += 6
    # the right certificates: read, write, commit, rollback, through TLS
    h = g.nbd("vda")
    assert h.get_size() == 2 * MiB
    g.execute("commit", epoch=1)
    g.model.commit(1)
    data = bytes([0xAB]) * 65536
    h.pwrite(data, 3 * 65536)
    g.model.write("vda", 3 * 65536, data)
    assert read_all(h) == bytes(g.model.live["vda"])
    assert read_all(g.nbd("vda@committed")) == g.model.committed["vda"]
    secure = (f"{uri_scheme}://{target}/vda?tls-certificates={g.pki['good']}" if g.port else
              f"{uri_scheme}:///vda?socket={g.srv.sock}&tls-certificates={g.pki['good']}")
    r = run(["nbdinfo", "--json", secure])
    assert r.returncode == 0, describe(r)
    assert json.loads(r.stdout)["exports"][0]["export-size"] == 2 * MiB
    cases += 3
    # QEMU with a tls-creds-x509 object: qemu-io reads the pattern, qemu-img copies
    r = run(["qemu-io", "-r", *g.qemu_object(), "--image-opts", g.qemu_opts("vda"),
             "-c", f"read -P 0xab {3 * 65536} 65536"])
    assert r.returncode == 0 and "read 65536/65536" in r.stdout, describe(r)
    out = os.path.join(g.root, "copy.raw")
    r = run(["qemu-img", "convert", *g.qemu_object(), "--image-opts",
             g.qemu_opts("vda@committed"), "-O", "raw", out])
    assert r.returncode == 0, describe(r)
    assert read_file(out) == g.model.committed["vda"]
    # QEMU writing over TLS (what the primary's mirror does)
    r = run(["qemu-io", *g.qemu_object(), "--image-opts", g.qemu_opts("vdb"),
             "-c", "write -P 0xcd 0 131072"])
    assert r.returncode == 0, describe(r)
    g.model.write("vdb", 0, bytes([0xCD]) * 131072)
    # QEMU without creds, or with creds lacking a client certificate: refused
    r = run(["qemu-io", "-r", "--image-opts", g.qemu_opts("vda", creds=False), "-c", "read 0 512"])
    assert r.returncode != 0, describe(r)
    r = run(["qemu-io", "-r", *g.qemu_object("ca-only"), "--image-opts", g.qemu_opts("vda"),
             "-c", "read 0 512"])
    assert r.returncode != 0, describe(r)
    cases += 5
    r = g.execute("rollback")
    g.model.rollback()
    assert read_all(g.nbd("vda")) == g.model.live["vda"]
    assert read_all(g.nbd("vdb")) == g.model.live["vdb"]
    cases += 1
    return cases


def test_nbd_tls_unix_and_tcp_control(pki):
    """NBD over TLS on the unix socket; control over tcp:// with client certificates."""
    g = TlsGroup(pki, control_port=free_port())
    try:
        r = g.start()
        assert "nbds+unix://" in r.stdout, r.stdout
        cases = check_nbd_tls(g, "nbds+unix")
        cases += check_control_tcp(g)
    finally:
        g.stop()
    record("TLS: NBD on unix socket + control over tcp://", cases, 0)


def test_nbd_tls_tcp(pki):
    g = TlsGroup(pki, port=free_port())
    try:
        g.start()
        cases = check_nbd_tls(g, "nbds")
        mode = os.stat(g.srv.control_path).st_mode & 0o777
        assert mode == 0o600, oct(mode)  # the default control channel: unix, 0600
        cases += 1
    finally:
        g.stop()
    record("TLS: NBD over TCP", cases, 0)


def tls_handshake(addr, certs_dir, pki, with_client_cert=True):
    """A raw TLS client: returns the greeting line, or raises."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(certs_dir, "ca-cert.pem"))
    if with_client_cert:
        ctx.load_cert_chain(os.path.join(certs_dir, "client-cert.pem"),
                            os.path.join(certs_dir, "client-key.pem"))
    with socket.create_connection(addr, timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b'{"execute":"query-status"}\n')
            data = b""
            while data.count(b"\n") < 2:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data


def check_control_tcp(g: TlsGroup) -> int:
    host, port = "127.0.0.1", int(g.control.rsplit(":", 1)[1])
    before = g.execute("query-status")
    state = read_file(os.path.join(g.srv.state_dir, "state.json"))
    cases = 0
    # the CLI with the certificate directory works
    r = nbd_mc("status", "--control", g.control, "--tls-certificates", pki_dir(g), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["committed"] == before["committed"], describe(r)
    # the CLI refuses plain TCP by itself
    r = nbd_mc("status", "--control", g.control)
    assert r.returncode != 0, describe(r)
    cases += 2
    # plaintext on the TLS port: no greeting, no answer
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b'{"execute":"rollback"}\n{"execute":"query-status"}\n')
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert b"nbd-mc" not in data and b"return" not in data, data[:200]
    cases += 1
    # TLS without a client certificate, or with one from another CA: refused
    for certs, with_cert in ((pki_dir(g), False), (g.pki["foreign-client"], True)):
        try:
            got = tls_handshake((host, port), certs, g.pki, with_cert)
        except (ssl.SSLError, OSError):
            got = b""
        # with TLS 1.3 the refusal may arrive only at the first read: no greeting either way
        assert b"nbd-mc" not in got, got[:200]
        cases += 1
    # a client that trusts another CA refuses the server
    with pytest.raises(ssl.SSLError):
        tls_handshake((host, port), g.pki["other"], g.pki)
    cases += 1
    # the right client works, and nothing above changed anything
    assert b'"committed"' in tls_handshake((host, port), pki_dir(g), g.pki)
    assert g.execute("query-status")["generation"] == before["generation"]
    assert read_file(os.path.join(g.srv.state_dir, "state.json")) == state
    cases += 1
    return cases


def pki_dir(g: TlsGroup) -> str:
    return g.pki["good"]


def test_tcp_control_needs_certificates(tmp_path):
    """`serve --control tcp://...` without certificates is refused before anything starts."""
    img = tmp_path / "a.raw"
    img.write_bytes(bytes(MiB))
    st = tmp_path / "st"
    r = nbd_mc("serve", f"a={img}", "--state-dir", st, "--control",
               f"tcp://127.0.0.1:{free_port()}")
    assert r.returncode == 1 and "tls-certificates" in r.stderr, describe(r)
    r = nbd_mc("serve", f"a={img}", "--state-dir", st, "--tls", "require")
    assert r.returncode == 1 and "tls-certificates" in r.stderr, describe(r)
    assert not plugin_pids(str(tmp_path))
    record("TLS: refused configurations (tcp control or --tls without certificates)", 2, 0)

