"""The ``generate`` subcommand of ``python -m rnnjax``: continue a text prompt with a trained character-level LM.

.. code-block:: text

    python -m rnnjax train --task charlm --cell lstm --steps 1500 --lr 1e-2 --ckpt-dir runs/charlm
    python -m rnnjax generate --run-dir runs/charlm --prompt "The " --max-new-tokens 200 \\
        --temperature 0.8 --top-p 0.95 --seed 0

The run's newest valid checkpoint is restored with its task and model (:func:`rnnjax.train.restore_run`); the
prompt is encoded with the task's alphabet (:meth:`rnnjax.tasks.charlm.CharLM.encode`), continued with
:func:`rnnjax.generate`, and each sample is printed as prompt plus continuation on standard output (what was
restored goes to standard error). Exit status: 0 on success, 2 for bad arguments or a run that cannot generate.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Defines the ``generate`` subcommand's arguments."""
    parser.add_argument("--run-dir", required=True, help="checkpoint directory of a `python -m rnnjax train` run")
    parser.add_argument("--step", type=int, default=None, help="restore this checkpoint step (default: newest)")
    parser.add_argument("--prompt", required=True, help="text to continue (at least one character)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="characters to generate (default 200)")
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy decoding (default 1)"
    )
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the K most likely characters")
    parser.add_argument("--top-p", type=float, default=None, help="sample only from the nucleus of mass P in (0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling (default 0)")
    parser.add_argument("--num-samples", type=int, default=1, help="independent continuations, one batch (default 1)")


def main(args: argparse.Namespace) -> int:
    """Runs the ``generate`` subcommand; returns the exit status."""
    from rnnjax.generation import check_language_model, check_sampling, generate
    from rnnjax.train.run import restore_run

    try:
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be at least 1, got {args.num_samples}")
        if not args.prompt:
            raise ValueError("--prompt is empty; give at least one character")
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be at least 0, got {args.max_new_tokens}")
        check_sampling(args.temperature, args.top_k, args.top_p)  # before the (slower) restore
        restored = restore_run(args.run_dir, step=args.step)
        task, model = restored.task, restored.model
        if not (hasattr(task, "encode") and hasattr(task, "decode")):
            raise ValueError(
                f"the run's task ({task.name}) has no text encoding; generate continues text with a "
                "character-level language model (--task charlm)"
            )
        check_language_model(model)
        prompt = np.repeat(task.encode(args.prompt)[None], args.num_samples, axis=0)  # (S, T)
        tokens = generate(
            model,
            restored.state.params,
            prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            key=args.seed,
        )  # (S, N)
    except (FileNotFoundError, TypeError, ValueError) as error:
        print(f"rnnjax generate: error: {error}", file=sys.stderr)
        return 2
    print(
        f"rnnjax generate: {task.name} run in {args.run_dir}, step {restored.meta.get('step')}, "
        f"model {type(model).__name__}",
        file=sys.stderr,
    )
    for index, row in enumerate(np.asarray(tokens)):
        if args.num_samples > 1:
            print(f"--- sample {index + 1} ---")
        print(args.prompt + task.decode(row))
    return 0
