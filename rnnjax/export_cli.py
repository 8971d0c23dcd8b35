"""The ``export`` subcommand of ``python -m rnnjax``: write a trained run's model as StableHLO or ONNX.

.. code-block:: text

    python -m rnnjax train --task charlm --cell lstm --steps 300 --ckpt-dir runs/charlm
    python -m rnnjax export --run-dir runs/charlm --format stablehlo --what step --out lstm_step.stablehlo
    python -m rnnjax export --run-dir runs/charlm --format onnx --what sequence --out lstm_seq.onnx

The run's newest valid checkpoint is restored with its model (:func:`rnnjax.train.restore_run`) and exported by
:func:`rnnjax.export.export_stablehlo` (the bytes of ``jax.export.Exported.serialize()``) or
:func:`rnnjax.export.export_onnx` (needs ``jax2onnx``); both need ``flatbuffers``. Batch and time are symbolic
unless ``--batch-size`` / ``--time`` fix them. A summary goes to standard error. Exit status: 0 on success, 2
for bad arguments or a model or run that cannot be exported.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Defines the ``export`` subcommand's arguments."""
    parser.add_argument("--run-dir", required=True, help="checkpoint directory of a `python -m rnnjax train` run")
    parser.add_argument("--step", type=int, default=None, help="restore this checkpoint step (default: newest)")
    parser.add_argument("--format", required=True, choices=("stablehlo", "onnx"), help="artifact format")
    parser.add_argument(
        "--what", default="step", choices=("step", "sequence"), help="streaming step or whole sequence (default step)"
    )
    parser.add_argument("--out", required=True, help="file to write")
    parser.add_argument("--batch-size", type=int, default=None, help="fix the batch size (default: symbolic)")
    parser.add_argument("--time", type=int, default=None, help="fix a sequence's padded length (default: symbolic)")
    parser.add_argument("--max-len", type=int, default=None, help="the transformer step's cache length (default 256)")
    parser.add_argument(
        "--sequence-path",
        choices=("model", "stepped"),
        default=None,
        help="a recurrent sequence as the model's own fused path or a masked scan of its step "
        "(default: model for stablehlo, stepped for onnx)",
    )


def main(args: argparse.Namespace) -> int:
    """Runs the ``export`` subcommand; returns the exit status."""
    from rnnjax import export
    from rnnjax.train.run import restore_run

    try:
        for name in ("batch_size", "time", "max_len"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        restored = restore_run(args.run_dir, step=args.step)
        model, params = restored.model, restored.state.params
        options = dict(batch_size=args.batch_size, time=args.time, max_len=args.max_len)
        if args.sequence_path is not None:
            options["sequence_path"] = args.sequence_path
        if args.format == "stablehlo":
            data = export.export_stablehlo(model, params, args.what, **options)
            with open(args.out, "wb") as file:
                file.write(data)
        else:
            export.export_onnx(model, params, args.out, args.what, **options)
    except ImportError as error:
        hint = "StableHLO needs `pip install flatbuffers`, ONNX also jax2onnx, onnx, onnx-ir and onnxruntime"
        print(f"rnnjax export: error: {error} ({hint})", file=sys.stderr)
        return 2
    except (FileNotFoundError, TypeError, ValueError) as error:
        print(f"rnnjax export: error: {error}", file=sys.stderr)
        return 2
    print(
        f"rnnjax export: {restored.task.name} run in {args.run_dir}, step {restored.meta.get('step')}, model "
        f"{type(model).__name__}: {args.what} as {args.format}, {os.path.getsize(args.out)} bytes -> {args.out}",
        file=sys.stderr,
    )
    return 0
