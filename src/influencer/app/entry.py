"""The ``influencer`` console script: checks that the ``app`` extra is installed, then runs the CLI.

Without it, one line says what is missing and how to install it, instead of an import traceback.
"""

from __future__ import annotations

import sys

from influencer.extras import missing, missing_message

# What the command needs beyond the core (torch, numpy, tqdm): the `app` extra in pyproject.toml.
APP_MODULES = ["click", "matplotlib", "sklearn"] + (["tomli"] if sys.version_info < (3, 11) else [])


def main() -> None:
    """Console-script entry point."""
    absent = missing(APP_MODULES)
    if absent:
        print(f"influencer: {missing_message(absent, 'the influencer command', 'app')}", file=sys.stderr)
        raise SystemExit(1)
    from influencer.app.commands.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
