"""fedtray's reference training server (Socket.IO + HTTP on one port).

It speaks the wire contract defined in :mod:`client.protocol`; there is no second copy.
"""

from client import __version__

__all__ = ["__version__"]
