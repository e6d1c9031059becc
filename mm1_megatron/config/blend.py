"""The datasets a run reads, per kind: `data.path`'s one folder per kind, or `data.blend`'s
list of weighted folders per kind (`data_sources`).

A blend is a YAML file with a list per kind, paths relative to the file::

    caption:
      - {path: datacomp-1b, weight: 0.7}
      - {path: cc12m, weight: 0.3}
    interleaved:
      - {path: obelics, weight: 1}
    text:
      - {path: dclm, weight: 1}

The kind weights stay `data.weight_*`; inside a kind the blend weights choose the dataset, in
the unit the kinds are mixed in (`data.mixture_unit`). Megatron-LM's `--data-path w1 p1 w2
p2` and Energon's metadataset blends say the same. Each dataset is one stream of the global
row plan: its own epochs, permutation and position in the loader state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mm1_megatron.config.schema import ConfigError, DataConfig
from mm1_megatron.config.yaml_file import read_yaml_file

# The dataset kinds in mixture order (mm1_megatron.data.mixture.SOURCES; config sits below
# data, so the names are repeated here), one data.weight_* each.
KINDS = ("interleaved", "caption", "text", "sft")


@dataclass(frozen=True)
class DataSource:
    """One dataset of the run: its kind, folder, and share of the whole mixture (the kind's
    weight times its share inside the kind)."""

    kind: str
    folder: Path
    weight: float
    name: str  # how checkpoints and logs name it: "caption" (data.path) or "caption[1]"


def read_blend(file: str | Path) -> dict[str, list[tuple[Path, float]]]:
    """kind -> [(folder, weight)]; refuses anything else in one line naming the entry."""
    path = Path(file)
    data = read_yaml_file(str(path))
    where = "data.blend"
    if not isinstance(data, dict) or not data:
        raise ConfigError(where, f"{path}: must map kinds ({', '.join(KINDS)}) to lists of "
                                 "{path, weight}")
    out: dict[str, list[tuple[Path, float]]] = {}
    for kind, entries in data.items():
        if kind not in KINDS:
            raise ConfigError(where, f"{path}: unknown kind {kind!r}; choose from "
                                     f"{', '.join(KINDS)}")
        if not isinstance(entries, list) or not entries:
            raise ConfigError(where, f"{path}: {kind}: a non-empty list of {{path, weight}}")
        out[kind] = []
        for n, entry in enumerate(entries):
            at = f"{path}: {kind}[{n}]"
            if not isinstance(entry, dict) or set(entry) - {"path", "weight"} \
                    or not isinstance(entry.get("path"), str):
                raise ConfigError(where, f"{at}: must be {{path: FOLDER, weight: NUMBER}}")
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                    or not weight > 0:
                raise ConfigError(where, f"{at}: weight must be a number > 0, got {weight!r}")
            folder = Path(entry["path"])
            out[kind].append((folder if folder.is_absolute() else path.parent / folder,
                              float(weight)))
    return out


def data_sources(d: DataConfig) -> list[DataSource]:
    """The run's datasets in the loader's stream order: kinds in mixture order, a blend's
    entries in file order. With data.path every kind is listed (a folder that does not exist
    is an empty stream), so a loader position has one entry per kind as it always had."""
    if d.blend:
        sources = []
        blend = read_blend(d.blend)
        for kind in KINDS:
            entries = blend.get(kind, [])
            total = sum(w for _, w in entries)
            for n, (folder, weight) in enumerate(entries):
                sources.append(DataSource(kind, folder,
                                          getattr(d, f"weight_{kind}") * weight / total,
                                          f"{kind}[{n}]"))
        return sources
    return [DataSource(kind, Path(d.path) / kind, getattr(d, f"weight_{kind}"), kind)
            for kind in KINDS]
