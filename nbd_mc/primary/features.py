"""What the QEMU that protect meets offers, asked from QEMU itself (``query-qmp-schema``).

Users run QEMU 7.2 (Debian 12), 8.2 (Ubuntu 24.04), 10.0 (Debian 13, Debian 12
backports), 9.2-11.0 (Proxmox VE), and distributions backport fixes and features:
a version string says little about what a given binary accepts.  So protect never
parses one; it reads the QMP schema once per session and asks it whether a command,
a command's argument or a ``blockdev-add`` driver's option exists.

The schema's type names are masked (numbers) in introspection, so every question
starts from a command or a driver name, which are stable.

State: ``commands`` (command -> argument type), ``types`` (name -> the schema entry);
filled once by ask(), read-only afterwards.
"""

from __future__ import annotations

from .errors import PrimaryError, QmpCommandError

#: What protect cannot work without: a QEMU lacking one is refused in one clear line.
REQUIRED = {
    "blockdev-add": (), "blockdev-del": (), "query-named-block-nodes": (),
    "blockdev-mirror": ("copy-mode", "on-target-error"),
    "blockdev-backup": ("bitmap", "bitmap-mode", "auto-dismiss"),
    "block-dirty-bitmap-add": (), "block-dirty-bitmap-remove": (),
    "block-job-cancel": ("force",), "transaction": (), "yank": (),
}


#: Seconds to wait for QEMU's schema at start (QemuFeatures.ask).
SCHEMA_TIMEOUT = 60.0


class QemuFeatures:
    def __init__(self, schema: list[dict]):
        self.types = {e["name"]: e for e in schema}
        self.commands = {e["name"]: e.get("arg-type") for e in schema
                         if e.get("meta-type") == "command"}

    @classmethod
    def ask(cls, qmp) -> "QemuFeatures":
        """Read the schema, waiting up to SCHEMA_TIMEOUT (at least the session's own
        timeout): the answer is large (about 1 MB of JSON in QEMU 10.0), and on a busy
        host its transfer and parsing alone took 0.4-2.1 s (2 cores, load 35), so the
        session's timeout (--stall-timeout, as low as 2 s; it bounds waits that hang on
        the secondary, which this one does not) made protect fail at start."""
        try:
            return cls(qmp.execute("query-qmp-schema",
                                   timeout=max(SCHEMA_TIMEOUT, getattr(qmp, "timeout", 0))))
        except QmpCommandError as e:  # older than any QEMU protect supports (2.5)
            raise PrimaryError(f"QEMU cannot describe its QMP commands "
                               f"(query-qmp-schema: {e.desc}); it is too old") from None

    def has_command(self, name: str) -> bool:
        return name in self.commands

    def _members(self, type_name: str | None) -> set[str]:
        entry = self.types.get(type_name or "", {})
        return {m["name"] for m in entry.get("members", [])}

    def command_args(self, name: str) -> set[str]:
        """The arguments ``name`` takes (empty if there is no such command)."""
        return self._members(self.commands.get(name))

    def has_arg(self, command: str, arg: str) -> bool:
        return arg in self.command_args(command)

    def blockdev_options(self, driver: str) -> set[str]:
        """The options ``blockdev-add`` takes for ``driver`` (common and the driver's
        own); empty if QEMU has no such driver."""
        union = self.types.get(self.commands.get("blockdev-add") or "", {})
        for v in union.get("variants", []):
            if v.get("case") == driver:
                return self._members(union["name"]) | self._members(v.get("type"))
        return set()

    def missing(self, required: dict = REQUIRED) -> list[str]:
        """What of ``required`` (command -> arguments) this QEMU lacks, readable."""
        out = []
        for command, args in required.items():
            if not self.has_command(command):
                out.append(command)
                continue
            out += [f"{command} {a}" for a in args if not self.has_arg(command, a)]
        return out

    def require(self) -> None:
        """Refuse a QEMU that lacks what protect needs, naming what is missing."""
        gaps = self.missing()
        if gaps:
            raise PrimaryError("this QEMU lacks what nbd-mc protect needs: "
                               + ", ".join(gaps) + " (QEMU 7.2 or newer has all of it)")
