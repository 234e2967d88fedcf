"""Attention with an explicit visibility mask over vLLM's paged KV cache, for the query tokens of
requests whose decoding order is not raster order (ZipAR).

vLLM's kernels are causal over each request's token order. A ZipAR request feeds tokens in
generation order but a query at raster index q must see exactly the tokens already in the cache
whose raster index is <= q (never a later row's tokens generated earlier, never a stand-in other
than itself). vLLM's layer still writes every token's key/value into its paged cache (slot
mapping, blocks and frees stay vLLM's); for the masked requests' queries this module then reads
their keys/values back through the block table and recomputes attention with the mask. The runner
(`vllm_visual_ar/worker.py`) builds one `MaskedAttention` per forward.

Reading the cache needs its layout, which belongs to the attention backend: the CPU backend keeps
each block's keys transposed ([head_dim, block_size]) and values as [block_size, head_dim];
FlashAttention-style backends keep [2, blocks, block_size, heads, head_dim]. The first read in
each layer is checked against the keys/values the layer just wrote, so an unknown layout fails
loudly instead of attending to garbage.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def read_paged_kv(layer, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """slots [...] (block * block_size + offset) -> keys, values [..., kv_heads, head_dim]."""
    cache = layer.kv_cache
    if isinstance(cache, (list, tuple)):
        cache = cache[0]
    backend = layer.attn_backend.get_name()
    if backend == "CPU_ATTN":
        blocks, heads, block_size, two_d = cache.shape
        d = two_d // 2
        per_block = cache.view(blocks, heads, 2, block_size * d)
        keys_t = per_block[:, :, 0].view(blocks, heads, d, block_size)
        values = per_block[:, :, 1].view(blocks, heads, block_size, d)
        b, o = slots // block_size, slots % block_size
        return keys_t[b, :, :, o], values[b, :, o]
    if cache.dim() == 5 and cache.shape[0] == 2:  # [2, blocks, block_size, kv_heads, head_dim]
        block_size = cache.shape[2]
        b, o = slots // block_size, slots % block_size
        return cache[0][b, o], cache[1][b, o]
    raise NotImplementedError(f"masked attention cannot read the KV cache of attention backend {backend} "
                              f"(shape {tuple(cache.shape)}); ZipAR needs CPU_ATTN or a FlashAttention-layout backend")


@dataclass
class MaskedAttention:
    query_index: torch.Tensor  # [B, Q] flat token index in the batch (padding repeats a valid one)
    query_valid: torch.Tensor  # [B, Q] bool
    query_slots: torch.Tensor  # [B, Q] KV slot each query token was written to
    key_slots: torch.Tensor    # [B, L] KV slots of each request's tokens, in sequence order (padding 0)
    mask: torch.Tensor         # [B, Q, L] bool, True = the query sees that key

    def apply(self, layer, q: torch.Tensor, k: torch.Tensor, out: torch.Tensor, num_heads: int,
              head_dim: int, scale: float) -> torch.Tensor:
        """q, k: this forward's [T, heads * head_dim] (as given to the vLLM layer); out: the layer's
        output [T, heads * head_dim], whose masked rows are replaced."""
        keys, values = read_paged_kv(layer, self.key_slots)  # [B, L, kv_heads, D]
        if not getattr(layer, "_masked_kv_layout_checked", False):
            written, _ = read_paged_kv(layer, self.query_slots[self.query_valid])
            fresh = k.view(k.shape[0], -1, head_dim)[self.query_index[self.query_valid]]
            if not torch.allclose(written.float(), fresh.float(), rtol=1e-2, atol=1e-2):
                raise RuntimeError(f"masked attention: the KV cache layout of {layer.attn_backend.get_name()} is "
                                   "not the one read_paged_kv assumes")
            layer._masked_kv_layout_checked = True
        b, nq = self.query_index.shape
        queries = q.view(q.shape[0], num_heads, head_dim)[self.query_index].transpose(1, 2)  # [B, H, Q, D]
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        if keys.shape[1] != num_heads:
            keys = keys.repeat_interleave(num_heads // keys.shape[1], 1)
            values = values.repeat_interleave(num_heads // values.shape[1], 1)
        o = F.scaled_dot_product_attention(queries, keys.to(queries.dtype), values.to(queries.dtype),
                                           attn_mask=self.mask[:, None], scale=scale)
        o = o.transpose(1, 2).reshape(b, nq, num_heads * head_dim)
        out = out.clone()
        out[self.query_index[self.query_valid]] = o[self.query_valid].to(out.dtype)
        return out
