"""What every `nbd-mc` command shares: the click group, refusals, output, --control.

Exit status: 0 success, 1 the operation was refused or failed (the message says
why), 2 usage error.  `--json` prints the control reply's ``return`` object.
"""

from __future__ import annotations

import functools
import json

import click

from ..address import default_control
from ..control import ControlClient
from ..errors import NbdMcError
from ..tls import TlsFiles
from ..units import parse_size


@click.group(context_settings={"help_option_names": ["-h", "--help"]},
             invoke_without_command=True,
             # a command is required (see below); spelled out so that the usage
             # line, and docs/cli.md, read the same under click 8.1 and 8.2+
             subcommand_metavar="COMMAND [ARGS]...")
@click.version_option(package_name="nbd-mc")
@click.option("--json", "as_json", is_flag=True, help="JSON output for every command.")
@click.pass_context
def main(ctx, as_json):
    """nbd-mc: a disk replica that can always return to the last checkpoint.

    The secondary runs `nbd-mc serve`; the primary's QEMU mirrors into it and
    `nbd-mc protect` commits an epoch at every checkpoint.  When the primary
    dies, `nbd-mc failover` returns the disks to the last commit.
    """
    if ctx.invoked_subcommand is None:
        # a usage error, exit 2, whatever click's version says of a bare group
        # (8.1, Debian 12's python3-click, exits 0; 8.2 and later exit 2)
        click.echo(ctx.get_help(), err=True)
        ctx.exit(2)


def size_option(text: str | None) -> int | None:
    """A --cluster-size style value, or a usage error."""
    if not text:
        return None
    try:
        return parse_size(text)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


class Failure(click.ClickException):
    """A refusal: 'nbd-mc: error: ...' on stderr, exit status 1."""

    exit_code = 1

    def show(self, file=None):
        click.echo(f"nbd-mc: error: {self.message}", err=True)


def refusals(fn):
    """Turn our errors and unreachable servers into exit status 1 with one line."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NbdMcError as e:
            cls = getattr(e, "error_class", "")
            prefix = f"{cls}: " if cls and cls not in ("StateError", "GenericError") else ""
            raise Failure(prefix + e.desc) from None
        except (ValueError, OSError) as e:
            raise Failure(str(e)) from None
    return wrapper


def json_wanted(as_json: bool) -> bool:
    """The command's own --json, or the group's (`nbd-mc --json status`)."""
    return as_json or bool(click.get_current_context().find_root().params.get("as_json"))


def emit(obj: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True) if as_json else text)


def control_options(fn):
    """--control / --state-dir / --tls-certificates / --json, handed over as a Target."""
    @click.option("--control", "control", metavar="ADDR", envvar="NBD_MC_CONTROL",
                  help="Control address: a unix socket path or tcp://HOST:PORT "
                       "(default $NBD_MC_CONTROL, else DIR/control.sock).")
    @click.option("--state-dir", "state_dir", metavar="DIR", type=click.Path(file_okay=False),
                  help="The server's state directory (its control socket is DIR/control.sock).")
    @click.option("--tls-certificates", "tls_dir", metavar="DIR", type=click.Path(file_okay=False),
                  help="x509 directory with ca-cert.pem and client-cert/key.pem, for tcp:// control.")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @functools.wraps(fn)
    def wrapper(*args, control, state_dir, tls_dir, as_json, **kwargs):
        target = Target(control, state_dir, tls_dir)
        return fn(*args, target=target, as_json=json_wanted(as_json), **kwargs)
    return wrapper


class Target:
    """Where a client command sends its request."""

    def __init__(self, control, state_dir, tls_dir):
        self.state_dir = state_dir
        self.tls_dir = tls_dir
        if not control and state_dir:
            control = default_control(state_dir)
        self.control = control

    def client(self, timeout: float = 30) -> ControlClient:
        if not self.control:
            raise click.UsageError("no control address: give --control ADDR, --state-dir DIR "
                                   "or set NBD_MC_CONTROL")
        tls = TlsFiles(self.tls_dir) if self.tls_dir else None
        try:
            return ControlClient(self.control, tls=tls, timeout=timeout)
        except (OSError, ValueError) as e:
            raise Failure(f"cannot reach the nbd-mc server at {self.control}: {e}") from None

    def execute(self, name: str, **arguments) -> dict:
        with self.client() as c:
            return c.execute(name, **arguments)
