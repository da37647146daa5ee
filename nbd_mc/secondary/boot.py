"""How to boot QEMU on a disk that failover handed over: the one place that knows.

After a failover the new primary's QEMU must open either the raw image (the
disk was rolled back) or the qcow2 overlay (instant failover: the overlay shows
the last commit over its image).  The engine says *which file in which format*;
this module turns that into QEMU vocabulary, both for the machine-readable
``drive`` field of the failover reply and for the advice `nbd-mc failover`
prints.  Keeping it here means the engine never builds command lines and the
CLI never hard-codes an emulator or a device model.
"""

from __future__ import annotations

#: The emulator and device model shown in the advice.  The new primary must use
#: the same device model as the old one; virtio-blk is only the common example.
EMULATOR = "qemu-system-x86_64"
EXAMPLE_DEVICE = "virtio-blk-pci"


def drive_option(node: str, path: str, fmt: str) -> str:
    """The value of a ``-drive`` option that opens ``path`` as drive ``node``."""
    return f"file={path},format={fmt},if=none,id={node}"


def with_drive_options(disks: list[dict]) -> list[dict]:
    """Add the ``drive`` field to each ``{"name", "path", "format"}`` of a handover."""
    return [dict(d, drive=drive_option(d["name"], d["path"], d["format"])) for d in disks]


def advice(disks: list[dict]) -> list[str]:
    """Lines telling a person how to start the new primary on the handed-over disks."""
    lines = ["Boot the new primary on these disks (same device model as the old primary; "
             f"{EXAMPLE_DEVICE.removesuffix('-pci')} shown):"]
    for d in disks:
        drive = d.get("drive") or drive_option(d["name"], d["path"], d["format"])
        lines.append(f"  {d['name']}: {d['path']} ({d['format']})")
        lines.append(f"      {EMULATOR} ... -drive {drive} -device {EXAMPLE_DEVICE},drive={d['name']}")
    return lines
