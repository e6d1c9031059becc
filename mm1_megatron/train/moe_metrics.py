"""MoE metrics per layer: load-balancing loss, router z-loss, expert load imbalance.

Every value covers the whole model (all pipeline stages) and the whole global batch (all
data-parallel ranks, all micro-batches), so rank 0 can log every MoE layer. All ranks must
call `MoEMetrics.collect()` once per step: it is collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from mm1_megatron.config import Config
from mm1_megatron.runtime import comm_device
from mm1_megatron.runtime.mcore_version import clear_moe_tracker, moe_tracked_losses


def _sum(tensor: torch.Tensor, group) -> None:
    # Not ReduceOp.AVG (Megatron's own tracker reduction uses it): gloo does not support it.
    if dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)


class MoEMetrics:
    def __init__(self, cfg: Config, model) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.cfg = cfg
        llm = cfg.llm
        self.moe_layers = [i + 1 for i in range(llm.num_layers) if llm.is_moe_layer(i)]
        # Tokens routed to each expert, [layer, expert]; only this stage's rows get filled.
        self.tokens = torch.zeros(llm.num_layers, llm.moe.num_experts, device=comm_device())
        for chunk in model:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._count)

    def _count(self, router, inputs, output) -> None:
        routing_map = output[1]  # [tokens, experts] bool
        self.tokens[router.layer_number - 1] += routing_map.sum(0).float().detach()

    def _token_groups(self) -> list:
        """Groups whose ranks route different tokens through the same layers."""
        groups = [ps.get_data_parallel_group()]
        if self.cfg.parallel.sequence_parallel and self.cfg.parallel.tp > 1:
            groups.append(ps.get_tensor_model_parallel_group())  # SP splits the sequence
        return groups

    def _tracked_names(self) -> list[str]:
        """What Megatron's routers record, by config: the same list on every rank, even on a
        pipeline stage without MoE layers (its tracker stays empty)."""
        moe = self.cfg.llm.moe
        return ([name for name, coeff in (("load_balancing_loss", moe.aux_loss_coeff),
                                          ("z_loss", moe.z_loss_coeff)) if coeff > 0])

    def _router_losses(self, num_microbatches: int) -> dict[str, torch.Tensor]:
        """Megatron's tracker, reduced: values per layer, summed over micro-batches there."""
        tracker = moe_tracked_losses()
        out = {}
        for name in self._tracked_names():
            entry = tracker.get(name)
            values = (torch.zeros(self.cfg.llm.num_layers, device=comm_device()) if entry is None
                      else entry.values.float().clone())
            _sum(values, ps.get_pipeline_model_parallel_group())  # each stage fills its layers
            if entry is None:
                pass  # no MoE layer on this stage, nor on its DP/TP peers: nothing to reduce
            elif entry.reduce_group is not None:
                # load balancing: each rank holds its tokens' share of one loss (global
                # expert counts), summed over the reduce group, then averaged over DP.
                _sum(values, entry.reduce_group)
                if entry.needs_dp_average:
                    _sum(values, ps.get_data_parallel_group())
                    values /= ps.get_data_parallel_world_size()
            else:
                # z-loss: a mean over each rank's own tokens; average over the ranks.
                ranks = 1
                for group in self._token_groups():
                    _sum(values, group)
                    ranks *= dist.get_world_size(group)
                values /= ranks
            out[name] = values / num_microbatches
        clear_moe_tracker()
        return out

    def collect(self, num_microbatches: int) -> dict[str, float]:
        """{name: mean over MoE layers, name/layer_N: per layer} for this step; resets."""
        per_layer = self._router_losses(num_microbatches)
        tokens = self.tokens
        _sum(tokens, ps.get_pipeline_model_parallel_group())
        for group in self._token_groups():
            _sum(tokens, group)
        rows = [layer - 1 for layer in self.moe_layers]
        per_layer["expert_load_imbalance"] = tokens[rows].max(1).values / \
            tokens[rows].mean(1).clamp_min(1e-9)
        self.tokens = torch.zeros_like(tokens)
        # The tracker is indexed by layer; the imbalance rows are MoE layers only.
        names = list(per_layer)
        table = torch.stack([per_layer[n] if n == "expert_load_imbalance" else per_layer[n][rows]
                             for n in names]).tolist()  # one read on the host
        out = {}
        for name, layer_values in zip(names, table):
            out[name] = sum(layer_values) / len(layer_values)
            for layer, value in zip(self.moe_layers, layer_values):
                out[f"{name}/layer_{layer}"] = value
        return out
