"""Async jobs: a run, pipeline or batch submitted now, run later, its result kept and sent
to a callback. store.py keeps them (SQLite in the state directory, so they outlive the
process), callbacks.py signs and delivers callbacks, runner.py runs them; the HTTP face is
service/api/jobs.py."""
