"""The adapter contract: the only place that knows where a VLM family keeps its parts.

An adapter wraps a loaded transformers model and its processor and exposes the seams the generic
pipeline needs: inputs from (image, prompt), visual tokens with their layout, text embeddings, the
unpruned position ids, the decoder stack and the LM head. The pipeline owns the forward pass; no
transformers class is patched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vtprune.config import PruneConfig
from vtprune.errors import InputError, UnsupportedModelError
from vtprune.flops import TextDims
from vtprune.prune import VisualLayout


@dataclass
class VisualTokens:
    """One image's visual tokens as they enter the language model."""

    embeds: Tensor  # (B, N_v, D)
    layout: VisualLayout


@dataclass
class EncoderTokens:
    """One image's visual tokens read inside the vision encoder, for encoder methods (VisionZip).

    ``features`` are the feature layer's outputs before the projector; ``evidence`` packs, per token, the
    [CLS] token's attention at that layer (summed over heads) and the layer's head-averaged keys
    (``vtprune.prune.visionzip``). Both follow ``layout``'s visual-token order.
    """

    features: Tensor  # (B, N_v, C)
    evidence: Tensor  # (B, N_v, 1 + hd) fp32
    layout: VisualLayout


class VlmAdapter(ABC):
    """Base class; one subclass per VLM family, registered with ``@register_adapter``."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    hf_class: ClassVar[str]
    image_slot: ClassVar[str]  # what a raw prompt must contain where the image goes
    required_config_keys: ClassVar[tuple[str, ...]] = ("text_config", "vision_config")

    def __init__(self, model: nn.Module | None, processor: Any, path: Path, config: Any = None) -> None:
        """``model`` may be None for processing only (ONNX runtimes): then ``config`` is the HF config."""
        self.model = model.eval() if model is not None else None
        self.config = model.config if model is not None else config
        self.processor = processor
        self.path = path

    # --- loading -----------------------------------------------------------------------------
    @classmethod
    def load_model(cls, path: Path, dtype: torch.dtype, use_safetensors: bool) -> nn.Module:
        import transformers

        model_cls = getattr(transformers, cls.hf_class)
        return model_cls.from_pretrained(
            str(path), dtype=dtype, use_safetensors=use_safetensors, local_files_only=True, trust_remote_code=False
        )

    @classmethod
    @abstractmethod
    def load_processor(cls, path: Path) -> Any:
        ...

    # --- prompt and inputs -------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def format_prompt(self, question: str) -> str:
        """The checkpoint's chat template around one image and the question, else the family default."""
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if template:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return self.default_prompt(question)

    @abstractmethod
    def default_prompt(self, question: str) -> str:
        ...

    def check_prompt(self, prompt: str) -> None:
        if prompt.count(self.image_slot) != 1:
            found = prompt.count(self.image_slot)
            raise InputError(
                f"a raw prompt needs exactly one image slot {self.image_slot!r} (found {found}); "
                "add it where the image goes, or drop --raw-prompt to use the chat template"
            )

    @property
    def min_image_side(self) -> int:
        return self.patch_size

    @property
    def patch_size(self) -> int:
        return int(self.config.vision_config.patch_size)

    @abstractmethod
    def prepare(self, image: Any, prompt: str) -> dict[str, Tensor]:
        """Processor outputs for one image and a prompt that holds one image slot."""
        ...

    # --- model seams -------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @abstractmethod
    def encode_image(self, inputs: dict[str, Tensor]) -> VisualTokens:
        ...

    @property
    def encoder_refusal(self) -> str | None:
        """Why this model cannot run encoder methods (VisionZip), or None where ``encoder_tokens`` works."""
        return "this model family has no vision-encoder seam for it yet"

    def check_prune(self, cfg: PruneConfig) -> None:
        """Refuse a pruning config this family cannot run, with one actionable line."""
        if cfg.in_encoder and self.encoder_refusal is not None:
            raise UnsupportedModelError(
                f"--method {cfg.method} cannot run on {self.family}: {self.encoder_refusal}; "
                "use gprune, divprune, uniform or random (pre-LLM) or fastv, dart, alvts (in-LLM)"
            )

    def encoder_tokens(self, inputs: dict[str, Tensor]) -> EncoderTokens:
        """Pre-projector features and per-token encoder evidence of one image (encoder methods)."""
        raise UnsupportedModelError(f"{self.family}: {self.encoder_refusal}")

    def project(self, features: Tensor) -> Tensor:
        """The multimodal projector on pre-projector features: (B, K, C) -> (B, K, D)."""
        raise UnsupportedModelError(f"{self.family}: {self.encoder_refusal}")

    def fp32_islands(self, model: nn.Module) -> dict[str, nn.Module]:
        """Modules of ``model`` (this family's) that stay fp32 inside an fp16 export, by name."""
        return {}

    def export_image(self, image: Any) -> Any:
        """The image an export traces and validates its graphs with (a family with graphs fixed to one
        image grid resizes it to that grid)."""
        return image

    def position_ids(self, inputs: dict[str, Tensor]) -> Tensor:
        """Unpruned position ids of the whole prompt: (B, L) for 1-D RoPE."""
        ids = inputs["input_ids"]
        return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(input_ids)

    @property
    def decoder(self) -> nn.Module:
        """The decoder stack (embeddings in, final-norm hidden states out)."""
        return self.model.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def text_config(self) -> Any:
        return self.config.text_config

    def text_dims(self) -> TextDims:
        c = self.text_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return TextDims(
            layers=c.num_hidden_layers,
            hidden=c.hidden_size,
            intermediate=c.intermediate_size,
            heads=c.num_attention_heads,
            kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=head_dim,
            vocab=c.vocab_size,
        )

    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.text_config, self.config):
            eos = getattr(source, "eos_token_id", None)
            if eos is not None:
                ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
