"""fedtray's system-tray shell over :mod:`client`. Never imports torch."""
