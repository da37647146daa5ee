"""docs/cli.md is what the click commands say today (nbd_mc/cli/reference.py).

A changed option, default or help text without `python -m nbd_mc.cli.reference
--write` fails here, so the reference never drifts from `--help`.
"""

from nbd_mc.cli import reference


def test_the_committed_cli_reference_is_current():
    assert reference.DOC.exists(), "docs/cli.md missing: python -m nbd_mc.cli.reference --write"
    assert reference.DOC.read_text() == reference.render(), (
        "docs/cli.md is stale: run python -m nbd_mc.cli.reference --write")


def test_the_reference_lists_every_command():
    text = reference.render()
    for name in ("serve", "status", "commit", "rollback", "fence", "failover", "recover",
                 "inspect", "stop", "protect", "verify"):
        assert f"## nbd-mc {name}\n" in text
