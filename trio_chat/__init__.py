"""trio-chat: a multi-instance WebSocket chat server on Trio, with sessions and fan-out in Redis.

Embedding::

    server = await nursery.start(trio_chat.serve, trio_chat.Config(), hooks=MyRules())
    print(server.url)  # cancelling the nursery shuts the instance down cleanly
    await server.publish("lobby", {"text": "hello"}, sender="bot")

Everything an embedding needs is here: ``serve`` and the :class:`Server` it returns (the
admin operations as methods, ``listen``), the configuration classes, the hooks' events and
answers (:class:`Allow`, :class:`Deny`), and the errors.
"""

from ._config import AdminConfig as AdminConfig
from ._config import AuthConfig as AuthConfig
from ._config import Config as Config
from ._config import HeartbeatConfig as HeartbeatConfig
from ._config import HistoryConfig as HistoryConfig
from ._config import HooksConfig as HooksConfig
from ._config import LimitsConfig as LimitsConfig
from ._config import RedisConfig as RedisConfig
from ._config import RoomOptions as RoomOptions
from ._config import ServerConfig as ServerConfig
from ._config import SessionConfig as SessionConfig
from ._config import load_config as load_config
from ._errors import AuthError as AuthError
from ._errors import BackendUnavailable as BackendUnavailable
from ._errors import ChatError as ChatError
from ._errors import ConfigError as ConfigError
from ._errors import ProtocolError as ProtocolError
from ._hooks.events import KEEP as KEEP
from ._hooks.events import Allow as Allow
from ._hooks.events import ConnectEvent as ConnectEvent
from ._hooks.events import Deny as Deny
from ._hooks.events import DirectEvent as DirectEvent
from ._hooks.events import DisconnectEvent as DisconnectEvent
from ._hooks.events import JoinEvent as JoinEvent
from ._hooks.events import SendEvent as SendEvent
from ._hub import SlowListener as SlowListener
from ._operations import InvalidArgument as InvalidArgument
from ._operations import NoRecord as NoRecord
from ._operations import PayloadTooLarge as PayloadTooLarge
from ._server import Server as Server
from ._server import serve as serve

#: the one version source: pyproject.toml reads it, ``trio-chat --version`` prints it
__version__ = "0.1.0"
