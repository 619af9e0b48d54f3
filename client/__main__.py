"""``python -m client``: the same as the ``fedtray-client`` command (see :mod:`client.cli`)."""

import multiprocessing

from client.cli import main

if __name__ == "__main__":
    # Must run first in a frozen (PyInstaller) build, or a spawned training worker would
    # re-run the CLI instead of its target.
    multiprocessing.freeze_support()
    raise SystemExit(main())
