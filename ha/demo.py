"""`make demo-ha`: the HA story on two Pacemaker nodes of this machine, told step by step.

The story and the harness are the test's (tests/support/ha_story.py and
tests/support/cluster.py): the demo is the test with its narration on the
terminal.  Options: --keep keeps the files (in --dir), --dir DIR.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))  # before ha/: `demo` is the repository's demo package

from support.ha_story import Story  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make demo-ha", description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="working directory (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    args = ap.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="nbdmc-demo-ha-"))
    story = Story(root, say=lambda line: print(line, flush=True))
    t0 = time.monotonic()
    ok = False
    try:
        figures = story.run()
        ok = True
    finally:
        story.stop()
        if not ok:
            print(story.agents_log()[-4000:])
        print(f"(everything stopped, namespaces removed; {time.monotonic() - t0:.0f} s)")
        if args.keep or not ok:
            print(f"files kept in {root} (agents.log, nodes/*/log, nodes/*/data/console.log)")
        else:
            shutil.rmtree(root, ignore_errors=True)
    q, n = figures["qemu_kill"], figures["node_kill"]
    print("\nfailover times (kill -> VM running again / -> the guest's own check passed):")
    print(f"  QEMU kill -9:      {q['kill_to_vm_running_s']:.1f} s / {q['kill_to_guest_check_ok_s']:.1f} s")
    print(f"  whole node killed: {n['kill_to_vm_running_s']:.1f} s / {n['kill_to_guest_check_ok_s']:.1f} s")
    i = figures["initial_sync"]
    disk = figures["failback"]["node1"]["disk_bytes"]
    print(f"\nresyncs (what protect copied into the replica; the disk is {disk / 2**20:.0f} MiB):")
    print(f"  initial sync into node2:                   {i['mode']}, {i['bytes'] / 2**20:.1f} MiB")
    for node, why in (("node1", "its QEMU was killed"), ("node2", "the node returned")):
        f = figures["failback"][node]
        print(f"  failback into {node} ({why + '):':22s} {f['mode']}, "
              f"{f['bytes'] / 2**20:.1f} MiB ({100 * f['bytes'] / disk:.1f} % of the disk) "
              f"in {f['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
