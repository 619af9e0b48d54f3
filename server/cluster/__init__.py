"""The multi-process server (``fedtray-server --workers N``): worker processes that hold
device connections, sharing device presence through Redis and rounds, updates and
versions through PostgreSQL and shared storage (:mod:`server.cluster.contracts` names
every seam). Nothing here is imported by the single-process server."""
