"""`distserve tune`: plan, serve, measure, refit and re-plan on this machine (loop.py)."""
