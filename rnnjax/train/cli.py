"""The ``train`` subcommand of ``python -m rnnjax``.

.. code-block:: text

    python -m rnnjax train --task adding --cell lstm --steps 2000 --seed 0 \\
        --ckpt-dir runs/adding-lstm --save-every 200 [--resume]
    python -m rnnjax train ... --steps 2000 --extend-steps 1000 --resume   # a finished run, 1,000 steps more
    python -m rnnjax train --task adding --model transformer --hidden 64 --heads 4 --layers 2

Exit status: 0 when training completed, 3 when it stopped on a non-finite loss, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

import jax

from rnnjax import checkpoint
from rnnjax.cells import cell_names
from rnnjax.train import sharding
from rnnjax.train.loop import NonFiniteLossError, ResumeError
from rnnjax.train.optim import OptimizerConfig
from rnnjax.train.run import MODELS, RunConfig, run

EXIT_NONFINITE = 3
DEFAULT_CELL = "lstm"
DEFAULT_HEADS = 4


def _option(text: str) -> tuple[str, object]:
    """``key=value`` with ``value`` read as a Python literal when it is one (``seq_len=100``, ``flag=True``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Defines the ``train`` subcommand's arguments."""
    run = parser.add_argument_group("run")
    run.add_argument("--task", default="adding", help="task name (rnnjax.tasks.names()); default adding")
    run.add_argument(
        "--task-opt",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option, repeatable (e.g. --task-opt seq_len=100)",
    )
    run.add_argument(
        "--steps", type=int, default=1000, help="training steps of the first schedule (the cosine decays over them)"
    )
    run.add_argument(
        "--extend-steps",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="continue a finished run: N more steps under a new schedule segment after --steps (a fresh cosine from "
        "--extend-lr); repeatable, each segment after the previous one; use with --resume",
    )
    run.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the parameters and dropout, and the data order unless --data-seed is given "
        "(data seed = task seed + 1000 * seed)",
    )
    run.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="seed of the training batches (default: task seed + 1000 * --seed); evaluation splits are the task's",
    )
    run.add_argument("--batch-size", type=int, default=32, help="global batch size")
    run.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    run.add_argument("--tbptt", type=int, default=None, metavar="K", help="truncated BPTT window (per-step tasks)")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        choices=MODELS,
        default="rnn",
        help="rnn: a recurrent network of --cell cells; transformer: rnnjax.attention.Transformer with "
        "d_model --hidden, --heads heads and --layers blocks (default rnn)",
    )
    names = cell_names(aliases=True)
    model.add_argument(
        "--cell",
        choices=names,
        default=None,
        metavar="CELL",
        help=f"registered cell of --model rnn, one of: {', '.join(names)} (default {DEFAULT_CELL})",
    )
    model.add_argument("--hidden", type=int, default=64, help="hidden units per layer (the transformer's d_model)")
    model.add_argument("--layers", type=int, default=1, help="stacked layers (the transformer's blocks)")
    model.add_argument(
        "--heads",
        "--num-heads",
        dest="heads",
        type=int,
        default=None,
        help=f"attention heads of --model transformer; --hidden must be a multiple of 2 * heads "
        f"(default {DEFAULT_HEADS})",
    )
    model.add_argument("--bidirectional", action="store_true", help="bidirectional layers")
    model.add_argument("--dropout", type=float, default=0.0, help="dropout on the core's inputs and outputs")
    model.add_argument("--layer-dropout", type=float, default=0.0, help="dropout between stacked layers")
    model.add_argument(
        "--cell-opt",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="cell hyperparameter, repeatable (e.g. --cell-opt forget_bias=2.0)",
    )

    optim = parser.add_argument_group("optimiser")
    optim.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam")
    optim.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    optim.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    optim.add_argument("--no-decay", action="store_true", help="constant rate after warmup (default: cosine)")
    optim.add_argument("--final-lr-fraction", type=float, default=0.0, help="cosine end rate / peak rate")
    optim.add_argument("--clip-norm", type=float, default=1.0, help="global-norm clipping (<= 0 disables)")
    optim.add_argument("--clip-value", type=float, default=None, help="per-value clipping")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    optim.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    optim.add_argument(
        "--extend-lr", type=float, default=None, help="peak rate of each --extend-steps segment (default --lr)"
    )
    optim.add_argument("--extend-warmup", type=int, default=0, help="linear warmup of each --extend-steps segment")

    out = parser.add_argument_group("checkpoints and output")
    out.add_argument("--ckpt-dir", default=None, help="checkpoint directory")
    out.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps (and at the end)")
    out.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    out.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    out.add_argument(
        "--metrics", default=None, help="JSON-lines metrics file (default: metrics.jsonl in --ckpt-dir, if given)"
    )
    out.add_argument("--log-every", type=int, default=10, help="record training metrics every N steps")
    out.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: only on a terminal)",
    )
    out.add_argument(
        "--save-params",
        default=None,
        metavar="FILE.npz",
        help="write the final parameters as NumPy arrays named by their path in the parameter tree, e.g. "
        "core/w_ih, core/layers/0/w_hh, head/w (read back with rnnjax.checkpoint.load_npz)",
    )

    scale = parser.add_argument_group("devices")
    scale.add_argument("--data-parallel", action="store_true", help="shard batches over all devices")
    scale.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process job first (jax.distributed.initialize(), cluster auto-detected unless "
        "--coordinator, --num-processes and --process-id are given) and train data-parallel over the devices of "
        "all processes; see docs/scale.md",
    )
    scale.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="with --distributed: address of process 0's coordinator (default: auto-detected)",
    )
    scale.add_argument(
        "--num-processes", type=int, default=None, help="with --distributed: processes in the job (default: auto)"
    )
    scale.add_argument(
        "--process-id", type=int, default=None, help="with --distributed: this process's id, 0 to N-1 (default: auto)"
    )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`~rnnjax.train.RunConfig` described by parsed arguments.

    Raises:
        ValueError: options of one model family given to the other (e.g. ``--cell`` with ``--model
            transformer``), or an invalid value (see :class:`~rnnjax.train.RunConfig`).
    """
    _check_model_options(args)
    if (args.extend_lr is not None or args.extend_warmup) and not args.extend_steps:
        raise ValueError("--extend-lr and --extend-warmup need --extend-steps")
    optimizer = OptimizerConfig(
        name=args.optimizer,
        learning_rate=args.lr,
        warmup_steps=args.warmup,
        decay_steps=None if args.no_decay else max(args.steps - args.warmup, 1),
        final_lr_fraction=args.final_lr_fraction,
        clip_norm=args.clip_norm if args.clip_norm and args.clip_norm > 0 else None,
        clip_value=args.clip_value,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
    )
    start = args.steps
    for steps in args.extend_steps:  # each segment begins where the previous one ends
        optimizer = optimizer.extended(
            steps, learning_rate=args.extend_lr, warmup_steps=args.extend_warmup, start=start
        )
        start += steps
    return RunConfig(
        task=args.task,
        task_options=dict(args.task_opt),
        cell=args.cell or DEFAULT_CELL,
        hidden_size=args.hidden,
        num_layers=args.layers,
        bidirectional=args.bidirectional,
        dropout=args.dropout,
        layer_dropout=args.layer_dropout,
        cell_options=dict(args.cell_opt),
        batch_size=args.batch_size,
        steps=start,
        seed=args.seed,
        data_seed=args.data_seed,
        optimizer=optimizer,
        eval_every=args.eval_every,
        tbptt=args.tbptt,
        model=args.model,
        num_heads=args.heads or DEFAULT_HEADS,
    )


def _check_model_options(args: argparse.Namespace) -> None:
    if args.model == "transformer":
        given = [
            flag
            for flag, value in (
                ("--cell", args.cell),
                ("--bidirectional", args.bidirectional),
                ("--layer-dropout", args.layer_dropout),
                ("--cell-opt", args.cell_opt),
                ("--tbptt", args.tbptt),
            )
            if value
        ]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise ValueError(f"{', '.join(given)} {verb} to --model rnn only, not to --model transformer")
    elif args.heads is not None:
        raise ValueError("--heads applies to --model transformer only")


def main(args: argparse.Namespace) -> int:
    """Runs the ``train`` subcommand; returns the exit status."""
    explicit = (
        ("--coordinator", args.coordinator),
        ("--num-processes", args.num_processes),
        ("--process-id", args.process_id),
    )
    given = [flag for flag, value in explicit if value is not None]
    if given and not args.distributed:
        print(f"rnnjax train: error: {', '.join(given)} need --distributed", file=sys.stderr)
        return 2
    if args.distributed:
        sharding.initialize(args.coordinator, args.num_processes, args.process_id)
    is_main = sharding.is_main_process() if args.distributed else True
    try:
        if (args.save_every or args.resume) and args.ckpt_dir is None:
            raise ValueError("--save-every and --resume need --ckpt-dir")
        config = config_from_args(args)
        config.build_model()  # validates the task and model options before anything runs
    except (TypeError, ValueError) as error:
        print(f"rnnjax train: error: {error}", file=sys.stderr)
        return 2
    metrics = args.metrics
    if metrics is None and args.ckpt_dir is not None:
        metrics = os.path.join(args.ckpt_dir, "metrics.jsonl")
    try:
        result = run(
            config,
            ckpt_dir=args.ckpt_dir,
            save_every=args.save_every,
            keep=args.keep,
            resume=args.resume,
            metrics_path=metrics,
            progress=args.progress,
            log_every=args.log_every,
            data_parallel=args.data_parallel or args.distributed,
        )
    except NonFiniteLossError as error:
        print(f"rnnjax train: {error}", file=sys.stderr)
        return EXIT_NONFINITE
    except (FileExistsError, ResumeError) as error:
        print(f"rnnjax train: error: {error}", file=sys.stderr)
        return 2
    if not is_main:  # every process holds the same final state; files and the summary come from process 0
        return 0
    if result.start_step:
        print(f"rnnjax train: resumed from step {result.start_step} of {args.ckpt_dir}")
    state = result.state
    if args.distributed:
        devices = len(state.step.sharding.device_set)  # the mesh the state was trained on
        print(f"rnnjax train: trained data-parallel on {devices} devices of {jax.process_count()} processes")
    summary = {"step": int(state.step)}
    if result.evals:
        summary.update({k: v for k, v in result.evals[-1].items() if k not in ("step", "weight")})
    print(
        "rnnjax train: done "
        + " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
    )
    if args.save_params:
        checkpoint.save_npz(args.save_params, state.params)
    return 0
