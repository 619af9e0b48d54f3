"""``python -m server``: the same as the ``fedtray-server`` command."""

from server.cli import main

raise SystemExit(main())
