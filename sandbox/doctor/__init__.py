"""`sandboxd doctor`: what this host or pod lacks for sandboxd, each problem with its fix.

`host.observe()` gathers what the checks look at (a filesystem root, the user, the probes
of `probes.py`); `examine.examine()` runs every check on it; `examine.diagnose()` does both
for this machine (exported as `sandbox.diagnose_host`). Levels (`findings.Level`): fail
(runs cannot work: exit status 1), warn (they work, with less), ok, skipped.

Nothing is imported here: `python -m sandbox.doctor.probes` runs in a process of its own
and should load no more than it needs.
"""
