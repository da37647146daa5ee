"""The primary's side of the one-writer rule: claim the secondary, commit as its writer.

The rule itself (writer ids, what each export allows) is the secondary's, in
nbd_mc/secondary/writer.py; this is only the client that protect runs.
"""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class Claim:
    """What ``claim`` granted: the writer id and each disk's export."""

    writer: str | None
    generation: int | None
    exports: dict


def claim(ctl, stale_after: float | None = None, max_request: int | None = None) -> Claim:
    """Claim the secondary for this primary (``ctl``: a control.ControlClient) in a
    new session (``stale_after``: see the engine's new_session), asking its writer
    exports to advertise ``max_request`` (nbd_mc/blocksize.py) if given.

    A secondary that predates writer identities has no ``claim``: then the plain
    exports are used, as before (no writer id, commits name no writer).  One that
    predates ``max_request`` refuses the argument: the claim is sent again without
    it (its exports keep their own maximum).
    """
    from ..control import ControlError
    args = {} if stale_after is None else {"stale_after": stale_after}
    try:
        try:
            r = ctl.execute("claim", **args,
                            **({} if max_request is None else {"max_request": max_request}))
        except ControlError as e:
            if max_request is None or "unexpected arguments max_request" not in e.desc:
                raise
            r = ctl.execute("claim", **args)
    except ControlError as e:
        if e.error_class == "CommandNotFound":
            return Claim(None, None, {})
        raise
    return Claim(r["writer"], r["generation"], dict(r["exports"]))


class WriterControl:
    """A control connection whose commits carry the writer id (so a superseded
    protect's commit is refused, see check_commit_writer); otherwise the same."""

    def __init__(self, ctl, writer: str | None):
        self._ctl = ctl
        self.writer = writer

    def execute(self, name: str, **arguments) -> dict:
        if name == "commit" and self.writer:
            arguments.setdefault("writer", self.writer)
        return self._ctl.execute(name, **arguments)

    def close(self) -> None:
        self._ctl.close()

    def __getattr__(self, name):
        return getattr(self._ctl, name)
