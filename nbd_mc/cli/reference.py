"""The CLI reference (docs/cli.md), generated from the click commands themselves.

``python -m nbd_mc.cli.reference`` prints it, ``--write`` rewrites docs/cli.md and
``--check`` exits 1 when the committed file differs from what the commands say
(tests/unit/test_cli_reference.py runs the check, so a changed option or help text
without a regenerated reference fails the unit tests).  Generated rather than
written so that the reference cannot drift from ``--help``: the text is click's own
help formatter, one section per command, in the order ``nbd-mc --help`` lists them.
"""

from __future__ import annotations

import pathlib
import sys

import click

from nbd_mc.cli import main

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "cli.md"

_HEADER = """\
# CLI reference

Generated from the click commands by `python -m nbd_mc.cli.reference --write`;
do not edit by hand (`tests/unit/test_cli_reference.py` fails when this file is
stale). Every command also prints this with `--help`. Exit status: 0 success,
1 the operation was refused or failed (one line says why), 2 usage error.
"""


def _help(command: click.Command, name: str, parent: click.Context | None) -> str:
    """click's own `--help` text for `command`, at a fixed width (stable output)."""
    ctx = click.Context(command, info_name=name, parent=parent, terminal_width=88,
                        max_content_width=88)
    return ctx.get_help()


def render() -> str:
    """The whole reference as Markdown."""
    root = click.Context(main, info_name="nbd-mc", terminal_width=88, max_content_width=88)
    parts = [_HEADER, "## nbd-mc\n", "```\n" + _help(main, "nbd-mc", None) + "\n```\n"]
    for name in main.list_commands(root):
        command = main.get_command(root, name)
        if command is None or command.hidden:
            continue
        parts.append(f"## nbd-mc {name}\n")
        parts.append("```\n" + _help(command, name, root) + "\n```\n")
    return "\n".join(parts)


def cli(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python -m nbd_mc.cli.reference --write", file=sys.stderr)
            return 1
        return 0
    if "--write" in argv:
        DOC.write_text(text)
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
