"""Emu3's language model (Emu3-Gen, Emu3-Chat) as a vLLM model: a Llama-style decoder over one
vocabulary of text and visual tokens, with logits over the full vocabulary (visual tokens are not
masked; a sampler that wants image tokens only constrains them itself).

Architecture, as in the original release (baaivision/Emu3, emu3/mllm/modeling_emu3.py) and in
transformers' port (transformers/models/emu3/modeling_emu3.py, `Emu3TextModel`):
- pre-norm blocks: RMSNorm -> attention -> residual, RMSNorm -> SwiGLU MLP -> residual, final RMSNorm;
  the RMSNorm eps is `rms_norm_eps` (1e-5 in the release configs);
- attention with grouped KV heads (query head h reads KV head h // (heads / kv_heads), the
  `repeat_kv` expansion), scale head_dim**-0.5, head_dim = hidden_size // num_attention_heads;
  no bias in q/k/v/o or the MLP in the release (`Emu3Attention.__init__`, `Emu3MLP.__init__`;
  transformers reads `attention_bias` / `mlp_bias`, both False by default, honoured here);
- RoPE over the whole head, rotate-half ("neox") pairing, theta `rope_theta` (1e6 in the release),
  optional `rope_scaling` linear (positions / factor) or dynamic NTK. The release's dynamic variant
  (`Emu3DynamicNTKScalingRotaryEmbedding._set_cos_sin_cache`) and transformers' `dynamic_rope_update`
  only change the base once a sequence is longer than max_position_embeddings; vLLM's dynamic rope
  rescales at every length, so a dynamic config is served with the plain base and a context of at
  most max_position_embeddings;
- attention dropout and the release's residual/embedding dropout (`attention_dropout`, 0.1) act in
  training only;
- `lm_head` is a separate matrix unless the top-level config sets `tie_word_embeddings` (the release
  and transformers' `Emu3ForConditionalGeneration` tie only then; both default to False).

Weight layouts read by `load_weights`:
- original release (`Emu3ForCausalLM`): `model.embed_tokens`, `model.layers.N.self_attn.{q,k,v,o}_proj`,
  `model.layers.N.mlp.{gate,up,down}_proj`, `model.layers.N.{input,post_attention}_layernorm`,
  `model.norm`, `lm_head`;
- transformers' `Emu3ForConditionalGeneration` as saved by transformers 5: the same names under
  `model.text_model.` (instead of `model.`), `lm_head`, and the image tokenizer under `model.vqmodel.`;
- the same class as converted for the hub with transformers 4 (`text_model.model.*`,
  `text_model.lm_head`, `vqmodel.*`; transformers' conversion_mapping.py "emu3" entry renames these).
The VQ-VAE weights are the image decoder's, not the LM's, and are skipped.
"""
from __future__ import annotations


import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import (
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from vllm_visual_ar.model_executors.decoder_blocks import DecoderLM, DecoderStack, attend, heads_per_rank


def emu3_rope_parameters(cfg, max_model_len: int) -> dict:
    """The rope parameters to hand vLLM's `get_rope` (see the module docstring for dynamic)."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 1_000_000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": float(params["factor"])}
    if kind == "dynamic":
        if max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"Emu3 with dynamic rope scaling is served up to max_position_embeddings="
                f"{cfg.max_position_embeddings} tokens (within it the rope is unscaled); "
                f"pass max_model_len <= {cfg.max_position_embeddings}")
        return {"rope_type": "default", "rope_theta": theta}
    raise ValueError(f"unsupported Emu3 rope scaling {kind!r}")


# Checkpoint prefix -> ours, for each layout in the module docstring (None: not the LM's, skipped).
CHECKPOINT_PREFIXES = (
    ("model.vqmodel.", None),
    ("vqmodel.", None),
    ("model.text_model.", "model."),
    ("text_model.model.", "model."),
    ("text_model.lm_head.", "lm_head."),
    ("model.", "model."),
    ("lm_head.", "lm_head."),
)


def our_weight_name(name: str) -> str | None:
    """A checkpoint weight name in any of the three layouts -> the release's name, which is ours
    before q/k/v and gate/up are fused; None for the VQ-VAE's weights."""
    for ckpt, ours in CHECKPOINT_PREFIXES:
        if name.startswith(ckpt):
            return None if ours is None else ours + name[len(ckpt):]
    raise ValueError(f"unexpected Emu3 weight {name!r}")


class Emu3Attention(nn.Module):
    def __init__(self, cfg, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        total_heads, total_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.num_heads, self.num_kv_heads = heads_per_rank(total_heads, total_kv)
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // total_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, self.head_dim, total_heads, total_kv, bias=bias,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, cfg.hidden_size, bias=bias,
                                        prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(self.head_dim, max_position=vllm_config.model_config.max_model_len,
                                   is_neox_style=True,
                                   rope_parameters=emu3_rope_parameters(cfg, vllm_config.model_config.max_model_len))
        # vLLM's Attention maps query head h to KV head h // (num_heads // num_kv_heads), the same
        # grouping as `repeat_kv` in both Emu3 implementations.
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=vllm_config.cache_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, h: torch.Tensor, masked=None) -> torch.Tensor:
        qkv, _ = self.qkv_proj(h)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(attend(self.attn, q, k, v, masked, self.num_heads, self.head_dim))
        return out


class Emu3ForCausalLM(DecoderLM):
    """Served under the architecture names the plugin registers (see `plugin.register`): the
    release's `Emu3ForCausalLM`, and `Emu3GenForConditionalGeneration` for transformers' layout,
    whose own name `Emu3ForConditionalGeneration` vLLM already maps to its Transformers backend."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        # The release's config is flat; transformers' Emu3Config keeps the LM's under text_config,
        # which vLLM exposes as hf_text_config.
        cfg = vllm_config.model_config.hf_text_config
        self.config = cfg
        self.family = "Emu3"
        self.model = DecoderStack(cfg, f"{prefix}model", lambda p: Emu3Attention(cfg, vllm_config, p))
        self.tie_word_embeddings = bool(getattr(vllm_config.model_config.hf_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, prefix=f"{prefix}lm_head")
        self.logits_processor = LogitsProcessor(cfg.vocab_size)

    def checkpoint_name(self, name: str) -> str | None:
        return our_weight_name(name)
