"""Dirty bitmaps in the primary's QEMU: what changed since the secondary's last commit.

Per protected drive QEMU keeps one bitmap per epoch that may still be the
secondary's committed one, named ``nbd-mc.<group-id>.<epoch>``:

* at the pause of checkpoint N (VM stopped, mirrors drained) bitmap N is added,
  for every drive in one ``transaction``: it counts every write after the instant
  that epoch N commits;
* once the secondary acknowledged commit N, bitmaps of earlier epochs go;
* if the outcome of commit N is unknown (the connection broke during it), both
  N-1 and N stay: whichever the secondary holds, its bitmap is there.

So after an outage, with the secondary back at committed epoch C, bitmap C marks
everything the secondary may lack (and more: writes it got and then rolled
back).  The bitmaps live on the drive's own node (the one ``query-block`` shows,
under any mirror filter), so detaching a mirror does not lose them; on a raw
image they are not persistent and live as long as the QEMU process, which is
exactly what a resync after an outage or a protect restart needs.  The name
carries the group id, so a later protect never uses a bitmap counted against
another secondary.

Resync rounds use ``nbd-mc.<group-id>.round<K>`` bitmaps, and a checksum sync
``nbd-mc.<group-id>.checksum`` (resync.py); like the rounds it lives only during
one resync.
"""

from __future__ import annotations

import re

from .lifecycle import remove_bitmap
from .options import DriveSpec
from .qmp import Qmp

PREFIX = "nbd-mc."
_EPOCH = re.compile(r"^nbd-mc\.([0-9A-Za-z_-]+)\.(\d+)$")


def epoch_name(group: str, epoch: int) -> str:
    return f"{PREFIX}{group}.{epoch}"


def round_name(group: str, k: int) -> str:
    return f"{PREFIX}{group}.round{k}"


def checksum_name(group: str) -> str:
    """The bitmap that counts guest writes during a checksum sync's walk."""
    return f"{PREFIX}{group}.checksum"


def source_nodes(qmp: Qmp, drives: list[DriveSpec]) -> dict[str, str]:
    """drive -> the node QEMU's drive writes to (query-block skips the mirror filter)."""
    nodes = {}
    for b in qmp.cmd("query-block"):
        ins = b.get("inserted")
        if not ins:
            continue
        for name in (b.get("device"), ins.get("node-name")):
            if name:
                nodes[name] = ins["node-name"]
    return {d.drive: nodes[d.source] for d in drives}


class Bitmaps:
    """Our bitmaps on the protected drives' nodes.

    State: ``nodes`` (drive -> node) and ``group`` are fixed after construction
    except ``group``, which protect sets when it learns the secondary's identity;
    QEMU holds the bitmaps themselves, so nothing here can go stale: every query
    asks QEMU.  Used by the one thread that runs protect.
    """

    def __init__(self, qmp: Qmp, drives: list[DriveSpec], nodes: dict[str, str]):
        self.qmp = qmp
        self.drives = drives
        self.nodes = nodes
        self.group: str | None = None

    def listing(self) -> dict[str, dict[str, int]]:
        """node -> {bitmap name: dirty bytes} for our nodes' nbd-mc bitmaps."""
        out = {n: {} for n in self.nodes.values()}
        for n in self.qmp.cmd("query-named-block-nodes"):
            if n.get("node-name") in out:
                for b in n.get("dirty-bitmaps") or []:
                    if (b.get("name") or "").startswith(PREFIX):
                        out[n["node-name"]][b["name"]] = b.get("count", 0)
        return out

    def epochs(self) -> set[int]:
        """Epochs of this group with a bitmap on every drive."""
        found = None
        for names in self.listing().values():
            mine = set()
            for name in names:
                m = _EPOCH.match(name)
                if m and m.group(1) == self.group:
                    mine.add(int(m.group(2)))
            found = mine if found is None else found & mine
        return found or set()

    def covers(self, committed: int) -> bool:
        """Does a bitmap count every write since ``committed`` was committed?"""
        return self.group is not None and committed in self.epochs()

    def dirty_bytes(self, name: str) -> int:
        return sum(bm.get(name, 0) for bm in self.listing().values())

    def add_actions(self, name: str) -> list[dict]:
        """Transaction actions that start bitmap ``name`` afresh on every drive (an
        earlier attempt at the same epoch, whose commit was skipped, is cleared)."""
        have = self.listing()
        acts = []
        for node in self.nodes.values():
            kind = "block-dirty-bitmap-clear" if name in have[node] else "block-dirty-bitmap-add"
            acts.append({"type": kind, "data": {"node": node, "name": name}})
        return acts

    def start_epoch(self, epoch: int) -> None:
        """At the pause of checkpoint ``epoch``: bitmap ``epoch`` starts counting."""
        self.qmp.cmd("transaction", actions=self.add_actions(epoch_name(self.group, epoch)))

    def committed(self, epoch: int) -> None:
        """The secondary acknowledged ``epoch``: earlier epochs' bitmaps are not needed."""
        for node, names in self.listing().items():
            for name in names:
                m = _EPOCH.match(name)
                if m and m.group(1) == self.group and int(m.group(2)) < epoch:
                    self.remove(node, name)

    def remove(self, node: str, name: str) -> None:
        """Remove one of our bitmaps if it is idle (lifecycle.remove_bitmap: a job's
        sync bitmap stays until that job has ended, and goes at the next removal)."""
        remove_bitmap(self.qmp, node, name)

    def remove_named(self, name: str) -> None:
        for node, names in self.listing().items():
            if name in names:
                self.remove(node, name)

    def remove_rounds(self) -> None:
        """Round bitmaps live only during one resync."""
        for node, names in self.listing().items():
            for name in names:
                if not _EPOCH.match(name) and name.startswith(PREFIX):
                    self.remove(node, name)

    def prune_foreign(self) -> list[str]:
        """Remove bitmaps of other groups and leftover resync rounds; returns their names.

        Called once the secondary's group is known: bitmaps counted against
        another secondary can never be used, and round bitmaps belong to a resync
        that is over (a protect that died in one)."""
        removed = []
        for node, names in self.listing().items():
            for name in names:
                m = _EPOCH.match(name)
                if m and m.group(1) == self.group:
                    continue
                self.remove(node, name)
                removed.append(name)
        return sorted(set(removed))

    def drop_all(self) -> None:
        """A full sync makes every bitmap pointless."""
        for node, names in self.listing().items():
            for name in names:
                self.remove(node, name)
