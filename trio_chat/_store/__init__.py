"""The store layer: everything that knows Redis (or stands in for it).

``interface`` is the contract the rest of trio-chat programs against (a :class:`Batch` of
commands sent at once, a Pub/Sub :class:`Subscription`); ``memory``, ``redis`` and ``cluster``
are its three backends and ``backends.open_backend`` picks one from the store URL. ``keys``
names every key and channel (and computes hash slots); ``history`` is the room streams: the
append script, stream ids and the catch-up read (SPEC §11).

Nothing here imports the connection, hub or server layers above it.
"""
