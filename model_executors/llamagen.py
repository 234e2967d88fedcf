"""LlamaGen class-to-image GPT as a vLLM model (paged KV through vLLM `Attention`).

Reads like vLLM's llama.py with two LlamaGen specifics:
- 2D RoPE looked up by position: vLLM feeds position p = raster index + cls_token_num, and row p of
  LlamaGen's table rotates by (row, column) of that raster index. The class-token rows are zeros, as
  in LlamaGen's `precompute_freqs_cis_2d`, which zeroes the class token's query and key.
- Positions are raster positions, not sequence positions: ZipAR requests feed tokens out of raster
  order, and the plugin's runner then passes their raster positions and a `MaskedAttention`.
- Prompt ids >= codebook_size are class labels (see `llamagen_config.py`) and are embedded with the
  class table; sampling is confined to image codes by `compute_logits`.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from vllm_visual_ar.model_executors.decoder_blocks import RMSNorm, heads_per_rank
from vllm_visual_ar.model_executors.llamagen_config import LlamaGenConfig
from vllm_visual_ar.model_executors.masked_attention import MaskedAttention


def rope_2d_cos_sin(cfg: LlamaGenConfig) -> torch.Tensor:
    """[cls_token_num + grid^2, head_dim/2, 2] (cos, sin); see the module docstring."""
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_base ** (-torch.arange(0, half, 2, dtype=torch.float64)[: half // 2] / half)
    idx = torch.arange(cfg.image_grid ** 2)
    angles = torch.cat([(idx // cfg.image_grid)[:, None] * inv_freq, (idx % cfg.image_grid)[:, None] * inv_freq], -1)
    table = torch.stack([angles.cos(), angles.sin()], -1).float()
    return torch.cat([torch.zeros(cfg.cls_token_num, half, 2), table])


def apply_rope_2d(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x [T, heads * head_dim] (q and k side by side, as one slice of the fused qkv output), rotation
    [T, head_dim/2] complex: rotate interleaved pairs (x0, x1) as one complex product, a single
    kernel for q and k together (this runs in every layer of every step)."""
    t = x.shape[0]
    pairs = torch.view_as_complex(x.float().reshape(t, -1, rotation.shape[1], 2))
    return torch.view_as_real(pairs * rotation[:, None]).view(t, -1).type_as(x)


def kernel_head_dim(head_dim: int) -> int:
    """Attention kernels take a fixed set of head sizes; LlamaGen-3B's 100 is not one of them.
    Zero-padding q, k and v to a multiple of 16 leaves every score and output unchanged."""
    return head_dim if head_dim % 16 == 0 else head_dim + 16 - head_dim % 16


class LlamaGenAttention(nn.Module):
    def __init__(self, cfg: LlamaGenConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.head_dim = cfg.head_dim
        # This tensor-parallel rank's heads; the layers below split the weights the same way.
        self.num_heads, self.num_kv_heads = heads_per_rank(cfg.num_attention_heads, cfg.num_key_value_heads)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.wqkv = QKVParallelLinear(cfg.hidden_size, self.head_dim, cfg.num_attention_heads,
                                      cfg.num_key_value_heads, bias=False, prefix=f"{prefix}.wqkv")
        self.wo = RowParallelLinear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size, bias=False,
                                    prefix=f"{prefix}.wo")
        self.padded_head_dim = kernel_head_dim(self.head_dim)
        self.attn = Attention(self.num_heads, self.padded_head_dim, self.head_dim ** -0.5,
                              num_kv_heads=self.num_kv_heads, cache_config=vllm_config.cache_config,
                              prefix=f"{prefix}.attn")

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.padded_head_dim == self.head_dim:
            return x
        x = x.view(x.shape[0], -1, self.head_dim)
        return nn.functional.pad(x, (0, self.padded_head_dim - self.head_dim)).flatten(1)

    def forward(self, h: torch.Tensor, rotation: torch.Tensor, masked: MaskedAttention | None = None) -> torch.Tensor:
        qkv, _ = self.wqkv(h)
        qk = apply_rope_2d(qkv[:, : self.q_size + self.kv_size], rotation)
        q, k = qk[:, : self.q_size], qk[:, self.q_size:]
        v = qkv[:, self.q_size + self.kv_size:]
        q, k = self._pad(q), self._pad(k)
        out = self.attn(q, k, self._pad(v))
        if masked is not None:  # some requests decode out of raster order (ZipAR): re-attend their queries
            out = masked.apply(self.attn, q, k, out, self.num_heads, self.padded_head_dim, self.head_dim ** -0.5)
        if self.padded_head_dim != self.head_dim:
            out = out.view(out.shape[0], -1, self.padded_head_dim)[..., : self.head_dim].flatten(1)
        out, _ = self.wo(out)
        return out


class LlamaGenFeedForward(nn.Module):
    def __init__(self, cfg: LlamaGenConfig, prefix: str):
        super().__init__()
        # w1 (gate) and w3 (up) are fused into one matmul; see `load_weights`.
        self.w13 = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=False,
                                              prefix=f"{prefix}.w13")
        self.w2 = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=False, prefix=f"{prefix}.w2")
        self.act = SiluAndMul()

    def forward(self, x):
        x, _ = self.w13(x)
        x, _ = self.w2(self.act(x))
        return x


class LlamaGenBlock(nn.Module):
    def __init__(self, cfg: LlamaGenConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.attention = LlamaGenAttention(cfg, vllm_config, f"{prefix}.attention")
        self.feed_forward = LlamaGenFeedForward(cfg, f"{prefix}.feed_forward")
        self.attention_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x, rotation, masked=None):
        h = x + self.attention(self.attention_norm(x), rotation, masked)
        return h + self.feed_forward(self.ffn_norm(h))


class LlamaGenForClassToImage(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        cfg: LlamaGenConfig = vllm_config.model_config.hf_config
        if cfg.cls_token_num != 1:
            raise ValueError("LlamaGenForClassToImage serves class-conditional models (cls_token_num=1)")
        self.config = cfg
        self.tok_embeddings = VocabParallelEmbedding(cfg.codebook_size, cfg.hidden_size)
        self.cls_embedding = VocabParallelEmbedding(cfg.num_classes + 1, cfg.hidden_size)
        self.layers = nn.ModuleList(
            LlamaGenBlock(cfg, vllm_config, prefix=f"{prefix}layers.{i}") for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.output = ParallelLMHead(cfg.codebook_size, cfg.hidden_size, prefix=f"{prefix}output")
        self.logits_processor = LogitsProcessor(cfg.codebook_size)
        self.register_buffer("rope_cos_sin", rope_2d_cos_sin(cfg), persistent=False)
        # Set by the plugin's model runner for a forward that carries ZipAR requests, else None.
        self.masked_attention: MaskedAttention | None = None

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        k = self.config.codebook_size
        is_class = (input_ids >= k)[:, None]
        codes = self.tok_embeddings(input_ids.clamp(max=k - 1))
        labels = self.cls_embedding((input_ids - k).clamp(min=0))
        return torch.where(is_class, labels, codes)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        # Looked up once per step; every layer rotates its q and k by it.
        rotation = torch.view_as_complex(self.rope_cos_sin[positions])
        for layer in self.layers:
            h = layer(h, rotation, self.masked_attention)
        return self.norm(h)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.logits_processor(self.output, hidden_states)
        if logits is None:
            return None
        # Class and null-class ids are prompt-only: never sampled.
        pad = logits.new_full((logits.shape[0], self.config.vocab_size - logits.shape[1]), float("-inf"))
        return torch.cat([logits, pad], dim=-1)

    # LlamaGen checkpoint name -> (our parameter, shard id) for weights fused on our side.
    stacked_params_mapping = [(".feed_forward.w1.", ".feed_forward.w13.", 0),
                              (".feed_forward.w3.", ".feed_forward.w13.", 1)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "cls_embedding.embedding_table.weight":
                name = "cls_embedding.weight"
            for ckpt, ours, shard in self.stacked_params_mapping:
                if ckpt in name:
                    name = name.replace(ckpt, ours)
                    params[name].weight_loader(params[name], tensor, shard)
                    break
            else:
                if name not in params:
                    raise ValueError(f"unexpected LlamaGen weight {name!r}")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded
