"""Helpers for tests and demos that users can reuse: local clusters on 127.0.0.1."""

from ._cluster import LocalCluster, NodeProcess, ProcessCluster, free_port

__all__ = ["LocalCluster", "NodeProcess", "ProcessCluster", "free_port"]
