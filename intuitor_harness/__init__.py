"""The harness around the method: how a run is checked (process), kept (runs), watched (watch) and evaluated
(tasks, benchmarks, sandbox). intuitor.py holds the method itself; nothing here imports it."""
