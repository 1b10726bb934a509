"""Helpers for tests and demos that users can reuse: local clusters on 127.0.0.1,
and the project's commands as subprocesses."""

from ._cluster import LocalCluster, NodeProcess, ProcessCluster, free_port
from ._proc import console_command, read_stdout_until

__all__ = [
    "LocalCluster",
    "NodeProcess",
    "ProcessCluster",
    "console_command",
    "free_port",
    "read_stdout_until",
]
