"""History through the real server (`serve --history`): the model-based test of
issue 19 over NBD.

Random writes, zeroes and trims through libnbd over many epochs with every
commit retained; every retained ``NAME@epoch-N`` read through libnbd and, as the
oracle, the layer file through ``qemu-img compare``/``check`` equals the model
at commit N; `nbd-mc history` lists them; `failover --to-epoch N` (online, and
offline after kill -9 of nbdkit and a restart) leaves the images equal to the
model at N; an epoch that is not retained is refused with one line.
"""

from __future__ import annotations

import json
import os
import random

import nbd
import pytest

from nbd_mc.secondary import history
from support.servers import (GroupModel, assert_bytes, assert_check, describe, make_image,
                             read_all, read_file, run, write_file)

MiB = 1 << 20
SIZES = {"vda": 2 * MiB, "vdb": 1 * MiB}


def make(servers, seed, *args):
    rng = random.Random(seed)
    images, initial = {}, {}
    for name, size in SIZES.items():
        images[name] = servers.path(f"{name}.raw")
        initial[name] = make_image(images[name], size, rng)
    s = servers.new(images, args=list(args))
    return s, GroupModel(initial), rng


def io(s, model, rng, n):
    handles = {name: s.connect(name) for name in SIZES}
    for _ in range(n):
        name = rng.choice(list(SIZES))
        size = SIZES[name]
        off = rng.randrange(0, size - 1)
        count = min(rng.choice((512, 4096, 9000, 65536, 200000)), size - off)
        k = rng.random()
        if k < 0.7:
            data = rng.randbytes(count)
            handles[name].pwrite(data, off)
            model.write(name, off, data)
        elif k < 0.85:
            handles[name].zero(count, off)
            model.zero(name, off, count)
        else:
            handles[name].trim(count, off)
            model.zero(name, off, count)
    for h in handles.values():
        h.flush()
        h.shutdown()


def ok(r):
    assert r.returncode == 0, describe(r)
    return r


def check_epochs(s, model, epochs, tmp):
    for n in epochs:
        for name in SIZES:
            h = s.connect(f"{name}@epoch-{n}")
            assert h.is_read_only()
            assert_bytes(read_all(h), model.history[n][name], f"{name}@epoch-{n} over NBD")
            h.shutdown()
            layer = history.layer_path(s.state_dir, name, n)
            raw = os.path.join(tmp, "expected.raw")
            write_file(raw, model.history[n][name])
            r = run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", layer, raw])
            assert r.returncode == 0, f"qemu-img compare {layer}: {describe(r)}"
            assert_check(layer, allowed=(0, 3))


def test_retained_epochs_over_nbd_and_failover_to_one(servers):
    s, model, rng = make(servers, 19, "--history", "1h", "--history-every", "0")
    s.start()
    io(s, model, rng, 10)
    last = 10
    for epoch in range(1, last + 1):
        s.execute("commit", epoch=epoch)
        model.commit(epoch)
        io(s, model, rng, rng.randrange(1, 8))
    listing = json.loads(ok(s.cli("history", "--json")).stdout)
    assert [c["epoch"] for c in listing["checkpoints"]] == list(range(1, last + 1))
    assert listing["oldest_epoch"] == 1 and listing["bytes"] > 0
    assert all(c["exports"] == [f"vda@epoch-{c['epoch']}", f"vdb@epoch-{c['epoch']}"]
               for c in listing["checkpoints"])
    text = ok(s.cli("history")).stdout
    assert "10 retained checkpoints" in text and "qemu-img convert" in text
    st = json.loads(ok(s.cli("status", "--json")).stdout)
    assert st["history"]["oldest_epoch"] == 1 and st["history"]["count"] == last
    prom = ok(s.cli("status", "--prometheus")).stdout
    assert "nbd_mc_history_oldest_epoch" in prom and "nbd_mc_history_bytes" in prom
    check_epochs(s, model, range(1, last + 1), servers.root)
    # an epoch that is not retained: refused at open and by failover, one line each
    with pytest.raises(nbd.Error):
        s.connect(f"vda@epoch-{last + 5}")
    r = s.cli("failover", "--to-epoch", str(last + 5))
    assert r.returncode == 1 and "not committed" in r.stderr and len(r.stderr.splitlines()) == 1
    # kill -9 of nbdkit mid-epoch, restart: history survives, recovery rolls back
    io(s, model, rng, 5)
    s.kill9()
    model.rollback()
    s.start(with_disks=False)
    check_epochs(s, model, [1, last // 2, last], servers.root)
    target = rng.randrange(1, last)
    r = json.loads(ok(s.cli("failover", "--to-epoch", str(target), "--json")).stdout)
    assert r["committed"] == target
    s.stop()
    for name in SIZES:
        assert_bytes(read_file(s.image(name)), model.history[target][name],
                     f"{name} after failover --to-epoch {target}")
    assert not [f for f in os.listdir(s.state_dir) if ".epoch-" in f]


def test_offline_failover_to_epoch_after_kill(servers):
    s, model, rng = make(servers, 7, "--history", "10m", "--history-every", "0",
                         "--durability", "power")
    s.start()
    io(s, model, rng, 5)
    for epoch in range(1, 6):
        s.execute("commit", epoch=epoch)
        model.commit(epoch)
        io(s, model, rng, 4)
    s.kill9()
    listing = json.loads(ok(s.cli("history", "--json")).stdout)  # offline, from the files
    assert [c["epoch"] for c in listing["checkpoints"]] == [1, 2, 3, 4, 5]
    r = s.cli("failover", "--to-epoch", "0")
    assert r.returncode == 1 and "not retained" in r.stderr, describe(r)
    ok(s.cli("failover", "--to-epoch", "2"))
    for name in SIZES:
        assert_bytes(read_file(s.image(name)), model.history[2][name], f"{name} offline")
    assert json.loads(read_file(os.path.join(s.state_dir, "state.json")))["committed"] == 2
