"""Print the plan of a preset: `python tools/plan.py --preset mm1-30b [--nodes 32] --json`."""

from __future__ import annotations

import argparse
import json
import sys

from mm1_megatron.config import PRESETS, ConfigError, load_config
from mm1_megatron.plan import format_plan, make_plan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", required=True, choices=list(PRESETS))
    parser.add_argument("--nodes", type=int, help="plan for this many nodes")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.nodes is not None:
        overrides += [f"parallel.world_size={args.nodes * args.gpus_per_node}",
                      f"parallel.gpus_per_node={args.gpus_per_node}"]
    try:
        cfg = load_config(args.preset, overrides)
    except ConfigError as err:
        print(f"plan: config error: {err}", file=sys.stderr)
        return 2
    plan = make_plan(cfg)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
