"""Config schema: `ConfigError`, the typed section dataclasses, `Config`, and the Literal
aliases their fields use.

A run is fully described by one `Config`. Field annotations here are what overrides are
type-checked against (`mm1_megatron.config.overrides`), so they resolve in this module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

ConnectorType = Literal["c_abstractor", "avg_pool", "attn_pool"]
Dispatcher = Literal["alltoall", "allgather"]
Precision = Literal["bf16", "fp16", "fp32"]
Fp8Format = Literal["hybrid", "e4m3"]
Fp8Recipe = Literal["delayed", "tensorwise"]
Recompute = Literal["none", "selective", "full"]
VisionActivation = Literal["quick_gelu", "gelu"]
ImageResize = Literal["squash", "crop"]
ImageTiling = Literal["none", "sphinx"]
MixtureUnit = Literal["sequences", "documents"]
RouterDtype = Literal["fp32", "model"]
LrParams = Literal["dense", "active"]


class ConfigError(ValueError):
    """A configuration problem, always attributed to one dotted field."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"{field_name}: {reason}")
        self.field_name = field_name
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """CLIP-style ViT (pre-LN, learned position embeddings, class token)."""

    image_size: int = 378  # input pixels per side (with tiling: per tile)
    patch_size: int = 14  # pixels per patch side; image_size / patch_size patches per side
    hidden_size: int = 1280  # ViT width
    num_layers: int = 32  # ViT layers (those after feature_layer are not built)
    num_attention_heads: int = 16  # ViT attention heads
    ffn_hidden_size: int = 5120  # ViT MLP width
    class_token: bool = True  # a class token before the patches (CLIP)
    layernorm_eps: float = 1e-5  # epsilon of the ViT's LayerNorms
    # MLP activation. MM1's encoder, DFN5B-CLIP-ViT-H/14-378, is open_clip's
    # `ViT-H-14-378-quickgelu` (HF config `hidden_act: quick_gelu`): x * sigmoid(1.702 x).
    activation: VisionActivation = "quick_gelu"
    # Image preprocessing: `squash` resizes the whole image to image_size^2 (bicubic), as
    # DFN5B's open_clip preprocessing does (nothing cropped, aspect not kept); `crop` resizes
    # the shorter side and centre-crops (OpenAI CLIP's preprocessing; edges are lost).
    resize: ImageResize = "squash"
    # High resolution (MM1 §5, SPHINX-style): `sphinx` turns each image into an overview (the
    # whole image at image_size) plus tile_grid x tile_grid crops of the image resized to
    # image_size * tile_grid, each encoded on its own: 1 + tile_grid^2 sub-images and as many
    # times connector.num_tokens placeholders per image (MM1's SFT: 672 px tiles, 2 x 2 grid
    # of a 1344 resize, 5 x 144 = 720 tokens). `image_size` is then the tile size.
    tiling: ImageTiling = "none"
    tile_grid: int = 2  # tiles per side with tiling=sphinx (2: an overview and 2 x 2 tiles)
    # Which layer's output feeds the connector: -1 the last, -2 the penultimate, or 1..N.
    # Layers after it are not built.
    feature_layer: int = -1
    # Activation recomputation of the ViT: `selective` re-runs core attention, `full` whole
    # layers (gradients unchanged).
    recompute: Recompute = "none"
    recompute_layers: int = 1  # full recompute: layers per checkpointed group

    @property
    def sub_images(self) -> int:
        """Encoder inputs per image: 1, or the overview and the tiles."""
        return 1 + self.tile_grid ** 2 if self.tiling == "sphinx" else 1

    @property
    def tiles(self) -> int:
        """Tiles per side of the high-resolution image, 0 without tiling (the decoders' knob)."""
        return self.tile_grid if self.tiling == "sphinx" else 0

    @property
    def layers_built(self) -> int:
        return self.feature_layer if self.feature_layer > 0 else \
            self.num_layers + 1 + self.feature_layer

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass
class ConnectorConfig:
    """Vision-language connector; every type maps the patch grid to `num_tokens` LLM tokens."""

    # c_abstractor: RegNet blocks, adaptive average pooling to the token grid, blocks, MLP;
    # avg_pool: adaptive average pooling then a linear layer; attn_pool: num_tokens learned
    # queries cross-attending to the patches, then a linear layer.
    type: ConnectorType = "c_abstractor"
    num_tokens: int = 144  # 12x12 for the grid-based connectors
    hidden_size: int = 1024  # conv channels of the C-Abstractor
    depth: int = 3  # ResNet blocks before and after the adaptive pooling
    mlp_depth: int = 2  # readout MLP layers
    pos_emb: bool = True  # learned position embedding on the patch grid (Honeybee)
    # LayerNorm2d eps of the ResNet blocks: 1e-6, timm's LayerNorm2d default that Honeybee's
    # C-Abstractor (kakaobrain/honeybee, built on timm's RegNet blocks) inherits.
    norm_eps: float = 1e-6

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.num_tokens)


@dataclass
class MoEConfig:
    """Mixture of experts in the decoder; `num_experts=0` means dense."""

    num_experts: int = 0  # experts per MoE layer; 0: a dense decoder
    layer_freq: int = 1  # every Nth decoder layer is an MoE layer (layer 0, N, 2N, ...)
    top_k: int = 2  # experts each token is routed to
    aux_loss_coeff: float = 0.01  # GShard load-balancing loss
    z_loss_coeff: float = 0.001  # ST-MoE router z-loss
    dispatcher: Dispatcher = "alltoall"  # Megatron-Core's token dispatcher across EP ranks
    expert_ffn_hidden_size: Optional[int] = None  # None: same as llm.ffn_hidden_size
    grouped_gemm: bool = False  # Megatron-Core's grouped GEMM over the local experts
    # Router logits, softmax and top-k in fp32 (ST-MoE; Megatron-LM's MoE recipes) or in the
    # model's dtype (bf16 on GPUs).
    router_dtype: RouterDtype = "fp32"


@dataclass
class LLMConfig:
    """Llama-style decoder: RMSNorm, SwiGLU, RoPE, no biases."""

    num_layers: int = 32  # decoder layers
    hidden_size: int = 2560  # decoder width
    num_attention_heads: int = 32  # decoder query heads
    num_query_groups: Optional[int] = None  # None: multi-head attention; else GQA
    # Width of one attention head; None: hidden_size / heads (every MM1 preset). Set for
    # decoders whose heads are wider than that (Qwen3: 32 x 128 on a 2048 hidden size).
    kv_channels: Optional[int] = None
    ffn_hidden_size: int = 6912  # SwiGLU width (dense layers, and experts unless set there)
    vocab_size: int = 32000  # at least the tokenizer's vocabulary
    image_token_id: int = 3  # placeholder id; each image occupies connector.num_tokens of them
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the input embedding with the output layer
    # Activation recomputation of the decoder: `selective` re-runs core attention, `full` whole
    # layers (gradients unchanged).
    recompute: Recompute = "none"
    recompute_layers: int = 1  # full recompute: layers per checkpointed group
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe.expert_ffn_hidden_size or self.ffn_hidden_size

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe.num_experts > 0 and layer % self.moe.layer_freq == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))


@dataclass
class DataConfig:
    seq_length: int = 4096  # positions per packed row (text tokens and image placeholders)
    max_images_per_sequence: int = 16  # images one packed row may hold
    # Mixture weights (MM1: 45% interleaved, 45% caption pairs, 10% text-only).
    weight_interleaved: float = 0.45  # interleaved image-text documents
    weight_caption: float = 0.45  # image-caption pairs
    weight_text: float = 0.10  # text-only documents
    # Supervised fine-tuning conversations (the SFT presets: the only source).
    weight_sft: float = 0.0
    path: str = ""  # root folder holding the shard sets (interleaved/, caption/, text/, sft/)
    # A YAML file listing several weighted datasets per kind instead (config/blend.py says the
    # format); the kind weights stay data.weight_*. Exclusive with data.path.
    blend: str = ""
    tokenizer_model: str = ""  # sentencepiece .model
    num_workers: int = 2  # DALI decoding threads
    prefetch: int = 2  # micro-batches prepared ahead in a background thread (0: inline)
    # What the 45/45/10 weights count. `sequences`: each packed row holds documents of one
    # source and the weights apply to rows (MM1's recipe in Apple's axlearn mixes per-source
    # packed sequences); `documents`: the weights apply to documents and all sources are
    # packed into one stream (short captions then fill far fewer rows than 45%).
    mixture_unit: MixtureUnit = "sequences"
    # A resumed run refuses a dataset other than the one its checkpoint's loader position
    # refers to (manifest hashes), unless this is set.
    allow_change: bool = False


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    cp: int = 1  # context parallel
    ep: int = 1  # expert parallel
    expert_tp: Optional[int] = None  # tensor parallel inside experts; None: same as tp
    dp: Optional[int] = None  # None: derived as world_size / (tp * pp * cp)
    sequence_parallel: bool = False  # Megatron-Core SP over the TP ranks (MoE with tp>1 needs it)
    first_stage_layers: Optional[int] = None  # decoder layers on pipeline stage 0 (uneven PP)
    # Model chunks per pipeline rank: Megatron-Core's interleaved 1F1B schedule, which cuts
    # the pipeline bubble by this factor at the cost of more point-to-point traffic.
    virtual_stages: Optional[int] = None
    # None: torchrun's WORLD_SIZE or Slurm's SLURM_NTASKS at run time; without a launcher,
    # planned_nodes x gpus_per_node.
    world_size: Optional[int] = None
    gpus_per_node: Optional[int] = None  # set for GPU clusters: TP must stay inside a node
    # Nodes the layout was planned for (tools/plan.py); the world size of a dry run or plan
    # when neither parallel.world_size nor a launcher (torchrun/Slurm) gives one.
    planned_nodes: Optional[int] = None
    # Megatron-Core's distributed optimizer: fp32 master weights and Adam moments sharded
    # over the data-parallel ranks.
    distributed_optimizer: bool = True
    # Megatron-Core communication overlaps (on in the GPU presets): gradient reduce-scatter
    # during the backward pass; parameter all-gather during the next forward (needs the
    # distributed optimizer).
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False  # see overlap_grad_reduce
    # Transformer Engine userbuffers: the decoder's TP all-gathers / reduce-scatters overlap
    # its GEMMs (needs TE on GPUs, tp>1 with sequence parallelism; ignored at tp=1).
    tp_comm_overlap: bool = False

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp


@dataclass
class TrainConfig:
    global_batch_size: int = 512  # rows per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 1  # rows per forward/backward pass on one rank
    train_steps: int = 200_000  # optimizer steps; the cosine schedule ends here
    lr: Optional[float] = None  # None: the paper's rule over non-embedding LLM parameters
    # Which parameter count that rule sees for an MoE decoder: `dense`, the dense backbone the
    # MoE model is built from (the paper reuses the dense model's recipe for MoE), or
    # `active`, the parameters one token goes through. Same thing for a dense decoder.
    lr_params: LrParams = "dense"
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay_ratio: float = 0.1  # decoupled weight decay = ratio * peak lr
    warmup_steps: int = 2000  # linear LR warm-up from 0
    grad_clip: float = 1.0  # global gradient-norm clipping
    adam_beta1: float = 0.9  # AdamW (Megatron-Core's "adam", decoupled weight decay)
    adam_beta2: float = 0.95  # AdamW
    adam_eps: float = 1e-8  # AdamW
    # The model's dtype (the optimizer keeps fp32 master weights; the loss is fp32).
    precision: Precision = "bf16"
    fp8: Optional[Fp8Format] = None  # FP8 decoder GEMMs; needs Transformer Engine on Hopper
    fp8_recipe: Fp8Recipe = "delayed"  # Transformer Engine's FP8 scaling recipe
    # Megatron-Core DDP's gradient buffer (accumulation over micro-batches and the DP
    # reduce-scatter) in fp32, Megatron-LM's default for bf16 training; false keeps it in the
    # parameters' dtype (bf16): 2 bytes per parameter less and half the gradient traffic, at
    # the cost of bf16 accumulation (Megatron-Bridge's H100 perf recipes turn it off).
    grad_reduce_in_fp32: bool = True
    seed: int = 1234  # weight initialisation, data order, image decoding
    max_nonfinite_steps: int = 5  # consecutive NaN/Inf steps before the run saves and stops
    # Parts not trained (ablations): comma-separated subset of vision, connector, llm; "" trains
    # everything (MM1's SFT unfreezes the encoder and the LLM).
    freeze: str = ""
    # Hang watchdog (runtime/watchdog.py): a step that does not complete within this many
    # seconds writes every thread's stack to run_dir/hang/rank_N.txt and exits 75 (requeue).
    # 0: off. The first step and checkpoint saves / loads / evaluation get
    # `hang_timeout_slow_s` (0: 5 x hang_timeout_s); the process groups' collective timeout
    # is set just above that, so a hung collective cannot outlive the watchdog.
    hang_timeout_s: float = 0.0
    hang_timeout_slow_s: float = 0.0  # see hang_timeout_s


@dataclass
class CheckpointConfig:
    save_interval: int = 1000  # steps between saves (also saved on a stop request and at the end)
    keep_last: int = 3  # the newest saves kept (by when they were written)
    resume: bool = True  # resume from the latest checkpoint in run_dir when there is one
    # resume=false in a run_dir holding checkpoints is refused unless this is set: then the
    # old checkpoints are deleted when the new run starts.
    overwrite: bool = False
    # A new run (nothing to resume) starts from these model weights: a checkpoint directory
    # of any layout, e.g. one written by mm1-import-hf from CLIP + Llama weights.
    init_from: Optional[str] = None
    # Write checkpoints in the background (Megatron-Core's async dist_checkpointing): the
    # step loop waits only for the device-to-host copy; at most one save is in flight.
    async_save: bool = False
    # Each DP x CP rank writes an equal share of the tensors its data-parallel replicas hold
    # alike (Megatron-Core's FullyParallelSaveStrategyWrapper; Megatron-LM's
    # --ckpt-fully-parallel-save, on by default there). False: the first replica writes them
    # all and its ranks set the save's pace.
    fully_parallel_save: bool = True
    # Each DP x CP rank reads an equal share of what its replicas load alike and receives the
    # rest from them (FullyParallelLoadStrategyWrapper, Megatron-LM's
    # --ckpt-fully-parallel-load), where each rank would otherwise read it all: the optimizer
    # state is saved whole (`fully_reshardable`, so a checkpoint reshards), and Megatron-Core
    # recommends this with it. Resume and `init_from`.
    fully_parallel_load: bool = True


@dataclass
class LoggingConfig:
    log_interval: int = 10  # steps between console lines (rank 0)
    tensorboard: bool = True  # scalars under run_dir/tensorboard
    # Write run_dir/samples/dp_rank_N.jsonl: the global sample ids each step trained on (for
    # auditing data order and exact resume).
    sample_ids: bool = False


@dataclass
class EvalConfig:
    """In-training few-shot evaluation (mm1_megatron/evaluation): off while `tasks` is empty."""

    tasks: str = ""  # comma-separated JSONL task files (format: mm1_megatron/evaluation/tasks.py)
    interval: int = 1000  # steps between evaluations
    shots: str = "0,4"  # comma-separated in-context example counts
    limit: Optional[int] = 64  # examples per task (None: all)
    batch_size: int = 8  # prompts generated together
    seed: int = 0  # draws the in-context examples
    max_new_tokens: Optional[int] = None  # None: 20 captioning, 10 VQA, 8 choice, 4 yes/no
    # Zero-shot in the chat format (a fine-tuned model; the SFT presets set it): VQA, multiple
    # choice and yes/no tasks, as `mm1-eval --chat` scores them. Needs shots "0".
    chat: bool = False
    # Pipeline-parallel layouts cannot generate in the training processes (a decode step per
    # token would need the pipeline schedule): there, each due evaluation runs `mm1-eval` on
    # the next complete checkpoint in a side job, which logs the same eval/ scalars at that
    # checkpoint's step. This command prefix starts it (mm1-eval's arguments are appended):
    # "" runs it as a child of rank 0 (CPU runs, a spare GPU), one at a time, and the run
    # waits for it at the end; "sbatch --parsable slurm/eval.sh" submits a Slurm job.
    side_job: str = ""


@dataclass
class Config:
    preset: str = ""  # the preset this config was built from ("" for none)
    # Everything a run writes: checkpoints/, tensorboard/, config.yaml, hang reports.
    run_dir: str = "runs/default"
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

