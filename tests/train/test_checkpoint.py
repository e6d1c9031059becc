"""Checkpoints: resume exactly in the same layout and reshard into others; atomic `latest`."""

import json
from pathlib import Path

import pytest

from mm1_megatron.checkpoint.directory import latest_checkpoint, prune, write_latest
from mm1_megatron.runtime.faults import SLOW_SAVE
from tests._procs import torchrun

pytestmark = [pytest.mark.mcore, pytest.mark.multirank]

WORKER = Path(__file__).with_name("_ckpt_worker.py")
# Saved with the GPU presets' overlaps: with overlap_param_gather the other DP rank's updated
# shard arrives only in the next forward, so the save must gather first; the bitwise
# same-layout resume below fails if the checkpoint holds any weight of the previous step.
OVERLAP = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ckpt")
    torchrun(WORKER, 2, "save", str(root / "save.json"), str(root / "run"), "parallel.dp=2",
             *OVERLAP)
    return root / "run", json.loads((root / "save.json").read_text())


@pytest.mark.parametrize("nproc, layout, same", [
    (2, ["parallel.dp=2", *OVERLAP], True),
    (1, [], False),
    (2, ["parallel.tp=2", "parallel.sequence_parallel=true"], False),
    (2, ["parallel.pp=2"], False),
    # EP=2 chains a separate expert optimizer (one optimizer at EP=1): re-dealt on load.
    (2, ["parallel.ep=2"], False),
])
@pytest.mark.slow
def test_resume_matches_uninterrupted_step(saved, tmp_path, nproc, layout, same):
    run_dir, reference = saved
    out = tmp_path / "resume.json"
    torchrun(WORKER, nproc, "resume", str(out), str(run_dir), *layout, "train.seed=999")
    got = json.loads(out.read_text())
    assert got["step"] == 2 and got["extra"] == {"loader": {"rows": 8}}
    assert got["rng_restored"] == same
    assert got["lr"] == reference["lr"]  # the LR schedule resumed too
    assert got["schedule_changes"] == []
    for key in ("loss", "grad_norm", "next_loss", "next_grad_norm"):
        if same:
            assert got[key] == reference[key]  # bitwise
        else:
            assert abs(got[key] - reference[key]) <= 1e-5 * abs(reference[key]), key


def bytes_per_rank(checkpoint: Path) -> list[int]:
    """What each rank wrote: torch_dist names its files __RANK_N.distcp."""
    sizes = [0, 0]
    for f in checkpoint.glob("__*_*.distcp"):
        sizes[int(f.name.split("_")[2])] += f.stat().st_size
    return sizes


@pytest.mark.slow
def test_an_async_save_resumes_bitwise_like_a_synchronous_one_and_reshards(saved, tmp_path):
    """Written in the background while two more steps train (held by the slow-write fault):
    `latest` appears only once it is complete, and it holds step 2, not what trained after.
    Saved without `fully_parallel_save` (the fixture's save has it): the first DP replica
    writes the replicated weights, the other only its optimizer shard; the same checkpoint."""
    saved_dir, reference = saved
    run_dir = tmp_path / "run"
    out = tmp_path / "async.json"
    torchrun(WORKER, 2, "save-async", str(out), str(run_dir), "parallel.dp=2", *OVERLAP,
             "checkpoint.fully_parallel_save=false", env={SLOW_SAVE: "2"})
    dealt, first_replica = (bytes_per_rank(latest_checkpoint(d)) for d in (saved_dir, run_dir))
    assert sum(dealt) == pytest.approx(sum(first_replica), rel=0.02)
    assert max(dealt) / min(dealt) < 1.25 < first_replica[0] / first_replica[1], \
        (dealt, first_replica)
    written = json.loads(out.read_text())
    assert written["in_flight_after_start"] and written["finished_step"] == 2
    assert written["latest_while_writing"] == "None"
    assert written["machinery"].startswith(("megatron-core", "nvidia-resiliency-ext"))
    # Forked per save, whichever queue class: nvidia-resiliency-ext's defaults to persistent.
    assert written["writer_per_save"]
    for key in ("loss", "grad_norm", "next_loss", "next_grad_norm"):
        assert written[key] == reference[key]  # training went on as without a save
    # Loaded as Megatron-Core's default reader does (each rank reads all), where the other
    # resume tests deal the reads over the DP group (`fully_parallel_load`, the default).
    for nproc, layout, bitwise in ((2, ["parallel.dp=2", *OVERLAP,
                                        "checkpoint.fully_parallel_load=false"], True),
                                   (1, [], False)):
        out = tmp_path / f"resume{nproc}.json"
        torchrun(WORKER, nproc, "resume", str(out), str(run_dir), *layout, "train.seed=999")
        got = json.loads(out.read_text())
        assert got["step"] == 2 and got["extra"] == {"loader": {"rows": 8}}
        for key in ("loss", "grad_norm", "next_loss", "next_grad_norm"):
            if bitwise:
                assert got[key] == reference[key], key
            else:
                assert abs(got[key] - reference[key]) <= 1e-5 * abs(reference[key]), key


@pytest.mark.slow
def test_a_changed_lr_on_resume_wins_over_the_checkpoints(saved, tmp_path):
    """`train.lr` changed between save and resume: the run continues on the new schedule
    (Megatron-Core 0.16 restored the checkpoint's peak LR silently; 0.19 found no matching
    param group) and says so."""
    run_dir, reference = saved
    out = tmp_path / "resume.json"
    torchrun(WORKER, 1, "resume", str(out), str(run_dir), "train.lr=1e-3")
    got = json.loads(out.read_text())
    assert got["step"] == 2
    # Same schedule shape (no warm-up, cosine to a ratio of the peak), a third of the peak.
    assert got["lr"] == pytest.approx(reference["lr"] / 3, rel=1e-9)
    assert got["schedule_changes"] == ["max_lr 0.003 -> 0.001", "min_lr 0.0003 -> 0.0001"]


@pytest.mark.slow
def test_expert_parallel_checkpoint_loads_without_expert_parallelism(tmp_path):
    """The other direction: saved at EP=2 (a chained expert optimizer), resumed at EP=1."""
    run_dir = tmp_path / "run"
    torchrun(WORKER, 2, "save", str(tmp_path / "save.json"), str(run_dir), "parallel.ep=2")
    reference = json.loads((tmp_path / "save.json").read_text())
    torchrun(WORKER, 1, "resume", str(tmp_path / "resume.json"), str(run_dir),
             "train.seed=999")
    got = json.loads((tmp_path / "resume.json").read_text())
    for key in ("loss", "grad_norm", "next_loss", "next_grad_norm"):
        assert abs(got[key] - reference[key]) <= 1e-5 * abs(reference[key]), key
    # And back into EP=2 itself: the chained optimizer's own entries, bitwise.
    torchrun(WORKER, 2, "resume", str(tmp_path / "same.json"), str(run_dir), "parallel.ep=2",
             "train.seed=999")
    same = json.loads((tmp_path / "same.json").read_text())
    assert same["rng_restored"]
    assert all(same[k] == reference[k] for k in ("loss", "grad_norm", "next_loss",
                                                  "next_grad_norm"))


@pytest.mark.slow
def test_init_from_loads_weights_only_into_another_layout(saved, tmp_path):
    run_dir, reference = saved
    out = tmp_path / "init.json"
    torchrun(WORKER, 2, "init", str(out), str(run_dir), "parallel.tp=2",
             "parallel.sequence_parallel=true", "train.seed=999")
    got = json.loads(out.read_text())
    # The same weights: the first step's loss matches; the optimizer starts fresh, so the
    # update (and the next loss) differs from the resumed run's.
    assert abs(got["loss"] - reference["loss"]) <= 1e-5 * reference["loss"]
    assert abs(got["next_loss"] - reference["next_loss"]) > 1e-4 * reference["next_loss"]


@pytest.mark.slow
def test_crash_during_save_keeps_the_previous_checkpoint(saved, tmp_path):
    reference = saved[1]
    run_dir = tmp_path / "run"
    crashed = torchrun(WORKER, 2, "crash", str(tmp_path / "unused.json"), str(run_dir),
                       "parallel.dp=2", check=False)
    assert crashed.returncode != 0
    assert "the save of step 3 finished" not in crashed.stderr  # it died mid-save
    root = run_dir / "checkpoints"
    assert any((root / "step_00000003.partial").rglob("*"))  # the half-written one
    assert not (root / "step_00000003").exists()
    assert latest_checkpoint(run_dir) == root / "step_00000002"
    out = tmp_path / "resume.json"
    torchrun(WORKER, 2, "resume", str(out), str(run_dir), "parallel.dp=2", "train.seed=999")
    got = json.loads(out.read_text())
    assert got["step"] == 2 and got["loss"] == reference["loss"]  # loads, bitwise


def test_latest_is_replaced_atomically_and_old_ones_pruned(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / f"step_{step:08d}").mkdir(parents=True)
    (root / "step_00000004.partial").mkdir()  # a crash mid-save
    write_latest(root, "step_00000003")
    assert latest_checkpoint(tmp_path) == root / "step_00000003"
    prune(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002",
                                                      "step_00000003"]
    assert not (root / "latest.tmp").exists()


def test_no_checkpoint_and_dangling_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "latest").write_text("step_00000009\n")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        latest_checkpoint(tmp_path)
