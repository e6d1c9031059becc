"""Plan a preset on H100 nodes: `python tools/plan.py --preset mm1-30b [--nodes 32] --json`.

  --check   exit 1 (one line on stderr naming the worst stage) when the layout does not fit
  --search  try every valid layout (tp, pp, ep, micro-batch, recompute) on --nodes, print the
            fastest that fits (--json: the top few)
  --eval    the evaluation layouts of mm1-eval on one node (TP x EP x copies), memory per GPU
            and the modelled cost per 1,000 few-shot queries

Without --nodes (and no WORLD_SIZE / parallel.world_size) an MM1 preset is planned at its
`parallel.planned_nodes`. Validation is the project's own, for the target cluster: FP8 counts as
available (the plan is for H100s with Transformer Engine, not for this machine).
Memory and time figures are modelled (mm1_megatron/plan/h100.py), not measured.
"""

from __future__ import annotations

import argparse
import json
import sys

from mm1_megatron.config import (PRESETS, Config, ConfigError, get_preset, parse_override,
                                 set_field, validate)
from mm1_megatron.plan import USABLE_GIB, format_plan, make_plan, search


def _config(preset: str, overrides: list[str], check: bool) -> Config:
    cfg = get_preset(preset)
    for text in overrides:
        set_field(cfg, *parse_override(text))
    if check:
        validate(cfg, fp8_ok=True)
    return cfg


def _search_line(rank: int, best: dict) -> str:
    t, m = best["time"], best["memory"]
    return (f"#{rank} {' '.join(best['overrides'])}  worst {m['worst_gib']:.1f} GiB  "
            f"step {t['step_s']:.3f} s  MFU {t['mfu']:.1%}")


def _print_eval(cfg: Config, args: argparse.Namespace) -> int:
    from mm1_megatron.plan.evaluation import EvalWorkload, copies_label, eval_layouts

    work = EvalWorkload(shots=args.shots, batch=args.batch_size, new_tokens=args.new_tokens)
    layouts = eval_layouts(cfg, args.gpus_per_node, work)
    if args.json:
        print(json.dumps({"preset": args.preset, "layouts": layouts}, indent=2))
        return 0
    print(f"{args.preset}: mm1-eval on {args.gpus_per_node} H100s, {work.shots}-shot prompts "
          f"of {work.prompt_tokens(cfg)} tokens, batch {work.batch}, {work.new_tokens} new "
          "tokens (modelled: mm1_megatron/plan/evaluation.py); fastest first")
    for e in layouts:
        lay, mem, t = e["layout"], e["memory_gib"], e["time_s"]
        print(f"  --tp {lay['tp']} --ep {lay['ep']} ({copies_label(lay['copies'])})  "
              f"{mem['total']:5.1f} GiB/GPU {'fits' if e['fits'] else 'DOES NOT FIT':12s} "
              f"prefill {t['prefill_per_batch']:.3f} s  decode {t['decode_per_token'] * 1e3:.1f} "
              f"ms/token  {t['per_1000_queries']:.0f} s and "
              f"{e['gpu_hours_per_1000_queries']:.3f} GPU-h per 1,000 queries")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=list(PRESETS))
    parser.add_argument("--nodes", type=int, help="plan for this many nodes")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when the worst pipeline stage does not fit in memory")
    parser.add_argument("--search", action="store_true",
                        help="enumerate layouts on --nodes and print the fastest that fits")
    parser.add_argument("--max-gib", type=float, default=USABLE_GIB,
                        help="--search: keep layouts whose worst stage is below this "
                             f"(default the usable {USABLE_GIB:.1f} GiB)")
    parser.add_argument("--top", type=int, default=5, help="--search --json: how many")
    parser.add_argument("--eval", action="store_true",
                        help="mm1-eval on one node of --gpus-per-node: every TP x EP layout, "
                             "its memory and modelled cost per 1,000 queries, fastest first")
    parser.add_argument("--shots", type=int, default=8, help="--eval: in-context examples")
    parser.add_argument("--batch-size", type=int, default=8, help="--eval: prompts per batch")
    parser.add_argument("--new-tokens", type=int, default=10, help="--eval: tokens per answer")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    nodes = args.nodes
    if nodes is None and args.search:
        nodes = get_preset(args.preset).parallel.planned_nodes
    if nodes is not None:
        overrides += [f"parallel.world_size={nodes * args.gpus_per_node}",
                      f"parallel.gpus_per_node={args.gpus_per_node}"]
    try:
        cfg = _config(args.preset, overrides, check=not args.search)
    except ConfigError as err:
        print(f"plan: config error: {err}", file=sys.stderr)
        return 2

    if args.eval:
        return _print_eval(cfg, args)
    if args.search:
        if nodes is None:
            print("plan: --search needs --nodes", file=sys.stderr)
            return 2
        found = search(cfg, nodes * args.gpus_per_node, args.gpus_per_node, args.top,
                       args.max_gib)
        if not found["best"]:
            print(f"plan: no valid layout of {args.preset} fits on {nodes} nodes "
                  f"({found['valid']} valid of {found['evaluated']} tried)", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps({"preset": args.preset, "nodes": nodes, **found}, indent=2))
        else:
            print(f"{args.preset} on {nodes} nodes: {found['fit']} of {found['valid']} valid "
                  f"layouts fit ({found['evaluated']} tried); fastest first:")
            for rank, best in enumerate(found["best"], 1):
                print(_search_line(rank, best))
            print()
            best_cfg = _config(args.preset, overrides + found["best"][0]["overrides"], True)
            print(format_plan(make_plan(best_cfg)))
        return 0

    plan = make_plan(cfg)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    mem = plan["h100"]["memory"]
    if args.check and not mem["fits"]:
        print(f"plan: {args.preset} does not fit: stage {mem['worst_stage']} needs "
              f"{mem['worst_gib']:.1f} GiB > {mem['usable_gib']:.1f} GiB usable per H100 "
              f"({mem['headroom']})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
