"""`mm1-train`: the one entry point (console script, torchrun and srun via launch/train.py)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Optional, Sequence

import yaml

from mm1_megatron.config import PRESETS, Config, ConfigError, load_config
from mm1_megatron.plan import format_plan, make_plan


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mm1-train",
        description="Pre-train an MM1-style multimodal LLM on Megatron-Core.",
        epilog="Overrides are dotted config fields, e.g. parallel.tp=2 train.lr=3e-4 "
               "llm.moe.num_experts=8. Presets: " + ", ".join(PRESETS),
    )
    parser.add_argument("--preset", required=True, help="named run configuration")
    parser.add_argument("--config", help="YAML file of config sections applied before overrides")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve and validate the config, print layout and plan, exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return parser.parse_args(argv)


# Library warnings that repeat every step and say nothing actionable to a user of this CLI.
_QUIET = [
    (FutureWarning, r"`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)`"),
    (UserWarning, r"The .grad attribute of a Tensor that is not a leaf"),
    (UserWarning, r"(Transformer Engine and )?Apex (are|is) not installed"),
    (UserWarning, r"full scope is deprecated"),
]


def run_callbacks(cfg: Config) -> list:
    """The run's callbacks: the trainer's defaults, plus few-shot evaluation (captioning /
    VQA every eval.interval steps) when eval.tasks is set."""
    from mm1_megatron.train.callbacks import default_callbacks

    callbacks = default_callbacks(cfg)
    if cfg.eval.tasks:
        from mm1_megatron.evaluation.callback import FewShotEval

        callbacks.append(FewShotEval.from_config(cfg))
    return callbacks


def main(argv: Optional[Sequence[str]] = None) -> int:
    for category, message in _QUIET:
        warnings.filterwarnings("ignore", message=message, category=category)
    args = parse_args(argv)
    from mm1_megatron.runtime.mcore_version import environment_problem

    problem = environment_problem()  # before anything imports Megatron-Core's checkpointing
    if problem:
        print(f"mm1-train: environment error: {problem}", file=sys.stderr)
        return 2
    try:
        # A dry run plans for the cluster: FP8 is checked against the machine only to train.
        cfg = load_config(args.preset, args.overrides, args.config,
                          this_machine=not args.dry_run)
        if not args.dry_run:
            from mm1_megatron.checkpoint.preflight import check_run_dir

            check_run_dir(cfg)
    except ConfigError as err:
        print(f"mm1-train: config error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"mm1-train: config error: {args.config}: {err.strerror}", file=sys.stderr)
        return 2

    from mm1_megatron.runtime.backends import describe_backends

    if args.dry_run:
        print(yaml.safe_dump({"config": cfg.to_dict()}, sort_keys=False).rstrip())
        print()
        print(format_plan(make_plan(cfg)))
        print(describe_backends(cfg.train.precision, cfg.train.fp8))
        return 0
    from mm1_megatron.checkpoint.run_lock import RunDirLocked
    from mm1_megatron.train.loop import train

    try:
        return train(cfg, run_callbacks(cfg))
    except RunDirLocked as err:  # every rank stops; rank 0 says why
        if os.environ.get("RANK", "0") == "0":
            print(f"mm1-train: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
