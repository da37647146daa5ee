"""`nbd-mc status --watch`: the secondary's state, refreshed until Ctrl-C.

On a terminal a rich live view (a table redrawn in place, the same library protect
uses for its progress); otherwise one plain line per refresh, which is what a log
file or a pipe wants.  A server that stops answering is shown as such and watched
on, so the view survives a restart of the server.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .units import human_size


class _Rates:
    """Commits per second between two refreshes (state: the previous sample)."""

    def __init__(self):
        self._prev: tuple[float, int] | None = None

    def commits_per_s(self, st: dict | None) -> float | None:
        if st is None:
            self._prev = None
            return None
        now, commits = time.monotonic(), (st.get("stats") or {}).get("commits", 0)
        prev, self._prev = self._prev, (now, commits)
        if prev is None or now <= prev[0] or commits < prev[1]:
            return None
        return (commits - prev[1]) / (now - prev[0])


def _since(st: dict) -> str:
    last = st.get("last_commit_time")
    return "no commit by this server yet" if last is None else \
        f"last commit {max(0.0, time.time() - last):.1f} s ago"


def plain_line(st: dict | None, error: str | None, rate: float | None) -> str:
    stamp = time.strftime("%H:%M:%S")
    if st is None:
        return f"{stamp} server not answering: {error}"
    prot = "protected" if st["protected"] else "NOT protected"
    flags = "".join([", FENCED" if st["fenced"] else "",
                     f", BROKEN: {st['broken']}" if st.get("broken") else ""])
    disks = " ".join(f"{d['name']}={human_size(d['undo_bytes'])}/{d['preserved_clusters']}cl"
                     for d in st["disks"])
    rate_text = f", {rate:.1f} commits/s" if rate is not None else ""
    return (f"{stamp} epoch {st['committed']} {prot}, role {st['role']}{flags}; "
            f"{_since(st)}{rate_text}; undo {disks}")


def live_view(st: dict | None, error: str | None, rate: float | None, where: str):
    if st is None:
        return Text(f"{where}: server not answering: {error}", style="bold red")
    prot = Text("protected", style="green") if st["protected"] else \
        Text("NOT protected", style="bold red")
    head = Text.assemble(f"{where}  committed epoch {st['committed']}  ", prot,
                         f"  role {st['role']}  generation {st['generation']}",
                         ("  FENCED" if st["fenced"] else "", "bold red"),
                         (f"  BROKEN: {st['broken']}" if st.get("broken") else "", "bold red"))
    stats = st.get("stats") or {}
    sub = Text(f"{_since(st)}; commits {stats.get('commits', 0)}"
               + (f" ({rate:.1f}/s)" if rate is not None else "")
               + f", refused commits {stats.get('refused_commits', 0)}"
               + f", refused writes {stats.get('refused_writes', 0)}", style="dim")
    table = Table(box=None, pad_edge=False)
    for col, justify in (("disk", "left"), ("size", "right"), ("cluster", "right"),
                         ("preserved", "right"), ("undo", "right"), ("image", "left")):
        table.add_column(col, justify=justify)
    for d in st["disks"]:
        table.add_row(d["name"], human_size(d["size"]), human_size(d["cluster_size"]),
                      str(d["preserved_clusters"]), human_size(d["undo_bytes"]), d["image"])
    return Group(head, sub, table)


def watch(fetch, where: str, interval: float = 1.0, count: int | None = None,
          stream=None) -> None:
    """Show fetch() (a query-status reply; it raises when the server does not
    answer) every ``interval`` seconds, ``count`` times or until Ctrl-C."""
    stream = stream or sys.stdout
    rates = _Rates()

    def sample():
        try:
            st, error = fetch(), None
        except Exception as e:  # shown, and watched on: the server may come back
            st, error = None, str(e) or type(e).__name__
        return st, error, rates.commits_per_s(st)

    n = 0
    try:
        if stream.isatty():
            console = Console(file=stream)
            with Live(live_view(*sample(), where), console=console, auto_refresh=False) as live:
                n = 1
                while count is None or n < count:
                    time.sleep(interval)  # the refresh period of a live view
                    live.update(live_view(*sample(), where), refresh=True)
                    n += 1
        else:
            while count is None or n < count:
                if n:
                    time.sleep(interval)  # the refresh period
                stream.write(plain_line(*sample()) + "\n")
                stream.flush()
                n += 1
    except KeyboardInterrupt:
        pass
