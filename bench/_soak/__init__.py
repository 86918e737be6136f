"""The parts of bench/soak.py (the chaos soak), which imports them as ``_soak.<module>``:

- ``common``: the instances' settings and timeouts, SoakError, stream ids, small helpers;
- ``children``: the processes the soak starts (``Child``), and killing them all at the end;
- ``netem``: the network fault layer of ``--netem`` (a namespace for Redis, tc or TUN);
- ``ledger``: what was sent, acknowledged and delivered, and the audit of the invariant;
- ``clients``: the WebSocket clients (users, connections, reconnects, rejoins, room visits,
  read markers) and their check of the presence and read events;
- ``faults``: every kind of fault, its schedule and how each is made (a table at the top);
- ``runner``: the Soak itself: instances and Redis, traffic, the run and its end checks;
- ``rooms``: the rooms' keys of SPEC §15 read from Redis, and held against the clients' rooms
  (presence), against nothing (once all are gone) and against the reads sent (markers);
- ``report``: the JSON report and the scan of the instances' logs for tracebacks.
"""
