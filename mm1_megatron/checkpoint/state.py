"""Distributed checkpoints with Megatron-Core dist_checkpointing: save, resume, weights only.

A checkpoint holds the model, optimizer, scheduler, step, data-loader state (`extra`) and
per-rank RNG states (directory layout and `latest`: `checkpoint.directory`). The optimizer is
saved `fully_reshardable`, so a checkpoint loads into any TP/PP/EP/DP layout; RNG states are
restored only when the layout is unchanged. The model part alone (`load_model_weights`) loads
into any layout too: evaluation, conversion and `checkpoint.init_from` use it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from torch.distributed.checkpoint.api import CheckpointException

from mm1_megatron.checkpoint.directory import (check_readable, checkpoint_root,
                                               complete_checkpoints, prune, resolve_checkpoint,
                                               step_dir_name, write_latest, write_manifest,
                                               write_written_by)
from mm1_megatron.runtime import comm_device
from mm1_megatron.runtime.faults import slow_save_seconds
from mm1_megatron.runtime.mcore_version import async_checkpoint_machinery

_OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable",
                       "chained_optim_avoid_prefix": True}


def _layout() -> dict[str, int]:
    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _rng_object() -> ShardedObject:
    """One RNG state per global rank (restored only into the same layout, where rank r has
    the same coordinates)."""
    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    return ShardedObject("rng_state", state, (dist.get_world_size(),), (dist.get_rank(),),
                         replica_id=0)


def _unwrapped(chunk):
    return getattr(chunk, "module", chunk)  # DDP-wrapped (training) or bare (eval, convert)


def model_sharded_state(model) -> dict[str, Any]:
    """All model chunks of this rank. dist_checkpointing matches tensors by their global keys
    (layer numbers include the chunk's offset), so any chunking loads any other."""
    return {f"chunk{i}": _unwrapped(chunk).sharded_state_dict()
            for i, chunk in enumerate(model)}


def load_model_state(model, loaded: dict[str, Any]) -> None:
    for i, chunk in enumerate(model):
        _unwrapped(chunk).load_state_dict(loaded[f"chunk{i}"])


# Learned position tables over the patch grid, and how many leading rows are not grid cells
# (the ViT's class token; the C-Abstractor's table is [1, cells, d]).
_POSITION_TABLES = {"position_embeddings.weight": "vision", "pos_emb": "connector"}


def load_model_weights(path: str | Path, model, adapt_positions: bool = False,
                       log=None, fully_parallel: bool = False) -> None:
    """Collective. Only the model part of a checkpoint (any layout) into `model`, a list of
    chunks: to initialise a new run (optimizer, scheduler and loader start fresh), or to
    evaluate / convert in one process. `adapt_positions`: position tables saved at another
    image size (a 378 px pre-training run starting 672 px SFT) are interpolated to the
    model's grid (bicubic; the class token's row kept); every other tensor must match.
    `fully_parallel`: `checkpoint.fully_parallel_load` (a training run's `init_from`)."""
    path = resolve_checkpoint(path)  # a checkpoint, or a run / checkpoints dir (its latest)
    check_readable(path)
    state = model_sharded_state(model)
    resized = _load_positions_at_saved_shape(state, path) if adapt_positions else {}
    loaded = dist_checkpointing.load({"model": state}, str(path),
                                     _load_strategy(path, fully_parallel))["model"]
    if resized:
        from mm1_megatron.model.vision import interpolate_position_grid
    for (chunk, name), (want, prefix) in resized.items():
        saved = loaded[chunk][name]
        grid = math.isqrt(want[-2] - prefix)
        table = interpolate_position_grid(saved.reshape(-1, saved.shape[-1]), prefix, grid)
        loaded[chunk][name] = table.reshape(want)
        if log is not None:
            log(f"interpolated {name} from {tuple(saved.shape)} to {tuple(want)} "
                "(checkpoint at another image size)")
    load_model_state(model, loaded)


def _load_positions_at_saved_shape(state: dict, path: Path) -> dict:
    """Swap each position table whose saved shape differs for a placeholder of the saved shape;
    returns {(chunk, name): (the model's shape, prefix rows)}."""
    from megatron.core.dist_checkpointing import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(str(path))
    out = {}
    for chunk, tensors in state.items():
        for name, tensor in list(tensors.items()):
            part = next((p for suffix, p in _POSITION_TABLES.items() if name.endswith(suffix)),
                        None)
            if part is None or not isinstance(tensor, ShardedTensor) or \
                    tensor.key not in saved:
                continue
            shape = tuple(saved[tensor.key].global_shape)
            if shape == tuple(tensor.global_shape):
                continue
            prefix = 0 if part == "connector" else \
                tensor.global_shape[0] - math.isqrt(tensor.global_shape[0]) ** 2
            tensors[name] = ShardedTensor.from_rank_offsets(
                tensor.key, torch.empty(shape, dtype=tensor.data.dtype),
                replica_id=tensor.replica_id)
            out[chunk, name] = (tuple(tensor.global_shape), prefix)
    return out


def _sharded_state(model, optimizer, is_loading: bool) -> dict[str, Any]:
    model_state = model_sharded_state(model)
    return {"model": model_state,
            "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                      metadata=_OPTIMIZER_SHARDING)}


def finish_param_sync(model) -> None:
    """Collective. With `overlap_param_gather` the distributed optimizer's updated shards reach
    the other DP ranks only in the next forward's pre-hooks: until then every rank holds its
    own shard at step N and the others' at N-1. Gather now (as Megatron-LM does before a save)
    and keep the hooks for the next forward, which then finds nothing left to gather."""
    for chunk in model:
        if getattr(chunk, "use_forward_hook", False):  # Megatron DDP with overlap_param_gather
            chunk.disable_forward_pre_hook(param_sync=True)
            chunk.enable_forward_pre_hook()


class CheckpointSaveError(RuntimeError):
    """A save that did not complete; its partial directory is gone and `latest` untouched."""


def _bytes_in(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _no_space(root: Path, needed: int) -> str:
    free = shutil.disk_usage(root).free
    return (f"no space left on device: {root} (a checkpoint needs ~{needed / 2**30:.2f} GB, "
            f"{free / 2**30:.2f} GB free)")


_FULL_BYTES = 1 << 20  # less free than this after a failed write: the disk filled up


def _is_out_of_space(err: BaseException) -> bool:
    """ENOSPC anywhere in the chain; torch's zip writer reports a full disk only as
    'unexpected pos', and dist_checkpointing wraps each rank's error in a CheckpointException."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text \
                or "unexpected pos" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


@dataclass
class _Save:
    """One save in progress: where it goes, and the previous checkpoint's size."""

    step: int
    root: Path
    final: Path
    partial: Path
    needed: int
    keep_last: int
    started: float  # time.perf_counter()


def _begin_save(run_dir: str | Path, step: int, model, keep_last: int) -> _Save:
    """Collective. A fresh `step_N.partial`; refused (CheckpointSaveError on every rank)
    when the previous checkpoint would not fit again (rank 0 decides)."""
    finish_param_sync(model)
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    partial = root / f"{final.name}.partial"
    needed = 0
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        previous = complete_checkpoints(run_dir)  # newest last; no file checks on this path
        needed = _bytes_in(previous[-1]) if previous else 0
    verdict = torch.tensor([float(needed), float(shutil.disk_usage(root).free)
                            if dist.get_rank() == 0 else 0.0], device=comm_device())
    dist.broadcast(verdict, src=0)
    needed, free = (int(v) for v in verdict.tolist())
    if needed > free:
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointSaveError(_no_space(root, needed))
    return _Save(step, root, final, partial, needed, keep_last, time.perf_counter())


def _full_state(save: _Save, model, optimizer, scheduler, extra: Optional[dict]) -> dict:
    state = _sharded_state(model, optimizer, is_loading=False)
    state.update(step=save.step, scheduler=scheduler.state_dict(), extra=extra or {},
                 layout=_layout(), rng_state=_rng_object())
    return state


def _save_strategy(fully_parallel: bool):
    """None (Megatron-Core's default torch_dist writer: the first data-parallel replica writes
    the replicated tensors), or that writer with the replicated tensors dealt evenly over the
    DP x CP group by size (only shard metadata is exchanged), as Megatron-LM saves by default."""
    if not fully_parallel or ps.get_data_parallel_world_size(with_context_parallel=True) == 1:
        return None
    from megatron.core.dist_checkpointing.serialization import (
        get_default_save_sharded_strategy)
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper)

    return FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy(),
        ps.get_data_parallel_group(with_context_parallel=True))


def _load_strategy(path: Path, fully_parallel: bool):
    """None (each rank reads all it loads), or Megatron-Core's default reader with the reads
    that DP x CP replicas share dealt over the group and exchanged (broadcasts)."""
    if not fully_parallel or ps.get_data_parallel_world_size(with_context_parallel=True) == 1:
        return None
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy)
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper)

    return FullyParallelLoadStrategyWrapper(
        get_default_load_sharded_strategy(str(path)),
        ps.get_data_parallel_group(with_context_parallel=True))


def _failed(save: _Save, err: BaseException) -> CheckpointSaveError:
    """A write that failed on some rank (raised on every rank alike): the partial directory
    is removed, `latest` is untouched; what to say."""
    # 0.19's writer re-raises a worker's error as a new RuntimeError naming only its class
    # (filesystem_async: "An error is caught while starting worker 0"): a filesystem with
    # (almost) nothing left says what the error chain no longer does.
    full = shutil.disk_usage(save.root).free < _FULL_BYTES
    written = 0
    if dist.get_rank() == 0:
        written = _bytes_in(save.partial) if save.partial.exists() else 0
        shutil.rmtree(save.partial, ignore_errors=True)
    if full or _is_out_of_space(err):
        return CheckpointSaveError(_no_space(save.root, max(save.needed, written)))
    first = str(err).strip().splitlines()[-1][:300] if str(err).strip() else ""
    return CheckpointSaveError(f"checkpoint save to {save.partial} failed: "
                               f"{type(err).__name__}: {first}")


def _publish(save: _Save) -> None:
    """Collective, once every rank's files are written: manifest, rename, `latest`,
    retention (rank 0), so `latest` only ever names a complete checkpoint."""
    dist.barrier()
    if dist.get_rank() == 0:
        write_written_by(save.partial, {"torch": torch.__version__})
        write_manifest(save.partial)  # sizes and end sums, verified before a resume loads it
        shutil.rmtree(save.final, ignore_errors=True)
        os.replace(save.partial, save.final)
        write_latest(save.root, save.final.name)
        prune(save.root, save.keep_last, keep=save.final.name)
    dist.barrier()


# torch's CheckpointException (each rank's write errors, gathered on every rank) derives
# from BaseException, not Exception.
_WRITE_ERRORS = (Exception, CheckpointException)


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, scheduler,
                    extra: Optional[dict] = None, keep_last: int = 3,
                    fully_parallel: bool = True) -> Path:
    """Collective: every rank calls it. `extra` (e.g. the loader state) must be the same on
    all ranks and made of plain Python values. Raises CheckpointSaveError on every rank when
    the save cannot complete (the disk cannot hold another checkpoint the size of the last
    one, or a write fails): the partial directory is removed, `latest` is untouched.
    `fully_parallel`: `checkpoint.fully_parallel_save`."""
    save = _begin_save(run_dir, step, model, keep_last)
    state = _full_state(save, model, optimizer, scheduler, extra)
    try:
        dist_checkpointing.save(state, str(save.partial), _save_strategy(fully_parallel))
    except _WRITE_ERRORS as err:  # noqa: BLE001
        raise _failed(save, err) from err
    _publish(save)
    return save.final


@dataclass
class FinishedSave:
    step: int
    write_s: float  # from the start of the save to its checkpoint being complete


class AsyncCheckpointer:
    """Checkpoints written in the background, at most one in flight (collective methods:
    every rank calls them at the same points).

    `start(...)` finishes a save still in flight first (blocking), then captures the step's state: the
    planning collectives and, on GPUs, the device-to-host copy run here (Megatron-Core's
    `preload_fn`); a forked writer process writes the files while training goes on.
    `finish(blocking)` completes a written save (Megatron-Core's finalize: every rank's
    write result gathered, then `_publish`), or raises CheckpointSaveError. Everything the
    synchronous path promises holds: the same `.partial`, manifest, atomic `latest`,
    retention and disk-space refusal."""

    def __init__(self) -> None:
        queue, self._save_args, self.machinery = async_checkpoint_machinery()
        # A writer forked per save (`TemporalAsyncCaller`), as Megatron-LM runs it unless
        # asked otherwise: said explicitly, since nvidia-resiliency-ext's queue defaults to a
        # persistent spawned worker that takes each request pickled and makes the D2H copy
        # itself (Megatron-Core's defaults to forking).
        self._queue = queue(persistent=False)
        self.pending: Optional[_Save] = None

    def start(self, run_dir: str | Path, step: int, model, optimizer, scheduler,
              extra: Optional[dict] = None, keep_last: int = 3,
              fully_parallel: bool = True) -> None:
        self.finish(blocking=True)  # at most one in flight (callers that log the wait: first)
        save = _begin_save(run_dir, step, model, keep_last)
        state = _full_state(save, model, optimizer, scheduler, extra)
        try:
            request = dist_checkpointing.save(state, str(save.partial),
                                              _save_strategy(fully_parallel),
                                              async_sharded_save=True, **self._save_args)
            request = request._replace(async_fn=functools.partial(
                _in_writer, os.getpid(), slow_save_seconds(step), request.async_fn))
            request.add_finalize_fn(functools.partial(_publish, save))
            self._queue.schedule_async_request(request)
        except _WRITE_ERRORS as err:  # noqa: BLE001
            raise _failed(save, err) from err
        self.pending = save

    def finish(self, blocking: bool) -> Optional[FinishedSave]:
        """The save in flight, if it completed (or, blocking, once it has)."""
        save = self.pending
        if save is None:
            return None
        try:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except _WRITE_ERRORS as err:  # noqa: BLE001
            self.pending = None
            raise _failed(save, err) from err
        if not done:
            return None
        self.pending = None
        return FinishedSave(save.step, time.perf_counter() - save.started)


def _in_writer(trainer_pid: int, delay_s: float, write, *args, **kwargs):
    """First thing in the forked writer: die with the trainer (an orphan would go on writing
    into a `step_N.partial` that the restarted run may be writing again), then the test
    suite's slow-write fault (`runtime.faults.SLOW_SAVE`), then the write."""
    _die_with_parent()
    if os.getppid() != trainer_pid:  # the trainer died before the line above ran
        os._exit(1)
    if delay_s:
        time.sleep(delay_s)
    return write(*args, **kwargs)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):  # not Linux: the writer may outlive a killed trainer
        pass


# What the LR / WD schedule reads from each param group (Megatron-Core's ParamGroupOverride),
# and what tells the groups apart whatever the schedule (set by `_get_param_groups`).
_SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")
_GROUP_KEYS = ("wd_mult", "lr_mult", "is_decoupled_lr")


def _saved_optimizers(loaded: dict) -> list[dict]:
    """The per-optimizer entries of a loaded optimizer state (several when it was chained)."""
    return [loaded[i] for i in sorted(k for k in loaded if isinstance(k, int))
            if "optimizer" in loaded[i]] or [loaded]


def _current_schedule_wins(optimizer, loaded: dict) -> list[str]:
    """The saved param groups take this run's schedule values (`train.lr`, `min_lr_ratio`,
    ...) before loading: otherwise 0.16 silently restores the checkpoint's peak LR over a
    changed `train.lr`, and 0.19, which matches groups by these values too, finds no group.
    Returns what changed, e.g. ["max_lr 0.003 -> 0.001"], once per key."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    current = [g for sub in subs for g in sub.optimizer.param_groups]
    changes: dict[str, str] = {}
    for entry in _saved_optimizers(loaded):
        for group in entry["optimizer"]["param_groups"]:
            match = next((g for g in current
                          if all(g.get(k) == group.get(k) for k in _GROUP_KEYS)), None)
            for key in _SCHEDULE_KEYS if match is not None else ():
                if key in match and group.get(key) != match[key]:
                    changes.setdefault(key, f"{key} {group.get(key):.4g} -> {match[key]:.4g}")
                    group[key] = match[key]
    return list(changes.values())


def _load_optimizer(optimizer, loaded: dict) -> None:
    """Megatron-Core chains a separate expert optimizer when EP > 1 (one optimizer at EP=1),
    so a checkpoint saved with another EP size holds another number of optimizer entries.
    Tensors already matched by parameter name (`chained_optim_avoid_prefix`); here the
    per-optimizer common parts (param groups with lr, step, ...) are re-dealt to the current
    chain, matching groups by their decay/LR multipliers."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    saved = _saved_optimizers(loaded)
    if len(saved) == len(subs):
        optimizer.load_state_dict(loaded)
        return
    groups = [g for entry in saved for g in entry["optimizer"]["param_groups"]]
    sharding = saved[0]["param_state_sharding_type"]
    states = []
    for i, sub in enumerate(subs):
        param_state = (loaded[i] if len(subs) > 1 else loaded)["param_state"]
        fitted = []
        for inner in sub.optimizer.param_groups:
            key = (inner["wd_mult"], inner["lr_mult"], inner["is_decoupled_lr"])
            match = next(g for g in groups
                         if (g["wd_mult"], g["lr_mult"], g["is_decoupled_lr"]) == key)
            fitted.append({**match, "is_expert_parallel": inner["is_expert_parallel"]})
        states.append({"optimizer": {"param_groups": fitted}, "param_state": param_state,
                       "param_state_sharding_type": sharding})
    optimizer.load_state_dict(states if len(subs) > 1 else states[0])


def load_checkpoint(path: str | Path, model, optimizer, scheduler,
                    fully_parallel: bool = True) -> dict[str, Any]:
    """Collective. Loads into the current layout; returns {"step", "extra", "rng_restored",
    "schedule_changes"} (the LR / WD schedule values this run's config changed).
    `fully_parallel`: `checkpoint.fully_parallel_load`."""
    check_readable(Path(path))
    common = dist_checkpointing.load_common_state_dict(str(path))
    state = _sharded_state(model, optimizer, is_loading=True)
    same_layout = common.get("layout") == _layout()
    if same_layout:
        state["rng_state"] = _rng_object()
    loaded = dist_checkpointing.load(state, str(path), _load_strategy(path, fully_parallel))
    load_model_state(model, loaded["model"])
    schedule_changes = _current_schedule_wins(optimizer, loaded["optimizer"])
    _load_optimizer(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["torch"])
        get_cuda_rng_tracker().set_states(rng["tracker"])
    return {"step": common["step"], "extra": common["extra"], "rng_restored": same_layout,
            "schedule_changes": schedule_changes}
