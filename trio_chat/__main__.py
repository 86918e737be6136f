"""``python -m trio_chat`` and the ``trio-chat`` console script."""

from __future__ import annotations

import sys

from ._cli.main import main as run_cli


def main() -> None:
    """Run the command line and exit with its status."""
    sys.exit(run_cli())


if __name__ == "__main__":
    main()
