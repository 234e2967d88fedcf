"""Lumina-mGPT's language model (the Chameleon decoder) as a vLLM model.

Lumina-mGPT's Hugging Face folders (e.g. Alpha-VLLM/Lumina-mGPT-7B-768) declare the architecture
`ChameleonXLLMXForConditionalGeneration` with `model_type: "chameleon"`; their config loads as
transformers' own `ChameleonConfig` and their weights carry the same names as transformers'
`ChameleonForConditionalGeneration` (`model.embed_tokens`, `model.layers.N.self_attn.{q,k,v,o}_proj`,
`...q_norm`/`k_norm`, `...mlp.{gate,up,down}_proj`, `...input_layernorm`,
`...post_attention_layernorm`, `model.norm`, `lm_head`, and the VQ encoder under `model.vqmodel`,
which image generation does not need and is skipped). Both layouts load here.

What is Chameleon-specific, and how it is matched:
- QK-norm: a LayerNorm over head_dim (no affine, eps 1e-5), then a per-head gamma/beta of shape
  [heads, head_dim] (transformers `ChameleonLayerNorm`). Lumina-mGPT's own modeling code keeps
  gamma/beta per model-parallel rank, [model_parallel_size, head_dim], and widens them in the
  forward with `repeat_interleave(heads // model_parallel_size, dim=0)`
  (lumina_mgpt/model/chameleon/modeling_chameleon.py, `ChameleonLayerNorm.repeat_param`), so its
  folders store [1, head_dim] at model_parallel_size 1. transformers' converter widens the same way
  (`convert_chameleon_weights_to_hf.py`: `.repeat_interleave(n_heads // num_shards, 0)`). `load_weights`
  therefore widens any stored [h', head_dim] by repeat_interleave(heads // h'): row r covers heads
  r * heads/h' ... (r + 1) * heads/h' - 1.
- RoPE: transformers' `rotate_half` (halves, not interleaved pairs) = vLLM's neox style; the
  converters permute q/k (and the qk-norm gamma/beta) into that layout.
- `swin_norm` (the 30B post-norm variant): `ChameleonSwinDecoderLayer` norms the outputs of
  attention and MLP before the residual add instead of their inputs.
- Logits over the full vocabulary. transformers' `ChameleonForConditionalGeneration.forward` sets
  image-token logits to the dtype's min (Lumina-mGPT's copy only when `config.mask_image_logits`);
  image generation samples image tokens, so nothing is masked here.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import (
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from vllm_visual_ar.model_executors.decoder_blocks import DecoderLM, DecoderStack, attend, heads_per_rank

QK_NORM_EPS = 1e-5  # hard-coded in both transformers' and Lumina-mGPT's ChameleonLayerNorm


def expand_per_rank(stored: torch.Tensor, total_heads: int) -> torch.Tensor:
    """A stored qk-norm gamma or beta [h', head_dim] (h' = model-parallel ranks of the training run,
    or already total_heads) -> [total_heads, head_dim]: rank r's row serves a contiguous block of
    total_heads / h' heads, i.e. repeat_interleave (see the module docstring)."""
    if stored.dim() == 1:
        stored = stored[None]
    rows = stored.shape[0]
    if total_heads % rows:
        raise ValueError(f"qk-norm parameter with {rows} rows cannot serve {total_heads} heads")
    return stored.repeat_interleave(total_heads // rows, dim=0)


class ChameleonQKNorm(nn.Module):
    """LayerNorm of each head's vector, then that head's own gamma/beta ([local heads, head_dim])."""

    def __init__(self, total_heads: int, local_heads: int, head_dim: int, first_head: int):
        super().__init__()
        self.total_heads, self.local_heads, self.head_dim = total_heads, local_heads, head_dim
        self.first_head = first_head  # this rank's first head among total_heads (tensor parallel)
        self.weight = nn.Parameter(torch.ones(local_heads, head_dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(local_heads, head_dim), requires_grad=False)
        for p in (self.weight, self.bias):
            p.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, stored: torch.Tensor) -> None:
        full = expand_per_rank(stored, self.total_heads)
        param.data.copy_(full[self.first_head: self.first_head + self.local_heads])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, local_heads * head_dim] -> same shape."""
        t = x.shape[0]
        x = x.reshape(t, self.local_heads, self.head_dim)
        x = F.layer_norm(x, (self.head_dim,), None, None, eps=QK_NORM_EPS)
        return (x * self.weight + self.bias).reshape(t, -1)


class ChameleonAttention(nn.Module):
    def __init__(self, cfg, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        self.total_heads, self.total_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.num_heads, self.num_kv_heads = heads_per_rank(self.total_heads, self.total_kv_heads)
        # As transformers' ChameleonAttention: head_dim = hidden_size // heads.
        self.head_dim = cfg.hidden_size // self.total_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, self.head_dim, self.total_heads, self.total_kv_heads,
                                          bias=bias, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(self.total_heads * self.head_dim, cfg.hidden_size, bias=bias,
                                        prefix=f"{prefix}.o_proj")
        # kv heads fewer than ranks are replicated: rank r holds kv head r // (tp / total_kv_heads),
        # as QKVParallelLinear loads them.
        kv_first = (rank * self.num_kv_heads if self.total_kv_heads >= tp
                    else rank // (tp // self.total_kv_heads))
        self.q_norm = ChameleonQKNorm(self.total_heads, self.num_heads, self.head_dim, rank * self.num_heads)
        self.k_norm = ChameleonQKNorm(self.total_kv_heads, self.num_kv_heads, self.head_dim, kv_first)
        self.rotary_emb = get_rope(self.head_dim, max_position=cfg.max_position_embeddings,
                                   is_neox_style=True, rope_parameters=cfg.rope_parameters)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=vllm_config.cache_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, h: torch.Tensor, masked=None) -> torch.Tensor:
        qkv, _ = self.qkv_proj(h)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # Norm before RoPE, as transformers' ChameleonAttention.forward.
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(attend(self.attn, q, k, v, masked, self.num_heads, self.head_dim))
        return out


class ChameleonXLLMXForConditionalGeneration(DecoderLM):
    """Chameleon decoder, text and image tokens alike; positions are plain 1D sequence positions."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        cfg = vllm_config.model_config.hf_config
        self.config = cfg
        self.family, self.tie_word_embeddings = "Chameleon", bool(cfg.tie_word_embeddings)

        def sub(name: str) -> str:
            return f"{prefix}.{name}" if prefix else name

        self.model = DecoderStack(cfg, sub("model"), lambda p: ChameleonAttention(cfg, vllm_config, p),
                                  post_norm=bool(getattr(cfg, "swin_norm", False)))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, prefix=sub("lm_head"))
        if cfg.tie_word_embeddings:  # transformers ties lm_head to embed_tokens then (`_tied_weights_keys`)
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(cfg.vocab_size)

    def checkpoint_name(self, name: str) -> str | None:
        # The image tokenizer (encoder) under model.vqmodel is not used to generate.
        return None if name.startswith("model.vqmodel.") else name
