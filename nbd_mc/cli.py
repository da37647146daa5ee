"""The `nbd-mc` command line (click).

Exit status: 0 success, 1 the operation was refused or failed, 2 usage error.
"""

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nbd-mc")
def main():
    """nbd-mc: a disk replica that can always return to the last checkpoint."""


# --- protect (primary side): owned by nbd_mc/primary.py ---------------------
# (command defined below by the primary-side work)


if __name__ == "__main__":
    main()
