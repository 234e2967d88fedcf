"""Configuration of a converted LlamaGen class-to-image model folder (`config.json`).

One vLLM vocabulary holds everything a prompt or an output can contain, because vLLM validates prompt
ids against `vocab_size` when the tokenizer is skipped:

    [0, codebook_size)                          image codes (the only ids that are ever sampled)
    codebook_size + c, c in [0, num_classes)    class-label prompt token for class c
    codebook_size + num_classes                 the null class (LlamaGen's CFG "unconditional" label)

A guided image is the prompt `[class_token(c)]` (cond) paired with `[null_class_token]` (uncond).
"""
from __future__ import annotations

from transformers import PretrainedConfig

ARCHITECTURE = "LlamaGenForClassToImage"
MODEL_TYPE = "llamagen"

# Official LlamaGen class-conditional sizes (autoregressive/models/gpt.py, GPT_models).
GPT_SIZES = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
}


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def llamagen_ffn_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """SwiGLU hidden size as LlamaGen's FeedForward computes it."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return find_multiple(hidden, multiple_of)


class LlamaGenConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        intermediate_size: int | None = None,
        codebook_size: int = 16384,
        num_classes: int = 1000,
        cls_token_num: int = 1,
        image_grid: int = 16,
        rope_base: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        vq: dict | None = None,
        image_size: int | None = None,
        default_guidance_scale: float = 4.0,
        default_top_k: int = 2000,
        class_names: list[str] | None = None,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size or llamagen_ffn_dim(hidden_size)
        self.codebook_size = codebook_size
        self.num_classes = num_classes
        self.cls_token_num = cls_token_num
        self.image_grid = image_grid
        self.rope_base = rope_base
        self.rms_norm_eps = rms_norm_eps
        self.vq = vq or {}
        self.image_size = image_size
        # Sampling defaults of this checkpoint; LlamaGen's sample_c2i.py uses cfg 4.0, top-k 2000.
        self.default_guidance_scale = default_guidance_scale
        self.default_top_k = default_top_k
        # Optional names of the classes, in class-id order (the HTTP endpoint accepts them as prompts).
        self.class_names = class_names
        kwargs["vocab_size"] = codebook_size + num_classes + 1
        # vLLM's sequence-length limit (KV slots per request), derived, never read from a file: the
        # class token and the image codes, plus room for ZipAR's stand-ins (fewer than one per row).
        # RoPE positions are raster positions, looked up in a table of cls_token_num + grid^2 rows.
        kwargs["max_position_embeddings"] = cls_token_num + image_grid * image_grid + image_grid
        kwargs.setdefault("architectures", [ARCHITECTURE])
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    # -- token layout -------------------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        return self.image_grid * self.image_grid

    @property
    def null_class_token(self) -> int:
        return self.codebook_size + self.num_classes

    def class_token(self, class_id: int) -> int:
        return self.codebook_size + class_id


def image_layout(config: LlamaGenConfig, size=None):
    """One resolution: grid x grid codes in raster order, code c is token id c; no row or image end."""
    from vllm_visual_ar.families import ImageLayout

    check_native_size(config, size)
    return ImageLayout(config.image_grid, config.image_grid, range(config.codebook_size))


def check_native_size(config, size) -> None:
    """Class-conditional models make one size: theirs."""
    if size is not None and tuple(size) != (config.image_size, config.image_size):
        raise ValueError(f"size {size[0]}x{size[1]} is not one this model makes: "
                         f"{config.image_size}x{config.image_size} only")
