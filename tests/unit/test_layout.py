"""The shared homes of issue 21: one typed address, one state-directory layout, one
NBD URI builder, and sides that stay on their side of the wire.

Outcomes checked in-process, without QEMU or nbdkit.
"""

import ast
import os
from pathlib import Path

import pytest

from nbd_mc import nbduri
from nbd_mc.address import TCPAddress, UnixAddress, default_control, parse_address
from nbd_mc.secondary.launch import ServeOptions, nbd_uri
from nbd_mc.statedir import StateDir

ROOT = Path(__file__).resolve().parents[2]


def test_addresses_are_typed_and_print_back_as_parsed():
    u = parse_address("unix:///run/ctl.sock")
    t = parse_address("tcp://[::1]:10810")
    assert u == UnixAddress("/run/ctl.sock") and not u.is_tcp
    assert t == TCPAddress("::1", 10810) and t.is_tcp
    assert str(t) == "tcp://[::1]:10810" and parse_address(str(t)) == t
    # a path that reads like a scheme is printed so that it parses back to itself
    odd = UnixAddress("unix:x")
    assert parse_address(str(odd)) == odd


def test_the_state_directory_names_every_file_once(tmp_path):
    sd = StateDir(tmp_path / "st")
    files = sd.files()
    assert len(set(files.values())) == len(files)  # no two names collide
    inside = ("state_file", "lock", "control", "nbd_socket", "pidfile", "log")
    assert all(os.path.dirname(files[k]) == str(tmp_path / "st") for k in inside)
    beside = ("rolled_back", "diverged", "split_brain", "generation")
    assert all(files[k].startswith(str(tmp_path / "st") + ".") for k in beside)
    assert StateDir(str(tmp_path / "st") + "/").diverged == files["diverged"]
    assert sd.overlay("vda") == str(tmp_path / "st" / "vda.undo.qcow2")
    assert default_control(str(tmp_path / "st")) == files["control"]


def test_serve_defaults_come_from_the_state_directory(tmp_path):
    opts = ServeOptions(state_dir=str(tmp_path / "st"), disks=[])
    opts.resolve()
    sd = StateDir(opts.state_dir)
    assert (opts.socket, opts.control, opts.pidfile, opts.log_path) == (
        sd.nbd_socket, sd.control, sd.pidfile, sd.log)


@pytest.mark.parametrize("kw, export, want", [
    ({"socket": "/s/nbd.sock"}, "vda", "nbd+unix:///vda?socket=/s/nbd.sock"),
    ({"socket": "/s/nbd.sock", "tls": True}, "", "nbds+unix:///?socket=/s/nbd.sock"),
    ({"host": "::1", "port": 10809}, "vda", "nbd://[::1]:10809/vda"),
    ({"port": 10809, "tls": True}, "vdb", "nbds://localhost:10809/vdb"),
])
def test_one_builder_for_export_uris(kw, export, want):
    assert nbduri.server_uri(export=export, **kw) == want
    base = nbduri.server_uri(**kw)
    # the writer's URI the plugin replies with is the served URI with the writer export
    assert nbduri.export_uri(base, export) == want
    assert nbduri.export_uri(base, "vda@g3-5be0a1c2").count("vda@g3-5be0a1c2") == 1


def test_serve_prints_the_same_uris_the_plugin_builds():
    opts = ServeOptions(state_dir="/srv/st", disks=[], port=10809, bind="10.0.0.2", tls="require")
    opts.resolve()
    assert nbd_uri(opts, "vda") == nbduri.export_uri(nbd_uri(opts), "vda")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            base = pkg.rsplit(".", n.level - 1)[0] if n.level else ""
            mod = ".".join(p for p in (base, n.module or "") if p)
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in n.names}
    return out


def test_each_side_stays_on_its_side_of_the_wire():
    """The secondary never imports the primary or the CLI; the primary never imports
    the secondary's package (it reaches it over the control channel and NBD only)."""
    for path in (ROOT / "nbd_mc" / "secondary").glob("*.py"):
        bad = {m for m in _imports(path) if m.startswith(("nbd_mc.primary", "nbd_mc.cli"))}
        assert not bad, f"{path.name} imports {bad}"
    for path in (ROOT / "nbd_mc" / "primary").glob("*.py"):
        bad = {m for m in _imports(path) if m.startswith("nbd_mc.secondary")}
        assert not bad, f"{path.name} imports {bad}"


def test_test_helpers_ask_the_state_directory_for_its_names():
    """tests/support spells none of the state directory's file names (docstrings and
    comments may mention them): it asks StateDir, so a renamed file moves there too."""
    from nbd_mc.statedir import BESIDE, INSIDE, OVERLAY_SUFFIX
    names = [n for n in INSIDE.values() if "." in n] + list(BESIDE.values()) + [OVERLAY_SUFFIX]
    spelled = []
    for path in sorted((ROOT / "tests" / "support").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and id(node) not in docs):
                spelled += [f"{path.name}:{node.lineno}: {n}" for n in names
                            if n in node.value]
    assert not spelled
