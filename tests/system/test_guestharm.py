"""The guest-harm soak (tests/support/guestharm.py): a protected real Linux guest
through secondary hangs of 1-20 s, kills, restarts, protect kills, a full undo
file system and EIO from the replica, over TCP.  Nothing of it may reach the guest:
no QEMU death, no guest I/O error, no protect exit, and the failover at the end is
byte-exact.  `make test` runs one round of every fault class on each QEMU;
`make soak` runs NBD_MC_HARM_CYCLES (default 200) cycles on each and also holds
protect to its bound on VM pauses (1 s: a guarantee of protect's, but a timing,
so only in the soak, on a machine left to it)."""

import os
import shutil

import pytest

from support import guestharm
from support.qemu_version import PREFIXES
from support.reliability import record
from support.servers import short_tmpdir

pytestmark = pytest.mark.qemu

CYCLES = int(os.environ.get("NBD_MC_HARM_CYCLES") or 0)
SEED = os.environ.get("NBD_MC_HARM_SEED", "harm")
#: QEMUs to run on: the system's, and 10.0 where `make setup` installed it (the
#: prefixes the one QEMU setting knows, support/qemu_version.py).
QEMUS = {"system": None, **PREFIXES}


def _qemus():
    return [q for q, d in QEMUS.items()
            if d is None or os.path.exists(os.path.join(d, "qemu-system-x86_64"))]


@pytest.fixture
def workdir(request):
    """A fresh directory, removed after a pass; a failed run's stays (protect.log,
    the serial console, the state directory) and its path is printed."""
    d = short_tmpdir("nbdmc-harm-")
    failed = request.session.testsfailed
    yield d
    if request.session.testsfailed > failed:
        print(f"\nguest-harm: the failed run's files are kept in {d}")
    else:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("qemu", _qemus())
def test_guest_harm(workdir, qemu, monkeypatch):
    if QEMUS[qemu]:
        monkeypatch.setenv("PATH", QEMUS[qemu] + ":" + os.environ["PATH"])
    lines = []
    cycles = CYCLES or len(guestharm.FAULTS)
    try:
        res = guestharm.run(workdir, cycles, seed=SEED, say=lines.append)
    except Exception:
        print("\n".join(lines))
        raise
    text = "\n".join(lines) + "\n" + res.report()
    print(f"\nguest-harm soak, seed {SEED!r}\n{res.report()}")
    ok = (res.qemu_deaths == 0 and not res.guest_io_errors and not res.protect_exits
          and res.demo.ok and (not CYCLES or res.pauses_over_1s == 0))
    record(f"guest harm (QEMU {res.qemu})", res.cycles, 0 if ok else 1,
           seconds=round(res.seconds), qemu_deaths=res.qemu_deaths,
           guest_io_errors=len(res.guest_io_errors), protect_exits=len(res.protect_exits),
           pauses=res.pauses, longest_pause_ms=round(res.longest_pause * 1000),
           pauses_over_1s=res.pauses_over_1s, committed=res.demo.last_commit, **res.counts)
    assert res.cycles == cycles and all(n >= 1 for n in res.counts.values()), text
    assert res.qemu_deaths == 0, text
    assert not res.guest_io_errors, text
    assert res.block_io_errors == 0, text
    assert not res.protect_exits, text
    assert res.identical and res.demo.ok, text
    check = res.demo.check
    assert check.fsck == 0 and check.bad == 0 and check.gaps == 0, text
    if CYCLES:
        assert res.pauses_over_1s == 0, text
