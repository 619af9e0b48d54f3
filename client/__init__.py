"""fedtray's headless core.

Everything a device needs to take part in a federation without a GUI: settings, device
detection, resource monitoring, the wire protocol, the weight codec, the Socket.IO session
and the training worker.

Contract: importing ``client`` (or any module in it) never imports GUI code and never
imports torch; torch is loaded only inside the training worker process.
"""

__version__ = "0.1.0"
