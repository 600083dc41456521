"""Starting and stopping `distserve serve` for the benchmark scripts: the package's (one place)."""
from distserve.tune.serve import free_port, start_server, stop_server

__all__ = ["free_port", "start_server", "stop_server"]
