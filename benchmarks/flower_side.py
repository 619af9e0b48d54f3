"""Flower's side of ``benchmarks/vs_flower.py``: one Flower process, server or client.

The benchmark runs this file with the interpreter of its own Flower virtual environment
(``flwr==1.42.*``), so it imports only flwr, numpy and the standard library, never
fedtray. Everything is on loopback and insecure (no TLS), like fedtray's side.

* ``server --port P --rounds R --clients N --shapes JSON --out FILE``: Flower's legacy
  ``start_server`` with ``FedAvg`` (every round: all N clients fit, no federated or
  centralised evaluation), initial parameters float32 arrays of the given shapes. It
  writes FILE (JSON) when the rounds are done: ``registered`` (Unix time of each client
  registration), ``opened`` and ``aggregated`` (round number -> Unix time: after the
  clients were sampled and after ``aggregate_fit`` returned).
* ``client --port P --out FILE``: ``start_client`` with a ``NumPyClient`` whose ``fit``
  returns the parameters it got (a trivial fit: a round is serialisation, transfer and
  aggregation). It appends one JSON line per fit to FILE: ``{"round": r, "fitDone": t}``.
  It exits when the server ends the federation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def _server(args: argparse.Namespace) -> int:
    import flwr
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.strategy import FedAvg

    record: dict[str, Any] = {"registered": [], "opened": {}, "aggregated": {}}

    class TimedClientManager(SimpleClientManager):  # type: ignore[misc]
        def register(self, client: Any) -> bool:
            ok: bool = super().register(client)
            record["registered"].append(time.time())
            return ok

    class TimedFedAvg(FedAvg):  # type: ignore[misc]
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            out = super().configure_fit(server_round, parameters, client_manager)
            record["opened"][server_round] = time.time()  # after sampling (which waits)
            return out

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            out = super().aggregate_fit(server_round, results, failures)
            record["aggregated"][server_round] = time.time()
            return out

    rng = np.random.default_rng(0)
    initial = [rng.standard_normal(shape, dtype=np.float32) for shape in json.loads(args.shapes)]
    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=args.clients,
        min_evaluate_clients=0,
        min_available_clients=args.clients,
        on_fit_config_fn=lambda server_round: {"round": server_round},
        initial_parameters=flwr.common.ndarrays_to_parameters(initial),
    )
    del initial
    flwr.server.start_server(
        server_address=f"127.0.0.1:{args.port}",
        config=flwr.server.ServerConfig(num_rounds=args.rounds),
        strategy=strategy,
        client_manager=TimedClientManager(),
    )
    Path(args.out).write_text(json.dumps(record), encoding="utf-8")
    return 0


def _client(args: argparse.Namespace) -> int:
    import flwr

    out = Path(args.out)

    class EchoClient(flwr.client.NumPyClient):  # type: ignore[misc]
        def fit(self, parameters: list[Any], config: dict[str, Any]) -> Any:
            line = json.dumps({"round": int(config["round"]), "fitDone": time.time()})
            with out.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")
            return parameters, 1, {}

    flwr.client.start_client(
        server_address=f"127.0.0.1:{args.port}", client=EchoClient().to_client(), insecure=True
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="role", required=True)
    server = sub.add_parser("server")
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--rounds", type=int, required=True)
    server.add_argument("--clients", type=int, required=True)
    server.add_argument("--shapes", required=True, help="JSON list of array shapes")
    server.add_argument("--out", required=True)
    client = sub.add_parser("client")
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    return _server(args) if args.role == "server" else _client(args)


if __name__ == "__main__":
    raise SystemExit(main())
