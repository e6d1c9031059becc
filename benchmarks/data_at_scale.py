"""The loader at the recipe's scale: per-rank CPU cost per step, memory and start-up against
the size of the dataset and the number of data-parallel ranks.

    python benchmarks/data_at_scale.py [--samples 50000000] [--dp 1 64 256] [--steps 4]
                                       [--blend 10]
    python benchmarks/data_at_scale.py --quick        # seconds; what the test suite runs

Dataset: the three kinds at realistic lengths — captions of 5-40 words, interleaved documents
of 300-3,000 tokens with 1-10 images, text documents of 500-4,000 tokens — written as real
webdataset shards with a real sentencepiece tokenizer (a pool of distinct documents and a
small pool of real JPEGs), whose index is then extended to `--samples` samples in all (a
third per kind) that reference the pool (so the disk stays small while the index, which planning reads, has the
full size). Recipe rows: 4096 tokens, 144 per image, at most 16 images, global batch 512.

Per DP size, one rank (rank 0) runs the real `MultimodalLoader` without image decoding (on
GPUs nvJPEG decodes): CPU seconds per step spent planning the global rows from the index and
building its own rows (reading and tokenizing their documents), in this process, single
threaded (`time.process_time`). Each (samples, DP) point runs in a fresh process so peak RSS
and start-up are its own. The baseline is the planner's modelled step time of the fastest MM1
preset: the ratio is the share of a step the loader would take from one core.

A blend (`data.blend`) of `--blend` datasets per kind, each a folder holding the same
index (links, so the disk stays small), runs at the largest size and DP: one loader stream per
dataset, as a user with many caption and interleaved sets has. Its cost, memory and start-up
are reported beside the one-dataset-per-kind point at the same size and DP.

The last line printed is one JSON object (DESIGN.md conventions).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KINDS = ("interleaved", "caption", "text")
WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "re", "vo", "pi", "zu")
         for b in ("n", "ra", "to", "mel", "sik", "d", "ppo", "lin", "er", "ga")]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _jpegs(count: int) -> list[bytes]:
    import io

    from PIL import Image

    try:
        import skimage.data
        photos = [getattr(skimage.data, name)()[..., :3] for name in
                  ("astronaut", "coffee", "chelsea", "rocket")]
    except Exception:  # noqa: BLE001 - synthetic gradients without scikit-image
        photos = [np.tile(np.linspace(0, 255, 256, dtype=np.uint8)[None, :, None], (192, 1, 3))]
    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(photos[i % len(photos)]).resize((320, 240)).save(buf, "JPEG",
                                                                        quality=85)
        out.append(buf.getvalue())
    return out


def build_pool(root: Path, pool: int, seed: int = 0) -> None:
    """Real shards: `pool` distinct documents per kind and their token index."""
    from mm1_megatron.data.shard_writer import RawSample, write_dataset
    from mm1_megatron.data.tokenizer import Tokenizer, train_tokenizer

    rng = random.Random(seed)
    images = _jpegs(8)
    corpus = [_text(rng, 200) for _ in range(200)]
    tokenizer = Tokenizer.load(train_tokenizer(corpus, 512, root / "tokenizer.model",
                                               model_type="bpe", exact_vocab=False))
    # ~1.5 tokens per word with this vocabulary (measured below, per document).
    docs = {"caption": [RawSample([0, _text(rng, rng.randint(5, 40))],
                                  [("jpg", rng.choice(images))]) for _ in range(pool)],
            "text": [RawSample([_text(rng, rng.randint(330, 2700))]) for _ in range(pool)]}
    interleaved = []
    for _ in range(pool):
        n_images = rng.randint(1, 10)
        words = rng.randint(200, 2000)
        cuts = sorted(rng.sample(range(1, words), n_images))
        segments, start = [], 0
        for j, cut in enumerate(cuts):
            segments += [_text(rng, cut - start), j]
            start = cut
        segments.append(_text(rng, words - start))
        interleaved.append(RawSample(segments, [("jpg", rng.choice(images))
                                                for _ in range(n_images)]))
    docs["interleaved"] = interleaved
    for kind in KINDS:
        write_dataset(docs[kind], root / kind, kind, shard_size_mb=4, tokenizer=tokenizer)


def extend_index(root: Path, samples: int) -> None:
    """Each kind's index extended to `samples` rows referencing the pool, shard by shard (the
    index stays in shard order), written in chunks: nothing of that size is held in RAM."""
    from numpy.lib.format import open_memmap

    for kind in KINDS:
        folder = root / kind
        manifest = json.loads((folder / "manifest.json").read_text())
        index = folder / "index"
        pool = np.load(index / "samples.npy")
        seg = np.load(index / "segments.npy")
        off = np.load(index / "segment_offsets.npy")
        per_shard = np.bincount(pool["shard"], minlength=len(manifest["shards"]))
        counts = np.floor(per_shard / per_shard.sum() * samples).astype(np.int64)
        counts[-1] += samples - counts.sum()
        lengths = np.diff(off)
        rows = open_memmap(index / "samples.new.npy", "w+", pool.dtype, (samples,))
        offsets = open_memmap(index / "segment_offsets.new.npy", "w+", np.int64, (samples + 1,))
        # Segments per pool row repeat; their total is known before writing them.
        pool_start = np.concatenate([[0], np.cumsum(per_shard)])
        total_segments = 0
        picks = []
        for shard, count in enumerate(counts):
            members = np.arange(pool_start[shard], pool_start[shard + 1])
            picks.append((members, int(count)))
            reps, rest = divmod(int(count), len(members))
            total_segments += reps * int(lengths[members].sum()) + int(lengths[members[:rest]].sum())
        segments = open_memmap(index / "segments.new.npy", "w+", np.int32, (total_segments,))
        at, seg_at, chunk = 0, 0, 1 << 20
        offsets[0] = 0
        for members, count in picks:
            done = 0
            while done < count:
                n = min(chunk, count - done)
                which = members[(done + np.arange(n)) % len(members)]
                rows[at:at + n] = pool[which]
                lens = lengths[which]
                ends = seg_at + np.cumsum(lens)
                offsets[at + 1:at + n + 1] = ends
                starts = off[which]
                flat = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + \
                    np.arange(int(lens.sum()))
                segments[seg_at:seg_at + int(lens.sum())] = seg[flat]
                seg_at += int(lens.sum())
                at += n
                done += n
        for array in (rows, offsets, segments):
            array.flush()
        del rows, offsets, segments
        for name in ("samples", "segment_offsets", "segments"):
            (index / f"{name}.new.npy").replace(index / f"{name}.npy")
        for entry, count in zip(manifest["shards"], counts.tolist()):
            entry["samples"] = count
        manifest["samples"] = samples
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def write_blend(root: Path, per_kind: int) -> Path:
    """A blend of `per_kind` datasets per kind, each a folder of links to the kind's files
    (its own manifest and index files to open), equal weights."""
    lines = []
    for kind in KINDS:
        lines.append(f"{kind}:")
        for n in range(per_kind):
            folder = root / "blend" / f"{kind}{n}"
            (folder / "index").mkdir(parents=True, exist_ok=True)
            for path in [*(root / kind).glob("*"), *(root / kind / "index").glob("*")]:
                if path.is_file():
                    link = folder / path.relative_to(root / kind)
                    link.unlink(missing_ok=True)
                    link.symlink_to(path)
            lines.append(f"  - {{path: {folder.name}, weight: 1}}")
    blend = root / "blend" / "blend.yaml"
    blend.write_text("\n".join(lines) + "\n")
    return blend


def measure(root: Path, dp: int, steps: int, unit: str, blend: str = "") -> dict:
    """One rank of `dp` for `steps` recipe steps (plus one warm-up); in a fresh process."""
    start = time.perf_counter()
    from mm1_megatron.config import load_config
    from mm1_megatron.data.loader import MultimodalLoader

    data = f"data.blend={blend}" if blend else f"data.path={root}"
    cfg = load_config("mm1-3b", [data, f"data.tokenizer_model={root}/tokenizer.model",
                                 f"data.mixture_unit={unit}", "train.micro_batch_size=1",
                                 f"parallel.world_size={dp}", "parallel.sequence_parallel=false",
                                 "parallel.tp_comm_overlap=false", "data.prefetch=0"],
                      this_machine=False)
    loader = MultimodalLoader(cfg, 0, dp, log=None, decode_images=False)
    rows_per_step = cfg.train.global_batch_size // dp
    plan_s = build_s = 0.0
    per_step: list[float] = []  # CPU seconds of each measured step (their spread)
    first = None
    for step in range(steps + 1):
        t0 = time.process_time()
        mine = [next(loader.rows)[0] for _ in range(rows_per_step)]
        t1 = time.process_time()
        for row in mine:
            loader.collate([row])
        t2 = time.process_time()
        if first is None:
            first = time.perf_counter() - start  # start-up: imports, index, first step
        elif step > 0:
            plan_s += t1 - t0
            build_s += t2 - t1
            per_step.append(t2 - t0)
    return {"dp": dp, "unit": unit, "plan_s_per_step": plan_s / steps,
            "cpu_s_values": per_step,
            "build_s_per_step": build_s / steps,
            "cpu_s_per_step": (plan_s + build_s) / steps, "startup_s": first,
            "peak_rss_mb": _peak_rss_mb(),
            "packing_efficiency": loader.packing.efficiency}


def _peak_rss_mb() -> float:
    """This process's peak RSS since exec (VmHWM); getrusage's ru_maxrss would also count
    the parent's pages the child held between fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def _child(root: Path, dp: int, steps: int, unit: str, blend: str = "") -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(root), "--dp", str(dp),
                          "--steps", str(steps), "--unit", unit, "--blend-file", blend],
                         capture_output=True, text=True, timeout=3600, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def fastest_modelled_step() -> tuple[str, float]:
    from mm1_megatron.config import get_preset
    from mm1_megatron.plan import make_plan

    steps = {}
    for name in ("mm1-3b", "mm1-7b", "mm1-30b", "mm1-3b-moe64", "mm1-7b-moe32"):
        steps[name] = make_plan(get_preset(name))["h100"]["time"]["step_s"]
    name = min(steps, key=steps.get)
    return name, steps[name]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[1_000_000, 50_000_000],
                        help="index sizes, all kinds together (the largest gets the DP sweep)")
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--pool", type=int, default=2000, help="distinct documents per kind")
    parser.add_argument("--quick", action="store_true", help="small sizes, for the test suite")
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--blend", type=int, default=10,
                        help="datasets per kind in the blend point (0: none)")
    parser.add_argument("--unit", default="sequences", help=argparse.SUPPRESS)
    parser.add_argument("--blend-file", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child), args.dp[0], args.steps, args.unit,
                                 args.blend_file)))
        return 0
    if args.quick:
        args.samples, args.dp, args.steps, args.pool = [60_000, 600_000], [1, 64], 1, 200
    from benchmarks.measure import load_average, machine

    load_before = load_average()
    preset, step_s = fastest_modelled_step()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        build_pool(root, args.pool)
        print(f"pool of {args.pool} documents per kind written in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        results = []
        for samples in sorted(args.samples):
            t = time.perf_counter()
            extend_index(root, samples // len(KINDS))
            print(f"index extended to {samples:,} samples in "
                  f"{time.perf_counter() - t:.1f} s", flush=True)
            sweep = args.dp if samples == max(args.samples) else [max(args.dp)]
            for dp in sweep:
                r = {"samples": samples, **_child(root, dp, args.steps, "sequences")}
                results.append(r)
                print(f"samples {samples:>12,}  dp {dp:>4}  plan {r['plan_s_per_step']:.3f} s  "
                      f"build {r['build_s_per_step']:.3f} s  total {r['cpu_s_per_step']:.3f} s"
                      f"/step  ({r['cpu_s_per_step'] / step_s:.1%} of {preset}'s modelled "
                      f"{step_s:.2f} s)  rss {r['peak_rss_mb']:.0f} MB  start-up "
                      f"{r['startup_s']:.1f} s  packing {r['packing_efficiency']:.1%}",
                      flush=True)
        largest = max(args.samples)
        documents = _child(root, max(args.dp), args.steps, "documents")
        print(f"mixture_unit=documents: packing {documents['packing_efficiency']:.1%}")
        blended = None
        if args.blend:
            blended = _child(root, max(args.dp), args.steps, "sequences",
                             str(write_blend(root, args.blend)))
            print(f"blend of {args.blend} datasets per kind: total "
                  f"{blended['cpu_s_per_step']:.3f} s/step  rss "
                  f"{blended['peak_rss_mb']:.0f} MB  start-up {blended['startup_s']:.1f} s",
                  flush=True)
    at = {r["dp"]: r for r in results if r["samples"] == largest}
    small = min(r["peak_rss_mb"] for r in results if r["samples"] == min(args.samples))
    big = max(args.dp)
    summary = {
        "benchmark": "data_at_scale", "samples": sorted(args.samples),
        "baseline": {"preset": preset, "modelled_step_s": step_s},
        "candidate": {str(dp): round(r["cpu_s_per_step"], 4) for dp, r in at.items()},
        "ratio": {str(dp): round(r["cpu_s_per_step"] / step_s, 4) for dp, r in at.items()},
        "rss_growth_mb": round(at[big]["peak_rss_mb"] - small, 1),
        "startup_s": round(at[big]["startup_s"], 2),
        "packing_efficiency": {"sequences": round(at[big]["packing_efficiency"], 4),
                               "documents": round(documents["packing_efficiency"], 4)},
        "blend": None if blended is None else {
            "datasets_per_kind": args.blend, "dp": big,
            "cpu_s_per_step": round(blended["cpu_s_per_step"], 4),
            "ratio_to_one_per_kind": round(blended["cpu_s_per_step"]
                                           / at[big]["cpu_s_per_step"], 3),
            "rss_growth_mb": round(blended["peak_rss_mb"] - at[big]["peak_rss_mb"], 1),
            "startup_s": round(blended["startup_s"], 2)},
        "points": results,
        "load_avg": {"start": load_before, "end": load_average()}, **machine(),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
