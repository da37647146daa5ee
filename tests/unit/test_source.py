"""The pieces of the primary's data source (nbd_mc/primary/source.py) that need no
QEMU: who QEMU runs as, for the NBD socket's directory."""

from __future__ import annotations

import os

from nbd_mc.primary.source import qemu_owner_from_xml, qemu_owner_of_pidfile


def test_qemu_user_from_libvirt_dac_label_and_pidfile(tmp_path):
    """source.py gives the NBD socket's directory to the user QEMU runs as: from the
    DAC label of a libvirt domain's live XML, else from its pid file."""
    xml = ("<domain type='qemu'><name>x</name><seclabel type='dynamic' model='dac' "
           "relabel='yes'><label>+64055:+994</label><imagelabel>+64055:+994</imagelabel>"
           "</seclabel></domain>")
    assert qemu_owner_from_xml(xml) == (64055, 994)
    assert qemu_owner_from_xml("<domain><seclabel type='none' model='none'/></domain>") is None
    assert qemu_owner_from_xml("not xml") is None
    pidfile = tmp_path / "x.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    assert qemu_owner_of_pidfile(str(pidfile)) == (os.getuid(), os.getgid())
    assert qemu_owner_of_pidfile(str(tmp_path / "none.pid")) is None
