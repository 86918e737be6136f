"""trio-chat: a multi-instance WebSocket chat server on Trio, with sessions and fan-out in Redis.

Embedding::

    server = await nursery.start(trio_chat.serve, trio_chat.Config())
    print(server.url)  # cancelling the nursery shuts the instance down cleanly
"""

from ._config import Config as Config
from ._config import load_config as load_config
from ._errors import AuthError as AuthError
from ._errors import BackendUnavailable as BackendUnavailable
from ._errors import ChatError as ChatError
from ._errors import ConfigError as ConfigError
from ._errors import ProtocolError as ProtocolError
from ._server import Server as Server
from ._server import serve as serve

__version__ = "0.1.0"
