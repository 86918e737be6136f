"""``python -m trio_chat`` and the ``trio-chat`` console script."""

from __future__ import annotations

import sys

from . import _cli


def main() -> None:
    """Run the command line and exit with its status."""
    sys.exit(_cli.main())


if __name__ == "__main__":
    main()
