"""The ``trio-chat`` command: ``main`` parses the command line and runs a command,
``workers`` supervises ``serve --workers N`` processes and ``terminal`` is ``trio-chat client``,
a chat in the terminal on top of the public :mod:`trio_chat.client`.
"""
