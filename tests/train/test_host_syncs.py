"""Host synchronisations per training step from our own code: at most 8, whatever the number
of parameters or micro-batches (each one drains a GPU's launch queue)."""

import pytest

from tests._procs import run_ranks

pytestmark = [pytest.mark.mcore, pytest.mark.slow]

BUDGET = 8


def count_syncs(data: str, run_dir: str, global_batch: int) -> dict:
    from mm1_megatron.config import load_config
    from mm1_megatron.runtime import shutdown_distributed
    from mm1_megatron.runtime.host_syncs import HostSyncCounter
    from mm1_megatron.train.callbacks import Callback, default_callbacks
    from mm1_megatron.train.loop import Trainer

    cfg = load_config("demo", [f"data.path={data}", f"data.tokenizer_model={data}/tokenizer.model",
                               f"run_dir={run_dir}", "train.train_steps=3", "train.warmup_steps=1",
                               f"train.global_batch_size={global_batch}",
                               "checkpoint.save_interval=1000", "logging.log_interval=1"])
    counter = HostSyncCounter()
    per_step: list[dict] = []

    class PerStep(Callback):
        def on_step(self, trainer, m) -> None:
            per_step.append(dict(counter.sites))
            counter.reset()

    trainer = Trainer(cfg, default_callbacks(cfg) + [PerStep()])
    trainer.setup()
    try:
        with counter:
            trainer.train()
    finally:
        shutdown_distributed()
    return {"per_step": per_step, "params": sum(p.numel() for p in trainer.model[0].parameters()),
            "micro": cfg.train.global_batch_size // cfg.train.micro_batch_size}


@pytest.fixture(scope="module")
def counts(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("syncs")
    return {gb: run_ranks(__file__, "count_syncs", timeout=600,
                          kwargs={"data": str(demo_data), "run_dir": str(root / str(gb)),
                                  "global_batch": gb})[0]
            for gb in (4, 8)}


def test_at_most_eight_host_syncs_per_step_from_our_code(counts):
    assert counts[8]["micro"] == 2 * counts[4]["micro"]  # twice the micro-batches
    for gb, result in counts.items():
        assert len(result["per_step"]) == 3
        for step, sites in enumerate(result["per_step"][1:], start=2):  # step 1 warms up
            total = sum(sites.values())
            assert 0 < total <= BUDGET, f"global batch {gb}, step {step}: {total} syncs: {sites}"
    # Independent of the micro-batch count: the same sites, the same number of times.
    assert counts[4]["per_step"][-1] == counts[8]["per_step"][-1]


def test_the_counter_sees_each_kind_of_sync():
    import torch

    from mm1_megatron.runtime.host_syncs import HostSyncCounter

    x = torch.randn(8)
    counter = HostSyncCounter()
    local: dict = {"torch": torch}
    exec(compile(_SYNCING_SOURCE, __file__, "exec"), local)
    with counter:
        local["syncing_calls"](x)
        torch.isfinite(x).all()  # stays on the device
    # Called from a test file, not from the package: nothing counted.
    assert counter.total == 0
    # The same calls from a package file are counted, one site per kind.
    from pathlib import Path

    import mm1_megatron

    as_if = Path(mm1_megatron.__file__).parent / "train" / "step.py"
    namespace: dict = {"torch": torch}
    exec(compile(_SYNCING_SOURCE, str(as_if), "exec"), namespace)
    with counter:
        namespace["syncing_calls"](x)
    kinds = sorted(site.split()[-1] for site in counter.sites)
    assert kinds == sorted(["item", "__bool__", "tolist", "nonzero", "masked_select",
                            "__getitem__", "__float__", "cpu"]), counter.sites


_SYNCING_SOURCE = '''
def syncing_calls(x):
    x.sum().item(); bool(x.sum() > 0); x.tolist(); torch.nonzero(x)
    x.masked_select(x > 0); x[x > 0]; float(x.max()); x.cpu()
    return x[1:3]  # slicing: no sync
'''