"""Model, optimizer and one optimizer step on Megatron-Core's DDP, optimizer and schedules.

A batch is a dict of tensors for one micro-batch:
  tokens [b, s], labels [b, s], loss_mask [b, s] (float), position_ids [b, s],
  document_ids [b, s] (packed documents; the model builds the attention from them),
  cu_seqlens [n + 1] int32 and max_seqlen (the same documents as THD segments, for TE),
  images [n, 3, H, W] (n may be 0).
Loss is averaged per token over the whole global batch (`calculate_per_token_loss`), so every
layout (any DP size, any micro-batch split) optimises exactly the same objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel as DDP
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.enums import ModelType
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from mm1_megatron.config import Config
from mm1_megatron.data.loader import drop_loss_of_undecoded
from mm1_megatron.data.mixture import SOURCES
from mm1_megatron.model.builder import build_mm1_model
from mm1_megatron.model.mm1 import MM1Model
from mm1_megatron.model.recipe import lr_rule_params, peak_lr_and_weight_decay
from mm1_megatron.model.specs import init_tp_comm_overlap
from mm1_megatron.runtime import comm_device, to_device, training_device


def build_model(cfg: Config, use_te: bool) -> list[DDP]:
    """This rank's pipeline stage of MM1Model, wrapped in Megatron-Core DDP: one model chunk,
    or `parallel.virtual_stages` chunks for the interleaved schedule."""
    chunks = cfg.parallel.virtual_stages or 1
    if use_te:
        init_tp_comm_overlap(cfg)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.train.grad_reduce_in_fp32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    model = []
    for vp_stage in range(chunks):
        vp = vp_stage if chunks > 1 else None
        first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp)
        last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)
        module = build_mm1_model(cfg, use_te, pre_process=first, post_process=last,
                                 pp_rank=ps.get_pipeline_model_parallel_rank(), vp_stage=vp)
        module.model_type = ModelType.encoder_or_decoder  # what the schedules expect of a GPT
        freeze(module, cfg.train.freeze)
        # Weights are initialised on the host (identical for every TP size); the whole module,
        # buffers included, goes to the device before DDP, as Megatron-LM does.
        module.to(training_device())
        # Later chunks' gradients are ready last; one bucket each (as Megatron-LM does).
        model.append(DDP(config=module.config, ddp_config=ddp_config, module=module,
                         disable_bucketing=vp_stage > 0))
    config = model[0].module.config
    config.no_sync_func = [chunk.no_sync for chunk in model] if chunks > 1 else model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return model


def freeze(module: MM1Model, parts: str) -> None:
    """`train.freeze`: the named parts keep their weights (no gradients; DDP and the optimizer
    skip parameters that do not require them)."""
    for name in filter(None, (p.strip() for p in parts.split(","))):
        part = {"vision": module.vision, "connector": module.connector,
                "llm": module.language_model}[name]
        for param in part.parameters() if part is not None else ():
            param.requires_grad_(False)


def build_optimizer(cfg: Config, model: list[DDP]) -> tuple[MegatronOptimizer,
                                                             OptimizerParamScheduler]:
    t = cfg.train
    peak, _ = peak_lr_and_weight_decay(t.lr, lr_rule_params(cfg),
                                       t.weight_decay_ratio)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam",  # Megatron's "adam" is AdamW (decoupled weight decay)
        lr=peak,
        min_lr=peak * t.min_lr_ratio,
        # torch AdamW decays by lr_t * weight_decay per step, so weight_decay=ratio gives the
        # paper's decoupled decay of ratio x lr (0.1 x lr), following the LR schedule.
        weight_decay=t.weight_decay_ratio,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.grad_clip,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        params_dtype=model[0].module.config.params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    ), model)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=peak, min_lr=peak * t.min_lr_ratio,
        lr_warmup_steps=t.warmup_steps, lr_decay_steps=t.train_steps, lr_decay_style="cosine",
        start_wd=t.weight_decay_ratio, end_wd=t.weight_decay_ratio,
        wd_incr_steps=t.train_steps, wd_incr_style="constant",
        # On resume the config's schedule (peak, warm-up, train_steps) wins over the one the
        # checkpoint was written with; only the step count comes from the checkpoint. (Megatron's
        # default silently keeps the old schedule, so `train.train_steps=...` would not extend it.)
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False)
    return optimizer, scheduler


def num_microbatches(cfg: Config) -> int:
    dp = ps.get_data_parallel_world_size()
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def _loss(loss_mask: torch.Tensor, sources: Optional[torch.Tensor], per_token_loss: torch.Tensor):
    mask = loss_mask.float()
    weighted = per_token_loss.float() * mask
    total = weighted.sum()
    # Report [sum, tokens] overall and per source; the schedule divides by all loss tokens.
    # Masked sums, not boolean indexing: indexing by a mask reads it on the host (a sync).
    report = [total.detach(), mask.sum().detach()]
    for source in range(len(SOURCES)):
        picked = (sources == source).float() if sources is not None else torch.zeros_like(mask)
        report += [(weighted * picked).sum().detach(), (mask * picked).sum().detach()]
    return total, mask.sum().to(torch.int), {"lm loss": torch.stack(report)}


def _forward_step(data_iterator: Iterator[dict], model: DDP):
    batch = to_device(next(data_iterator))
    output = model(batch["tokens"], batch["position_ids"], images=batch.get("images"),
                   labels=batch["labels"], document_ids=batch["document_ids"],
                   cu_seqlens=batch.get("cu_seqlens"), max_seqlen=batch.get("max_seqlen"))
    return output, partial(_loss, batch["loss_mask"], batch.get("sources"))


def reads_data() -> bool:
    """The one rank per tensor- and pipeline-parallel group (of a data-parallel rank) that
    reads, tokenizes and decodes the micro-batches: the first stage's TP rank 0."""
    return ps.is_pipeline_first_stage(ignore_virtual=True) and \
        ps.get_tensor_model_parallel_rank() == 0


# [b, s] fields sent as one int64 payload (loss_mask is 0/1 until undecoded images drop it);
# position_ids are rebuilt, images go to the first stage's TP peers only (share_images).
_ROW_FIELDS = ("tokens", "labels", "loss_mask", "document_ids", "sources")
_IMAGE_FIELDS = ("image_ok", "image_rows", "image_documents")
_READER_RANKS: dict[int, int] = {}


def _reader_rank(group) -> int:
    key = id(group)
    if key not in _READER_RANKS:
        flag = torch.tensor([dist.get_rank() if reads_data() else -1], device=comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        _READER_RANKS[key] = int(flag.item())
    return _READER_RANKS[key]


def share_batches(microbatches: list[Optional[dict]]) -> list[dict]:
    """The reader's micro-batches (`reads_data`) for every rank of its tensor x pipeline
    group, whose loaders planned the same rows but built nothing (`None`): one broadcast of
    the shapes and one of all micro-batches' token, label, mask, packing and image-flag
    tensors. Images follow in `share_images`, to the first stage's TP peers only."""
    group = ps.get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return microbatches
    src, device = _reader_rank(group), comm_device()
    reader = dist.get_rank() == src
    if reader:
        header = torch.tensor([[*b["tokens"].shape, b["cu_seqlens"].numel(), b["max_seqlen"],
                                b["image_ok"].numel()] for b in microbatches], device=device)
    else:
        header = torch.empty(len(microbatches), 5, dtype=torch.long, device=device)
    dist.broadcast(header, src=src, group=group)
    shapes = header.tolist()  # one read: receivers size their buffers from it
    if reader:
        payload = torch.cat([torch.cat([b[k].reshape(-1).long() for k in _ROW_FIELDS]
                                       + [b["cu_seqlens"].long()]
                                       + [b[k].reshape(-1).long() for k in _IMAGE_FIELDS])
                             for b in microbatches]).to(device)
    else:
        total = sum(len(_ROW_FIELDS) * b * s + cu + len(_IMAGE_FIELDS) * n
                    for b, s, cu, _, n in shapes)
        payload = torch.empty(total, dtype=torch.long, device=device)
    dist.broadcast(payload, src=src, group=group)
    if reader:
        return microbatches
    out, pieces = [], iter(payload.split([size for b, s, cu, _, n in shapes for size in
                                          [b * s] * len(_ROW_FIELDS) + [cu]
                                          + [n] * len(_IMAGE_FIELDS)]))
    for b, s, _, max_seqlen, _ in shapes:
        batch = {k: next(pieces).view(b, s) for k in _ROW_FIELDS}
        batch["loss_mask"] = batch["loss_mask"].float()
        batch.update(cu_seqlens=next(pieces).int(), max_seqlen=max_seqlen,
                     position_ids=torch.arange(s, device=device).expand(b, -1))
        batch.update({k: next(pieces) for k in _IMAGE_FIELDS})
        batch.update(image_ok=batch["image_ok"].float(), images=None, sample_ids=[])
        out.append(batch)
    return out


def share_images(cfg: Config, microbatches: list[dict]) -> None:
    """Images are read and decoded once per tensor-parallel group, on the first pipeline stage
    (where the encoder runs; see `train.loop`): its TP rank 0 broadcasts them to the TP peers,
    and which images could not be decoded to every stage, which each drop those documents'
    loss themselves. In the training thread: collectives from the prefetch thread would race
    the step's on the same communicators."""
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    if (tp == 1 and pp == 1) or not microbatches or "image_ok" not in microbatches[0]:
        return  # this rank decoded its images itself (or the batches carry them)
    device, size = training_device(), cfg.vision.image_size
    first = ps.is_pipeline_first_stage(ignore_virtual=True)
    for batch in microbatches:
        ok = batch["image_ok"].to(device)
        if first and tp > 1:
            group, src = ps.get_tensor_model_parallel_group(), \
                ps.get_tensor_model_parallel_src_rank()
            images = batch["images"]
            sub = cfg.vision.sub_images  # flags per image, encoder inputs per sub-image
            images = torch.empty(ok.numel() * sub, 3, size, size, device=device) \
                if images is None else images.to(device)
            if ok.numel():
                dist.broadcast(images, src=src, group=group)
            dist.broadcast(ok, src=src, group=group)
            batch["images"] = images
        if pp > 1:
            dist.broadcast(ok, src=ps.get_pipeline_model_parallel_first_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        batch["image_ok"] = ok
        batch["loss_mask"] = drop_loss_of_undecoded(
            batch["loss_mask"].to(device), batch["document_ids"].to(device),
            batch["image_rows"].to(device), batch["image_documents"].to(device), ok)


def _non_finite(model: list[DDP], loss_sum: Optional[torch.Tensor]) -> bool:
    """True on every rank if any rank sees a NaN/Inf loss or gradient. One fused check over
    DDP's contiguous gradient buffers and one read on the host, whatever the parameter count."""
    finite = torch.ones((), dtype=torch.bool, device=comm_device())
    for chunk in model:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            finite &= torch.isfinite(buffer.grad_data).all()
    if loss_sum is not None:
        finite &= torch.isfinite(loss_sum).all()
    flag = (~finite).float().reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@dataclass
class StepResult:
    loss: float  # per-token LM loss over the global batch (every rank)
    grad_norm: Optional[float]
    skipped: bool  # NaN/Inf loss or gradient: no update
    lr: float
    source_losses: dict[int, float] = field(default_factory=dict)  # per source, last stage


def train_step(cfg: Config, model: list[DDP], optimizer: MegatronOptimizer,
               scheduler: OptimizerParamScheduler, microbatches: Iterable[dict]) -> StepResult:
    """Forward/backward over this rank's micro-batches, then one optimizer step, skipped on
    every rank when any rank sees a non-finite loss or gradient."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    microbatches = list(microbatches)
    share_images(cfg, microbatches)
    # Every model chunk walks the same micro-batches (masks and positions are needed on all).
    data = [iter(microbatches) for _ in model] if len(model) > 1 else iter(microbatches)
    reports = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=data, model=model,
        num_microbatches=num_microbatches(cfg), seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.train.micro_batch_size, forward_only=False)
    # [loss sum, tokens] overall and per source, summed over the global batch; computed on
    # the last pipeline stage and sent to the others (rank 0 logs it).
    summed = torch.zeros(2 + 2 * len(SOURCES), device=comm_device())
    if ps.is_pipeline_last_stage():
        summed = torch.stack([r["lm loss"] for r in reports]).sum(0)
        dist.all_reduce(summed, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(summed, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    lr = optimizer.param_groups[0]["lr"]
    if _non_finite(model, summed[0]):
        sums = summed.tolist()
        return StepResult(loss=sums[0] / max(sums[1], 1.0), grad_norm=None, skipped=True, lr=lr)
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=1)
    sums = summed.tolist()  # one read of the sums, after the step is queued
    per_source = {source: sums[2 + 2 * source] / sums[3 + 2 * source]
                  for source in range(len(SOURCES)) if sums[3 + 2 * source] > 0}
    return StepResult(loss=sums[0] / max(sums[1], 1.0), grad_norm=grad_norm, skipped=not updated,
                      lr=lr, source_losses=per_source)
