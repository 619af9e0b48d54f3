"""``fedtray-server pack MODEL --data DATA -o OUT.fedtask``: the command line of the packer.

Contract: :func:`main` returns the exit status and never raises for bad input. 0: the
package was written and checked; one line on stdout -- path, size, sha256, trainable
parameters (:meth:`server.pack.PackResult.summary`). 2: a usage error (bad or missing flag),
one ``fedtray-server pack: error: ...`` line on stderr. 1: packing was refused (a model
that cannot be exported, bad data, a package that fails its check), one
``fedtray-server pack: error: ...`` line on stderr and no file written. Torch is imported
only once the flags are valid.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, get_args

from client.protocol import Optimizer
from client.taskpkg.manifest import Loss, TensorDtype
from server.pack_data import PackError, parse_shape

PROG = "fedtray-server pack"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message}\n")
        raise SystemExit(2)


def _shape(text: str) -> list[int]:
    try:
        return parse_shape(text)
    except PackError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Pack a PyTorch model and its data into a task package (.fedtask) that "
        "installed devices train without installing code.",
        epilog="Example: fedtray-server pack docs/examples/digits_cnn.py:make_model "
        "--data digits.npz -o digits_cnn.fedtask",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="path/to/file.py:factory or package.module:factory (returns an nn.Module)",
    )
    p.add_argument(
        "--data", type=Path, help=".npz or .safetensors with x_train, y_train, x_test, y_test"
    )
    p.add_argument("-o", "--out", type=Path, required=True, help="the package to write")
    p.add_argument("--loss", choices=get_args(Loss), default="cross_entropy")
    p.add_argument("--name", help="task name (default: from the output file name)")
    p.add_argument("--version", default="1", help="package version (default: %(default)s)")
    p.add_argument("--description", default="", help="one line shown to volunteers")
    p.add_argument(
        "--local-data",
        action="store_true",
        help="put no data in the package: each device reads its own",
    )
    p.add_argument(
        "--input-shape", type=_shape, help="one sample's input shape, e.g. 1,8,8 (--local-data)"
    )
    p.add_argument("--input-dtype", choices=get_args(TensorDtype), default="float32")
    p.add_argument(
        "--label-shape", type=_shape, help="one sample's label shape (default: a scalar)"
    )
    p.add_argument("--label-dtype", choices=get_args(TensorDtype), default=None)
    p.add_argument("--num-classes", type=int, default=None, help="classes (cross_entropy)")
    p.add_argument("--epochs", type=int, default=3, help="default local epochs per round")
    p.add_argument("--batch-size", type=int, default=32, help="default local batch size")
    p.add_argument("--learning-rate", "--lr", type=float, default=0.05)
    p.add_argument("--optimizer", choices=get_args(Optimizer), default="sgd")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedtray-server pack``; the exit status (see the module contract)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.data is None and not args.local_data:
        sys.stderr.write(f"{PROG}: error: give --data DATA, or --local-data\n")
        return 2
    if args.data is None and args.input_shape is None:
        sys.stderr.write(f"{PROG}: error: --local-data without --data needs --input-shape\n")
        return 2
    if args.num_classes is not None and args.num_classes < 1:
        sys.stderr.write(f"{PROG}: error: --num-classes must be at least 1\n")
        return 2
    from server.pack import pack
    from server.pack_export import quiet_torch_logs

    quiet_torch_logs()

    try:
        result = pack(
            args.model,
            args.data,
            args.out,
            loss=args.loss,
            name=args.name,
            version=args.version,
            description=args.description,
            local_data=args.local_data,
            input_shape=args.input_shape,
            input_dtype=args.input_dtype,
            label_shape=args.label_shape,
            label_dtype=args.label_dtype,
            num_classes=args.num_classes,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            optimizer=args.optimizer,
            momentum=args.momentum,
            seed=args.seed,
        )
    except PackError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"{PROG}: error: cannot write {args.out}: {exc.strerror or exc}\n")
        return 1
    print(result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
