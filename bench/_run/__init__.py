"""The parts of bench/run.py (trio-chat vs the Socket.IO peers), which imports them as
``_run.<module>`` (and keeps the names the other bench scripts use as ``run.<name>``):

- ``settings``: paths, the systems and layouts, the settings main() sets once, BenchError;
- ``processes``: child processes, the throwaway redis-server or Redis Cluster, CPU readings;
- ``systems``: the servers under test (trio-chat, python-socketio, Node.js Socket.IO), their
  logs, and the copy of trio_chat/ the trio-chat servers run from;
- ``workloads``: the plans of workloads A-D and one pass (one system, one workload);
- ``profiling``: py-spy during a pass, the summaries, the extra profiled passes;
- ``report``: the tables and notes printed at the end, the versions, the JSON file.

Standard library only, like run.py.
"""
