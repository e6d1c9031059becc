"""MM1Model: ViT -> connector -> image tokens spliced into the decoder's embeddings.

The data pipeline expands every image into `connector.num_tokens` placeholder ids
(`llm.image_token_id`), so a row always has `data.seq_length` positions and the pipeline
schedule's tensor shapes are static. On the first pipeline stage the model encodes the
micro-batch's images (all rows' images, in row order), and writes the connector outputs over
the placeholder embeddings in that order. Later stages only run decoder layers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from mm1_megatron.model.connector import ConnectorParts
from mm1_megatron.model.language import LanguageParts
from mm1_megatron.model.vision import VisionParts, resize_vision_encoder


@dataclass(frozen=True)
class MM1Parts:
    """Everything MM1Model is built from, injected as LLaVAModel takes its parts: the
    language, vision and connector configs and specs, and the image-slot settings.
    `model/builder.py: mm1_parts` makes them from a run Config."""

    language: LanguageParts
    vision: VisionParts
    connector: ConnectorParts
    image_token_id: int  # the placeholder id the data pipeline writes for each image token
    # Images a row may hold, sub-images (tiling: an image's overview and tiles) counted.
    max_images_per_row: int
    # Packed rows as THD segments (Transformer Engine); the local spec takes the dense mask.
    packed_sequences: bool = False


# Module attributes Megatron-Core's layers copy from the config at build time (the list of
# megatron/core/transformer/utils.py: _init_sequence_parallel_cache, 0.16 and 0.19).
_SEQUENCE_PARALLEL_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel",
                            "reduce_scatter_embeddings")


class MM1Model(MegatronModule):
    """One pipeline stage's model chunk (`vp_stage`), built from injected `parts`:
    `pre_process` holds the embedding, encoder and connector, `post_process` the output layer.
    `model/builder.py: build_mm1_model` builds it from a run Config."""

    def __init__(self, parts: MM1Parts, pre_process: bool = True, post_process: bool = True,
                 vp_stage: Optional[int] = None):
        # Built (and initialised) in this order: decoder, encoder, connector; registered
        # encoder, connector, decoder (the order of the parameters, DDP buckets included).
        decoder = parts.language.build(pre_process, post_process, vp_stage=vp_stage)
        super().__init__(config=decoder.config)
        self.pre_process, self.post_process = pre_process, post_process
        self.image_token_id = parts.image_token_id
        self.tokens_per_image = parts.connector.num_tokens
        self.max_images_per_row = parts.max_images_per_row
        # The encoder and connector live on the first pipeline stage (its first chunk) only.
        self.vision = parts.vision.build() if pre_process else None
        self.connector = parts.connector.build() if pre_process else None
        self.language_model = decoder  # not `decoder`: schedules read that as a TransformerBlock
        self.image_size = parts.vision.image_size
        self.patch_size = parts.vision.patch_size
        self.class_token = parts.vision.class_token
        self.packed_sequences = parts.packed_sequences
        # Mixed precision as Megatron-Core's Float16Module does it: every module in the run's
        # dtype (the patch conv, norms and connector included, which torch creates in fp32),
        # float inputs cast on entry, fp32 out of the last stage. The loss is computed in fp32
        # and the optimizer keeps fp32 master weights.
        self.dtype = self.config.params_dtype
        if self.dtype != torch.float32:
            self.to(dtype=self.dtype)

    # finalize_model_grads looks these up on the module that has `pre_process` (this one) to
    # all-reduce a tied embedding between the first and last pipeline stage.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand a stage its input activations through this hook."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.language_model.set_input_tensor(input_tensor)

    def resize_images(self, image_size: int) -> None:
        """Take `image_size` inputs from now on (e.g. 672 px sub-images for high-res SFT):
        the ViT's and the connector's position tables are interpolated. Token count stays
        `connector.num_tokens` (the grid connectors pool adaptively; attn_pool has queries)."""
        resize_vision_encoder(self.vision, image_size)
        if hasattr(self.connector, "resize_position_grid"):
            self.connector.resize_position_grid(image_size // self.patch_size)
        self.image_size = image_size

    @contextlib.contextmanager
    def without_sequence_parallel(self) -> Iterator[None]:
        """Plain tensor parallelism inside the decoder (generation, held-out losses): a decode
        step feeds one token per row, which cannot be split over the TP ranks. Megatron-Core's
        own static-batch generation switches the same module attributes off
        (`set_model_to_sequence_parallel`, text_generation_controller.py), but switches them
        back on wholesale, which would turn on the embedding's scatter that our decoder keeps
        off (MM1Model scatters after splicing the images): each module's own value is
        restored here instead. A no-op without sequence parallelism."""
        if not self.config.sequence_parallel:
            yield
            return
        saved = [(module, attr, getattr(module, attr))
                 for module in self.language_model.modules() for attr in _SEQUENCE_PARALLEL_ATTRS
                 if hasattr(module, attr)]
        for module, attr, _ in saved:
            setattr(module, attr, False)
        self.config.sequence_parallel = False  # the decoder's config object, shared
        try:
            yield
        finally:
            self.config.sequence_parallel = True
            for module, attr, value in saved:
                setattr(module, attr, value)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, num_tokens, llm_hidden]."""
        features = self.vision(images.to(self.dtype))
        if self.class_token:
            features = features[:, 1:]  # the connectors work on the patch grid
        return self.connector(features)

    def _spliced_embeddings(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                            images: Optional[torch.Tensor]) -> torch.Tensor:
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
        slots = input_ids == self.image_token_id  # [b, s]
        num_images = 0 if images is None else images.shape[0]
        # Checked on the device, no host sync (reading the counts would stall a GPU every
        # micro-batch): the loader checks them on the host with row-level detail first.
        per_row = slots.sum(dim=1)
        limit = self.max_images_per_row * self.tokens_per_image
        torch._assert_async((per_row <= limit).all(), "a row holds more than "
                            f"data.max_images_per_sequence={self.max_images_per_row} images")
        torch._assert_async(per_row.sum() == num_images * self.tokens_per_image,
                            f"the batch's image placeholder tokens are not {num_images} images "
                            f"x {self.tokens_per_image} tokens")
        if num_images == 0:
            # Every rank must run the encoder: its TP collectives and the gradient
            # all-reduce would otherwise differ between ranks with and without images.
            blank = embeddings.new_zeros(1, 3, self.image_size, self.image_size)
            return embeddings + 0.0 * self.encode_images(blank).sum()
        return splice_image_tokens(embeddings, slots, self.encode_images(images))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None,
                images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None) -> torch.Tensor:
        """Returns per-token loss [b, s] when `labels` are given on the last stage, else the
        logits [b, s, V] (last stage) or hidden states (other stages).

        Attention over packed rows: `attention_mask` ([b, 1, s, s] bool, True = blocked), or
        the loader's `document_ids` [b, s] (turned into that mask: causal within each
        document, nothing across) and `cu_seqlens` / `max_seqlen` (the same documents as
        segment boundaries). Under Transformer Engine the rows run as one THD sequence cut at
        `cu_seqlens`: TE ignores a dense mask with its causal mask type (documents would see
        each other) and materialises s x s scores with an arbitrary one.
        """
        kwargs = self.language_inputs(input_ids, position_ids, attention_mask, images, labels,
                                      document_ids, cu_seqlens, max_seqlen)
        output = self.language_model(**kwargs)
        if kwargs.get("packed_seq_params") is not None and self.post_process:
            output = output.reshape(*input_ids.shape, *output.shape[2:])  # [1, b*s] -> [b, s]
        return output.float() if self.post_process else output

    def language_inputs(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                        attention_mask: Optional[torch.Tensor] = None,
                        images: Optional[torch.Tensor] = None,
                        labels: Optional[torch.Tensor] = None,
                        document_ids: Optional[torch.Tensor] = None,
                        cu_seqlens: Optional[torch.Tensor] = None,
                        max_seqlen: Optional[int] = None) -> dict:
        """The decoder's (GPTModel's) keyword arguments for this micro-batch."""
        thd = self.packed_sequences and cu_seqlens is not None
        decoder_input = None
        if self.pre_process:
            decoder_input = self._spliced_embeddings(input_ids, position_ids, images)
            if thd:  # [s, b, h] -> [b*s, 1, h]: the rows end to end, as cu_seqlens counts them
                decoder_input = decoder_input.transpose(0, 1).reshape(-1, 1,
                                                                      decoder_input.shape[-1])
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(
                    decoder_input)
        if thd:
            from megatron.core.packed_seq_params import PackedSeqParams

            flat = lambda t: None if t is None else t.reshape(1, -1)  # noqa: E731
            return dict(input_ids=flat(input_ids), position_ids=flat(position_ids),
                        attention_mask=None, decoder_input=decoder_input, labels=flat(labels),
                        packed_seq_params=PackedSeqParams(
                            qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                            max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen))
        if attention_mask is None and document_ids is not None:
            attention_mask = document_attention_mask(document_ids)
        return dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                    decoder_input=decoder_input, labels=labels)


def splice_image_tokens(embeddings: torch.Tensor, slots: torch.Tensor,
                        image_tokens: torch.Tensor) -> torch.Tensor:
    """[s, b, h] embeddings with the image tokens [n, k, h] written over the placeholder
    positions `slots` [b, s], in row order (row 0's images first)."""
    rows_first = embeddings.transpose(0, 1)  # [b, s, h]; masked_scatter fills in row order
    rows_first = rows_first.masked_scatter(slots.unsqueeze(-1),
                                           image_tokens.to(embeddings.dtype))
    return rows_first.transpose(0, 1).contiguous()


def document_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] document ids -> [b, 1, s, s] bool mask, True = blocked.

    Causal inside a document and nothing across documents, so a packed row behaves like its
    documents run separately. RoPE encodes relative offsets only, so within a document the
    scores equal those of the document alone (positions need not restart).
    """
    s = document_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)
    return ~(same_doc & causal).unsqueeze(1)
