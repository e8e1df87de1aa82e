"""Throwaway registries and root filesystems from Debian packages, for the demo, the tests
and the benchmarks. Nothing in sandbox/ or service/ imports it."""
