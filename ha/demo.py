"""`make demo-ha`: the HA story on two Pacemaker nodes of this machine, told step by step.

The story and the harness are the test's (tests/support/ha_story.py and
tests/support/cluster.py): the demo is the test with its narration on the
terminal.  Options: --keep keeps the files (in --dir), --dir DIR; --three
(`make demo-ha3`) tells the three-node story instead: three VMs, one node killed
(tests/support/ha3_story.py).
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

from support.ha3_story import RingStory  # noqa: E402
from support.ha_story import Story  # noqa: E402


def print_ring(figures: dict) -> int:
    """The three-node story's figures: per VM, kill -> running and return -> protected."""
    kill, back = figures["node_kill"], figures["node_return"]
    print(f"\n{kill['victim']} killed (kill -> VM running again / -> the guest's own check passed):")
    for vm, f in sorted(kill["vms"].items()):
        print(f"  {vm}: {f['kill_to_vm_running_s']:.1f} s / {f['kill_to_guest_check_ok_s']:.1f} s")
    print(f"  kept running: {', '.join(kill['kept_running'])}; stayed protected: "
          f"{', '.join(kill['kept_protected']) or 'none'}")
    print(f"\n{kill['victim']} returned (restart -> protected again; online after "
          f"{back['restart_to_online_s']:.1f} s):")
    for vm, s in sorted(back["restart_to_protected_s"].items()):
        r = back["resyncs"].get(vm, {})
        print(f"  {vm}: {s:.1f} s ({r.get('mode')} resync, {r.get('bytes', 0) / 2**20:.1f} MiB)")
    print(f"  the whole cluster protected: {back['restart_to_all_protected_s']:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make demo-ha", description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="working directory (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    ap.add_argument("--three", action="store_true",
                    help="three nodes, three VMs, one node killed (make demo-ha3)")
    args = ap.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="nbdmc-demo-ha-"))
    say = lambda line: print(line, flush=True)  # noqa: E731
    story = RingStory(root, say=say) if args.three else Story(root, say=say)
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
    if args.three:
        return print_ring(figures)
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
