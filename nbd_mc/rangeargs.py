"""The arguments of the range commands (``verify-range``, ``checksum-range``).

Both name a disk and a byte range of it, and may ask for one digest per
``block``; the rules (types, bounds, powers of two) are the same, so they are
stated here once and each command only says its own limits.  The command table
(commands.py) declares these arguments as "any" and leaves the checks to this
module, because they depend on the group (which disks exist, their sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BadRequest


def int_arg(command: str, arguments: dict, name: str, minimum: int = 0) -> int:
    v = arguments.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise BadRequest(f"{command}: '{name}' must be an integer >= {minimum}")
    return v


@dataclass(frozen=True)
class DiskRange:
    name: str
    disk: object  # the group's Disk
    offset: int
    length: int


def disk_range(command: str, group, arguments: dict, max_length: int) -> DiskRange:
    """``disk``, ``offset`` and ``length`` checked against the group's disks."""
    name = arguments.get("disk")
    if not isinstance(name, str) or name not in group.by_name:
        raise BadRequest(f"{command}: 'disk' must be one of "
                         f"{', '.join(d.name for d in group.disks)}")
    disk = group.by_name[name]
    offset = int_arg(command, arguments, "offset")
    length = int_arg(command, arguments, "length", 1)
    if length > max_length:
        raise BadRequest(f"{command}: 'length' is at most {max_length} bytes")
    if offset + length > disk.size:
        raise BadRequest(f"{command}: {offset}+{length} is beyond the end of {name} "
                         f"({disk.size} bytes)")
    return DiskRange(name, disk, offset, length)


def block_arg(command: str, arguments: dict, minimum: int, maximum: int,
              default: int | None) -> int | None:
    """``block``: a power of two in [minimum, maximum], or ``default`` when absent."""
    if arguments.get("block") is None:
        return default
    block = int_arg(command, arguments, "block", minimum)
    if block & (block - 1) or block > maximum:
        raise BadRequest(f"{command}: 'block' must be a power of two from {minimum} "
                         f"to {maximum}")
    return block
