"""The networked session: one device taking part in a federation, behind one facade.

The session is a set of parts with narrow collaborators; each module opens with the
contract it keeps:

* :mod:`client.session.facade`: :class:`DistributedClient`, the ONE thread-safe facade
  (owns the session thread and its asyncio loop; the threading model is stated there).
* :mod:`client.session.hub`: the snapshot hub, the one owner of the current
  :class:`client.snapshot.ClientSnapshot` (subscribe / notify).
* :mod:`client.session.core`: wires the parts and runs them; the one table of handled
  server events, the one place a pause takes effect, the one entry for new settings.
* :mod:`client.session.link`: the server link (connect, register, heartbeat, reconnect
  with backoff, auth refusal), with :mod:`client.session.tls` for certificate errors
  in plain words.
* :mod:`client.session.rounds`: local rounds (``training:start`` accept/refuse, cancel,
  worker events, progress to the server, keeping results).
* :mod:`client.session.uploader`: pending updates sent and settled, with the retry policy.
* :mod:`client.session.base_weights`: the global weights received and held.
* :mod:`client.session.pause`: the pause sources (user, timed, power; more register as
  sources) and the board that combines them.
* :mod:`client.session.live_settings`: the settings in use, the one place they are
  saved, and the watch on the settings file.
* :mod:`client.session.decisions`: the pure decisions (refusing a round, the outcome of a
  submit, the user's pause, the retry policy), tested by table.
* :mod:`client.session.eventloop`: the session's loop (uvloop's where installed), and
  :mod:`client.session.offload`: where disk work runs (on the loop when small, else in
  a worker thread).

Handlers validate with :func:`client.protocol.parse` and never raise into
python-socketio: bad payloads get an ``ErrorAck`` (or a log line for unacked events).
"""

from __future__ import annotations

from client.session.decisions import user_decision
from client.session.facade import DistributedClient
from client.session.rounds import default_work_dir
from client.session.tls import tls_words as _tls_words
from client.session.worker_seam import Worker, WorkerFactory
from client.snapshot import ClientSnapshot, PauseDecision

__all__ = [
    "ClientSnapshot",
    "DistributedClient",
    "PauseDecision",
    "Worker",
    "WorkerFactory",
    "_tls_words",
    "default_work_dir",
    "user_decision",
]
