"""The parallel layout the H100 model plans for: `Layout`, the sizes a config resolves to
on one world size (TP, PP, CP, EP, expert TP, DP, micro-batches, virtual stages, encoder
inputs per sequence), and `stage_layers`, the decoder layers of each pipeline stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from mm1_megatron.config import Config


def stage_layers(cfg: Config) -> list[range]:
    """Decoder layers per pipeline stage (first_stage_layers on stage 0, the rest even)."""
    p, n = cfg.parallel, cfg.llm.num_layers
    first = p.first_stage_layers if p.first_stage_layers is not None else n // p.pp
    if p.pp == 1:
        return [range(n)]
    rest = (n - first) // (p.pp - 1)
    return [range(first)] + [range(first + i * rest, first + (i + 1) * rest)
                             for i in range(p.pp - 1)]


@dataclass(frozen=True)
class Layout:
    """The sizes the model needs, resolved for one world size."""

    gpus_per_node: int
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    dp: int
    mb: int
    microbatches: int
    vs: int = 1  # model chunks per pipeline rank (interleaved 1F1B)
    images: int = 0  # encoder inputs per sequence (tiling: sub-images); 0: text-only decoder

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: the shard group of expert optimizer state."""
        return self.tp * self.cp * self.dp // (self.ep * self.etp)

    @property
    def sp(self) -> bool:
        return self.tp > 1


def resolve_layout(cfg: Config, world: int, gpus_per_node: int = 8,
                   text_only: bool = False) -> Layout:
    """`text_only`: plan the decoder alone (no ViT, no connector, no images), e.g. to hold
    the model against published text-only runs."""
    p, t = cfg.parallel, cfg.train
    dp = world // p.model_parallel_size
    return Layout(gpus_per_node=p.gpus_per_node or gpus_per_node, tp=p.tp, pp=p.pp, cp=p.cp,
                  ep=p.ep, etp=p.expert_tp or p.tp, dp=dp, mb=t.micro_batch_size,
                  microbatches=t.global_batch_size // (t.micro_batch_size * dp),
                  vs=p.virtual_stages or 1,
                  images=0 if text_only else
                  cfg.data.max_images_per_sequence * cfg.vision.sub_images)
