"""Fixtures for the transport tests: real nats-server processes (``tests/natslab.py``).

A conftest elsewhere under tests/ takes them with the same import; a test module must not import
them itself (its parameters would shadow the imports).
"""

from natslab import nats_cluster, nats_server

__all__ = ["nats_cluster", "nats_server"]
