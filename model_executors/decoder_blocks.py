"""The Llama-shaped pieces the text-to-image families share (Lumina-mGPT's Chameleon, Emu3): a
SiLU-gated MLP, a decoder layer around a family's own attention, the layer stack, and the weight
loading step for checkpoints whose q/k/v and gate/up matrices vLLM keeps fused, and the attention
heads a tensor-parallel rank holds and the RMSNorm (LlamaGen uses both too). Parameter names are
transformers' (`self_attn`, `mlp.gate_up_proj`, `input_layernorm`, ...), so checkpoints load by
name."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm as VllmRMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

# Checkpoint name part -> (our parameter name part, shard id) for the weights fused on our side.
FUSED_WEIGHTS = [(".self_attn.q_proj.", ".self_attn.qkv_proj.", "q"),
                 (".self_attn.k_proj.", ".self_attn.qkv_proj.", "k"),
                 (".self_attn.v_proj.", ".self_attn.qkv_proj.", "v"),
                 (".mlp.gate_proj.", ".mlp.gate_up_proj.", 0),
                 (".mlp.up_proj.", ".mlp.gate_up_proj.", 1)]


def heads_per_rank(total_heads: int, total_kv_heads: int) -> tuple[int, int]:
    """(query heads, KV heads) on this tensor-parallel rank, as QKVParallelLinear splits them: KV
    heads fewer than the ranks are replicated. ValueError when the heads do not split."""
    from vllm.distributed import get_tensor_model_parallel_world_size

    tp = get_tensor_model_parallel_world_size()
    if total_heads % tp or (total_kv_heads % tp if total_kv_heads >= tp else tp % total_kv_heads):
        raise ValueError(f"{total_heads} heads / {total_kv_heads} KV heads do not split over {tp} ranks")
    return total_heads // tp, max(1, total_kv_heads // tp)


class RMSNorm(VllmRMSNorm):
    """vLLM's RMSNorm (same weight, same loading) that runs vLLM's fused CPU kernel on CPU. vLLM's
    op dispatch picks that kernel on GPUs only and runs a chain of native ops on CPU, which in a
    small model's decode step costs as much as the matmuls (measured in the engine here: 33 us a
    call for 31 tokens of width 128, and the step's forward 15% faster with the kernel)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cpu_kernel = hasattr(torch.ops._C, "rms_norm")  # asked once, not on every call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._cpu_kernel or x.device.type != "cpu" or x.dtype != self.weight.dtype:
            return super().forward(x)
        out = torch.empty_like(x)
        torch.ops._C.rms_norm(out, x.contiguous(), self.weight.data, self.variance_epsilon)
        return out


class SiluGatedMLP(nn.Module):
    def __init__(self, cfg, prefix: str):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"MLP activation {cfg.hidden_act!r} is not supported (these families use silu)")
        bias = bool(getattr(cfg, "mlp_bias", False))
        # gate_proj and up_proj are fused into one matmul (FUSED_WEIGHTS).
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=bias,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=bias,
                                           prefix=f"{prefix}.down_proj")
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act(x))
        return x


class DecoderLayer(nn.Module):
    """Pre-norm (`x + attn(norm(x))`), or post-norm with `post_norm` (Chameleon's `swin_norm`:
    transformers `ChameleonSwinDecoderLayer` norms each branch's output before the residual add)."""

    def __init__(self, self_attn: nn.Module, cfg, prefix: str, post_norm: bool = False):
        super().__init__()
        self.post_norm = post_norm
        self.self_attn = self_attn
        self.mlp = SiluGatedMLP(cfg, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, masked=None) -> torch.Tensor:
        if self.post_norm:
            h = x + self.input_layernorm(self.self_attn(positions, x, masked))
            return h + self.post_attention_layernorm(self.mlp(h))
        h = x + self.self_attn(positions, self.input_layernorm(x), masked)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderStack(nn.Module):
    """embed_tokens, layers (each with the attention `attention(prefix)` builds), final norm."""

    def __init__(self, cfg, prefix: str, attention: Callable[[str], nn.Module], post_norm: bool = False):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            DecoderLayer(attention(f"{prefix}.layers.{i}.self_attn"), cfg, f"{prefix}.layers.{i}", post_norm)
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, masked=None) -> torch.Tensor:
        for layer in self.layers:
            h = layer(positions, h, masked)
        return self.norm(h)


def attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked, num_heads: int,
           head_dim: int) -> torch.Tensor:
    """vLLM's causal attention; then, for a forward with requests decoding out of raster order
    (ZipAR: `masked`, a `MaskedAttention`), their queries attended again under their mask."""
    out = attn(q, k, v)
    if masked is not None:
        out = masked.apply(attn, q, k, out, num_heads, head_dim, head_dim ** -0.5)
    return out


def load_weight(params: dict, name: str, tensor: torch.Tensor, what: str) -> str:
    """Load one checkpoint tensor (already renamed to our layout) into `params`, fusing q/k/v and
    gate/up; -> the parameter's name. An unknown name is a ValueError naming the family `what`."""
    for ckpt, ours, shard in FUSED_WEIGHTS:
        if ckpt in name:
            fused = name.replace(ckpt, ours)
            if fused not in params:
                raise ValueError(f"unexpected {what} weight {name!r}")
            params[fused].weight_loader(params[fused], tensor, shard)
            return fused
    if name not in params:
        raise ValueError(f"unexpected {what} weight {name!r}")
    getattr(params[name], "weight_loader", default_weight_loader)(params[name], tensor)
    return name


class DecoderLM(nn.Module):
    """A decoder-only LM over the full vocabulary (text and image tokens alike; nothing masked):
    a subclass builds `self.model` (a DecoderStack), `self.lm_head` (the embedding itself when tied)
    and `self.logits_processor`, and names its checkpoints' weights (`checkpoint_name`)."""

    family = "decoder"  # for error messages
    tie_word_embeddings = False
    # Set by the plugin's model runner for a forward whose queries see other than causally (ZipAR).
    masked_attention = None

    def checkpoint_name(self, name: str) -> str | None:
        """A checkpoint tensor's name -> our parameter name, or None to skip it."""
        return name

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        return self.model(positions, h, self.masked_attention)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for ckpt_name, tensor in weights:
            name = self.checkpoint_name(ckpt_name)
            if name is None or "rotary_emb.inv_freq" in name:  # RoPE tables are recomputed
                continue
            if name.startswith("lm_head.") and self.tie_word_embeddings:
                continue  # the embedding matrix is the head
            loaded.add(load_weight(params, name, tensor, self.family))
        if missing := set(params) - loaded:
            raise ValueError(f"{self.family} checkpoint lacks {sorted(missing)[:5]} ({len(missing)} weights)")
        return loaded
