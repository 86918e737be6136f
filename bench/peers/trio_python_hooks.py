"""``trio-chat serve`` with a Python ``send`` hook that allows everything: bench/hooks.py's
"python" variant (SPEC §14's in-process transport, the cost of asking it).

Run exactly as ``python -m trio_chat serve ARGS``: the same command line, process tuning,
logging and signal handling, because it is the CLI's own ``serve`` command with ``hooks=``
added to the ``serve()`` it calls.
"""

from __future__ import annotations

import sys
from functools import partial

import trio_chat
import trio_chat._server
from trio_chat._cli.main import main


class AllowEverySend:
    """The cheapest hook an application can have: it is asked, and says yes."""

    async def send(self, event: trio_chat.SendEvent) -> trio_chat.Allow:
        return trio_chat.Allow()


if __name__ == "__main__":
    # the CLI imports serve from trio_chat._server when it runs the command
    trio_chat._server.serve = partial(trio_chat._server.serve, hooks=AllowEverySend())  # type: ignore[assignment]
    sys.exit(main(["serve", *sys.argv[1:]]))
