"""primary/features.py: questions to a QMP schema (the introspection format QEMU's
query-qmp-schema returns: masked type names, commands and flat unions)."""

import pytest

from nbd_mc.primary.errors import PrimaryError
from nbd_mc.primary.features import REQUIRED, QemuFeatures


def schema(commands: dict[str, list[str]], drivers: dict[str, list[str]] | None = None):
    """A minimal introspection schema: ``commands`` -> argument names, and
    blockdev-add's union of ``drivers`` -> their own options."""
    out, n = [], 0
    for name, args in commands.items():
        n += 1
        out.append({"name": name, "meta-type": "command", "arg-type": str(n),
                    "ret-type": "0"})
        out.append({"name": str(n), "meta-type": "object",
                    "members": [{"name": a, "type": "str"} for a in args]})
    if drivers is not None:
        variants = []
        for drv, opts in drivers.items():
            n += 1
            variants.append({"case": drv, "type": str(n)})
            out.append({"name": str(n), "meta-type": "object",
                        "members": [{"name": o, "type": "str"} for o in opts]})
        out.append({"name": "blockdev-add", "meta-type": "command", "arg-type": "union",
                    "ret-type": "0"})
        out.append({"name": "union", "meta-type": "object", "tag": "driver",
                    "members": [{"name": "driver", "type": "str"},
                                {"name": "node-name", "type": "str"}],
                    "variants": variants})
    return out


def test_everything_protect_needs_is_found():
    f = QemuFeatures(schema({c: list(a) for c, a in REQUIRED.items()}))
    assert f.missing() == []
    f.require()


def test_a_missing_command_and_argument_are_named():
    needed = {c: list(a) for c, a in REQUIRED.items() if c != "yank"}
    needed["blockdev-mirror"] = ["on-target-error"]  # no copy-mode (QEMU < 3.0)
    f = QemuFeatures(schema(needed))
    assert f.missing() == ["blockdev-mirror copy-mode", "yank"]
    with pytest.raises(PrimaryError, match="lacks .*blockdev-mirror copy-mode, yank"):
        f.require()


def test_driver_options_come_from_blockdev_adds_union():
    f = QemuFeatures(schema({"yank": []}, {"copy-before-write": ["file", "on-cbw-error"],
                                           "nbd": ["server", "export"]}))
    assert f.blockdev_options("copy-before-write") == {"driver", "node-name", "file",
                                                       "on-cbw-error"}
    assert "on-cbw-error" not in f.blockdev_options("nbd")
    assert f.blockdev_options("no-such-driver") == set()
    assert f.has_arg("yank", "instances") is False and f.has_command("yank")
