"""`mm1-train`: the one entry point (console script, torchrun and srun via launch/train.py)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
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


# Fields of the model sections a run may change between restarts (how it computes, not what).
_NOT_MODEL_SHAPE = {"recompute", "recompute_layers", "dispatcher", "grouped_gemm",
                    "aux_loss_coeff", "z_loss_coeff"}


def _model_fields(sections: dict) -> dict[str, object]:
    out: dict[str, object] = {}

    def walk(value, prefix: str) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(sub, f"{prefix}.{key}")
        elif prefix.rsplit(".", 1)[-1] not in _NOT_MODEL_SHAPE:
            out[prefix] = value

    for section in ("vision", "connector", "llm"):
        walk(sections.get(section, {}), section)
    return out


def check_run_dir(cfg: Config) -> None:
    """Refuse, before any process group starts, a start that would lose work in run_dir:
    starting over on its checkpoints without checkpoint.overwrite, or resuming them with
    another model shape (which would fail in the load, after config.yaml was replaced)."""
    from mm1_megatron.checkpoint.directory import complete_checkpoints, resume_point
    from mm1_megatron.config import RUN_CONFIG
    from mm1_megatron.config.overrides import read_yaml_file

    if cfg.checkpoint.resume:
        try:
            resume_from, _ = resume_point(cfg.run_dir)  # all damaged or missing: say so now
        except FileNotFoundError as err:
            raise ConfigError("run_dir", str(err)) from None
        if resume_from is not None and not cfg.data.allow_change:
            _check_same_dataset(cfg, resume_from)
    existing = complete_checkpoints(cfg.run_dir)
    if not existing:
        return
    if not cfg.checkpoint.resume:
        if not cfg.checkpoint.overwrite:
            raise ConfigError("checkpoint.resume", f"false, but {cfg.run_dir} holds checkpoints "
                              f"(newest {existing[-1].name}) this run would overwrite; use a new "
                              "run_dir, or checkpoint.overwrite=true to delete them")
        return
    saved = Path(cfg.run_dir) / RUN_CONFIG
    if saved.is_file():
        before, now = _model_fields(read_yaml_file(saved) or {}), _model_fields(cfg.to_dict())
        changed = [f"{k} {before.get(k)!r} -> {now.get(k)!r}"
                   for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        if changed:
            raise ConfigError("run_dir", f"{cfg.run_dir} holds checkpoints of another model "
                              f"({'; '.join(changed)}); resume with the run's config, or use a "
                              "new run_dir (checkpoint.init_from starts from other weights)")


def _check_same_dataset(cfg: Config, checkpoint: Path) -> None:
    """The loader position in `checkpoint` refers to the dataset it was saved with."""
    from megatron.core import dist_checkpointing

    from mm1_megatron.data.loader import dataset_fingerprint

    saved = (dist_checkpointing.load_common_state_dict(str(checkpoint)) or {}).get(
        "extra", {}).get("dataset")
    now = dataset_fingerprint(cfg.data.path)
    if saved is not None and saved != now:
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ConfigError("data.path", f"{cfg.data.path} is not the data {checkpoint.name} was "
                          f"trained on ({', '.join(changed)} changed); its loader position "
                          "would be applied to other samples: set data.allow_change=true to "
                          "continue on this data anyway")


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
    try:
        # A dry run plans for the cluster: FP8 is checked against the machine only to train.
        cfg = load_config(args.preset, args.overrides, args.config,
                          this_machine=not args.dry_run)
        if not args.dry_run:
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
