"""lmms-eval's stock tasks, offline: save their datasets on a machine with network, then run
them anywhere from that copy through a task pack (`--include_path`).

    mm1-lmms-tasks save --tasks sft-suite --out /data/lmms        # where the Hub is reachable
    mm1-lmms-tasks pack --data /data/lmms --out /data/lmms/pack  # where lmms-eval runs
    HF_HUB_OFFLINE=1 lmms-eval --model mm1 --model_args pretrained=EXPORT \\
        --include_path /data/lmms/pack --tasks pope_local,seedbench_local --output_path out/

`save` reads each stock task's YAML from the installed lmms-eval (dataset_path, dataset_name,
its splits) and writes the splits with `datasets`' `save_to_disk`, one folder per dataset, and
`index.json` ({task: folder}). `pack` writes, per task, a YAML that includes the stock one
(so its prompts, parsing and metrics are lmms-eval's own, whatever the release) and replaces
only where the data comes from: `dataset_path` (the saved folder) and `dataset_kwargs:
{load_from_disk: true}`. Packed tasks are named `<task>_local` (stock names stay the stock,
online tasks); a stock group becomes `<group>_local` over its tasks' `_local` copies.

`sft-suite` is the benchmarks SFT-stage VLMs are compared on (MM1's Table 4 and its
successors): MMMU, MathVista, MME, MMBench, SEED-Bench, POPE, ScienceQA-IMG, TextVQA, VQAv2,
LLaVA-Bench (in the wild) and MM-Vet; which of them need an LLM judge is in
docs/evaluation.md.

Imports lmms_eval and datasets only when run (an optional install; see docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

SFT_SUITE = ("mmmu_val", "mathvista_testmini", "mme", "mmbench_en_dev", "seedbench", "pope",
             "scienceqa_img", "textvqa_val", "vqav2_val", "llava_in_the_wild", "mmvet")
SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")
INDEX = "index.json"
SUFFIX = "_local"


class TaskError(ValueError):
    """One line for the user (exit 2)."""


def stock_tasks() -> tuple[dict[str, Path], dict[str, list[str]]]:
    """The installed lmms-eval's tasks ({name: yaml}) and groups ({name: [task, ...]})."""
    import lmms_eval.tasks
    from lmms_eval.utils import load_yaml_config

    tasks: dict[str, Path] = {}
    groups: dict[str, list[str]] = {}
    for path in sorted(Path(lmms_eval.tasks.__file__).parent.rglob("*.yaml")):
        try:
            config = load_yaml_config(str(path), mode="simple")
        except Exception:  # noqa: BLE001 - a stock YAML this release cannot parse: not offered
            continue
        task, group = config.get("task"), config.get("group")
        if isinstance(task, str):
            tasks.setdefault(task, path)
        elif isinstance(group, str) and isinstance(task, list) and \
                all(isinstance(t, str) for t in task):
            groups.setdefault(group, list(task))
    return tasks, groups


def _expand(names: list[str], tasks: dict, groups: dict) -> tuple[list[str], dict]:
    """Requested names -> the leaf tasks, and the groups among them."""
    leaves, used = [], {}
    for name in names:
        if name in groups:
            used[name] = groups[name]
            leaves += [t for t in groups[name] if t not in leaves]
        elif name in tasks:
            leaves += [name] if name not in leaves else []
        else:
            raise TaskError(f"--tasks {name}: no such task or group in the installed lmms-eval")
    missing = [t for t in leaves if t not in tasks]
    if missing:
        raise TaskError(f"lmms-eval's group names tasks it does not define: {missing}")
    return leaves, used


def _names(spec: str) -> list[str]:
    return [n for part in spec.split(",") for n in
            (SFT_SUITE if part.strip() == "sft-suite" else [part.strip()]) if n]


def dataset_of(yaml_path: Path) -> tuple[str, Optional[str], list[str], dict]:
    """(dataset_path, dataset_name, splits, dataset_kwargs) of a stock task."""
    from lmms_eval.utils import load_yaml_config

    config = load_yaml_config(str(yaml_path), mode="simple")
    splits = sorted({config[k] for k in SPLIT_KEYS if config.get(k)})
    return config["dataset_path"], config.get("dataset_name"), splits, \
        dict(config.get("dataset_kwargs") or {})


def save(spec: str, out: Path, dry_run: bool = False) -> dict[str, str]:
    """Each task's splits saved under OUT (one folder per dataset); returns the index. With
    `dry_run`, only prints what would be downloaded (no network)."""
    tasks, groups = stock_tasks()
    leaves, _ = _expand(_names(spec), tasks, groups)
    plan = {}
    for task in leaves:
        path, name, splits, kwargs = dataset_of(tasks[task])
        plan[task] = {"dataset_path": path, "dataset_name": name, "splits": splits,
                      "folder": "__".join(p for p in (path.replace("/", "__"), name) if p),
                      # what of the stock dataset_kwargs load_dataset takes (not `token`)
                      "load_kwargs": {k: v for k, v in kwargs.items()
                                      if k in ("revision", "data_files")}}
    if dry_run:
        print(json.dumps(plan))
        return {task: p["folder"] for task, p in plan.items()}
    import datasets

    index = json.loads((out / INDEX).read_text()) if (out / INDEX).exists() else {}
    out.mkdir(parents=True, exist_ok=True)
    for task, p in plan.items():
        folder = p["folder"]
        if not (out / folder / "dataset_dict.json").exists():
            loaded = datasets.DatasetDict({
                s: datasets.load_dataset(p["dataset_path"], p["dataset_name"], split=s,
                                         **p["load_kwargs"]) for s in p["splits"]})
            loaded.save_to_disk(str(out / folder))
        index[task] = folder
        print(f"{task}: {out / folder} ({', '.join(p['splits'])})", file=sys.stderr)
    (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def pack(data: Path, out: Path, spec: Optional[str] = None) -> list[str]:
    """Task YAMLs under OUT for the tasks saved in DATA (or those of `spec`); returns the
    packed task and group names."""
    import yaml

    if not (data / INDEX).is_file():
        raise TaskError(f"--data {data}: no {INDEX} (write it with `mm1-lmms-tasks save`)")
    index = json.loads((data / INDEX).read_text())
    tasks, groups = stock_tasks()
    names = _names(spec) if spec else sorted(index)
    leaves, used = _expand(names, tasks, {g: t for g, t in groups.items() if g in names})
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in leaves:
        if task not in index:
            raise TaskError(f"--data {data}: {task} was not saved there (its {INDEX} lists "
                            f"{', '.join(sorted(index)) or 'nothing'})")
        folder = (data / index[task]).resolve()
        if not (folder / "dataset_dict.json").is_file():
            raise TaskError(f"{folder}: not a dataset saved with save_to_disk "
                            "(no dataset_dict.json)")
        body = {"include": str(tasks[task]), "task": task + SUFFIX, "dataset_path": str(folder),
                "dataset_kwargs": {"load_from_disk": True}}
        (out / f"{task}{SUFFIX}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
        written.append(task + SUFFIX)
    for group, members in used.items():
        body = {"group": group + SUFFIX, "task": [t + SUFFIX for t in members]}
        (out / f"{group}{SUFFIX}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
        written.append(group + SUFFIX)
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm1-lmms-tasks", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save", help="save stock tasks' datasets (needs the Hub)")
    s.add_argument("--tasks", required=True, help="comma-separated tasks/groups, or sft-suite")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--dry-run", action="store_true",
                   help="print each task's dataset and splits; download nothing")
    k = sub.add_parser("pack", help="write task YAMLs reading the saved datasets")
    k.add_argument("--data", required=True, type=Path)
    k.add_argument("--out", required=True, type=Path)
    k.add_argument("--tasks", help="a subset (default: every saved task)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "save":
            save(args.tasks, args.out, args.dry_run)
        else:
            names = pack(args.data, args.out, args.tasks)
            print(json.dumps({"include_path": str(args.out.resolve()), "tasks": names}))
    except (TaskError, ImportError) as e:
        print(f"mm1-lmms-tasks: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
