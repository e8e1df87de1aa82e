"""The HTTP load test of sandboxd: `python -m loadtest` (see loadtest/__main__.py)."""
