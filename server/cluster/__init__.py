"""The multi-process server (``fedtray-server --workers N``): worker processes that hold
device connections, sharing device presence through Redis and rounds, updates and
versions through PostgreSQL and shared storage (:mod:`server.cluster.contracts` names
every seam). The single-process server imports nothing here but the command line's
flags (:mod:`server.cluster.supervisor`)."""
