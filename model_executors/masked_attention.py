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
FlashAttention-style backends keep [2, blocks, block_size, heads, head_dim] (FlashInfer: [blocks,
2, ...]). These GPU layouts are read on paper only (no GPU here). The first read in
each layer is checked against the keys/values the layer just wrote, so an unknown layout fails
loudly instead of attending to garbage.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def read_paged_tokens(layer, block: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of the cached tokens at (block [B, L], offset [B, L]) of the layer's paged
    cache -> keys, values [B, L, kv_heads, head_dim], one gather each (measured faster here than
    gathering whole blocks and reordering them)."""
    cache = layer.kv_cache
    if isinstance(cache, (list, tuple)):
        cache = cache[0]
    backend = layer.attn_backend.get_name()
    if backend == "CPU_ATTN":  # [blocks, kv_heads, block_size, 2 * head_dim], keys stored transposed
        num_blocks, heads, block_size, two_d = cache.shape
        d = two_d // 2
        per_block = cache.view(num_blocks, heads, 2, block_size * d)
        keys_t = per_block[:, :, 0].view(num_blocks, heads, d, block_size)
        values = per_block[:, :, 1].view(num_blocks, heads, block_size, d)
        return keys_t[block, :, :, offset], values[block, :, offset, :]
    if backend == "FLASHINFER" and cache.dim() == 5:  # [blocks, 2, block_size, kv_heads, head_dim]
        return cache[:, 0][block, offset], cache[:, 1][block, offset]
    if cache.dim() == 5 and cache.shape[0] == 2:  # [2, blocks, block_size, kv_heads, head_dim]
        return cache[0][block, offset], cache[1][block, offset]
    raise NotImplementedError(f"masked attention cannot read the KV cache of attention backend {backend} "
                              f"(shape {tuple(cache.shape)}); ZipAR needs CPU_ATTN or a FlashAttention-layout backend")


@dataclass
class MaskedAttention:
    query_index: torch.Tensor  # [B, Q] flat token index in the batch (padding repeats a valid one)
    query_valid: torch.Tensor  # [B, Q] bool
    query_pos: torch.Tensor    # [B, Q] position of each query token in its request's sequence
    mask: torch.Tensor         # [B, Q, length] bool, True = the query sees that position
    # Per KV cache group (a model whose layers keep KV in several groups has one block table each,
    # `vllm_visual_ar/phase_kv.py`): each request's blocks in order [B, n] (padding: any block,
    # masked), and the group of each attention layer by name (absent: group 0).
    key_blocks: list[torch.Tensor]
    group_of_layer: dict[str, int]

    def __post_init__(self):
        self._slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cached_slots(self, layer, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) [B, length] of every key position in the layer's group's cache (found once
        per group and forward, shared by its layers); past a request's length they point at slots the
        mask hides."""
        group = self.group_of_layer.get(getattr(layer, "layer_name", None), 0)
        if group not in self._slots:
            blocks = self.key_blocks[group]
            length = self.mask.shape[-1]
            if blocks.shape[1] * block_size < length:
                raise RuntimeError("masked attention: KV cache block size differs from the block table's")
            position = torch.arange(length, device=blocks.device)
            self._slots[group] = (blocks[:, position // block_size], (position % block_size).expand(len(blocks), -1))
        return self._slots[group]

    def apply(self, layer, q: torch.Tensor, k: torch.Tensor, out: torch.Tensor, num_heads: int,
              head_dim: int, scale: float) -> torch.Tensor:
        """q, k: this forward's [T, heads * head_dim] (as given to the vLLM layer); out: the layer's
        output [T, heads * head_dim], whose masked rows are replaced (in place). The requests'
        history is gathered token by token from the paged cache and attended by PyTorch's fused
        attention under the mask."""
        cache = layer.kv_cache[0] if isinstance(layer.kv_cache, (list, tuple)) else layer.kv_cache
        block, offset = self._cached_slots(layer, _block_size(layer, cache))
        keys, values = read_paged_tokens(layer, block, offset)  # [B, L, kv_heads, D]
        b, kv_heads = keys.shape[0], keys.shape[2]
        if not getattr(layer, "_masked_kv_layout_checked", False):
            rows = torch.arange(b, device=keys.device)[:, None].expand_as(self.query_pos)[self.query_valid]
            written = keys[rows, self.query_pos[self.query_valid]]
            fresh = k.view(k.shape[0], -1, head_dim)[self.query_index[self.query_valid]]
            if not torch.allclose(written.float(), fresh.float(), rtol=1e-2, atol=1e-2):
                raise RuntimeError(f"masked attention: the KV cache layout of {layer.attn_backend.get_name()} is "
                                   "not the one read_paged_tokens assumes")
            layer._masked_kv_layout_checked = True
        queries = q.view(q.shape[0], num_heads, head_dim)[self.query_index].transpose(1, 2)  # [B, H, Q, D]
        o = torch.nn.functional.scaled_dot_product_attention(
            queries.to(keys.dtype), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=self.mask[:, None],
            scale=scale, enable_gqa=kv_heads != num_heads)
        valid = self.query_valid
        out[self.query_index[valid]] = o.transpose(1, 2)[valid].reshape(-1, num_heads * head_dim).to(out.dtype)
        return out


def _block_size(layer, cache: torch.Tensor) -> int:
    """Tokens per block of a layer's paged cache, in the layouts `read_paged_tokens` reads."""
    if layer.attn_backend.get_name() == "CPU_ATTN":
        return cache.shape[2]
    return cache.shape[2] if cache.shape[0] == 2 or layer.attn_backend.get_name() == "FLASHINFER" else cache.shape[1]


def masked_attention_for(runner, rows) -> MaskedAttention:
    """A MaskedAttention for some requests of the runner's current batch. rows: [(batch row,
    visible)], where visible(q, kv) maps the query positions q [n] (this forward's tokens of the
    request) and the key positions kv [length] (everything cached, this forward's included) to a
    bool [n, length] mask (True = seen)."""
    batch = runner.input_batch
    qsl = runner.query_start_loc.np
    computed = batch.num_computed_tokens_cpu
    fed = [int(qsl[row + 1] - qsl[row]) for row, _ in rows]
    lengths = [int(computed[row]) + n for (row, _), n in zip(rows, fed)]
    nq, longest, b = max(fed), max(lengths), len(rows)
    query_index = np.zeros((b, nq), dtype=np.int64)
    query_valid = np.zeros((b, nq), dtype=bool)
    query_pos = np.zeros((b, nq), dtype=np.int64)
    mask = np.zeros((b, nq, longest), dtype=bool)
    mask[:, :, 0] = True  # padding queries attend to something (their output is dropped)
    for i, ((row, visible), n, length) in enumerate(zip(rows, fed, lengths)):
        start = int(qsl[row])
        query_index[i, :n] = np.arange(start, start + n)
        query_index[i, n:] = start
        query_valid[i, :n] = True
        query_pos[i, :n] = np.arange(length - n, length)
        mask[i, :n, :length] = np.asarray(visible(np.arange(length - n, length), np.arange(length)))
    key_blocks = []
    for table in batch.block_table.block_tables:  # one per KV cache group
        bs = table.block_size
        blocks = np.zeros((b, (longest + bs - 1) // bs), dtype=np.int64)
        for i, ((row, _), length) in enumerate(zip(rows, lengths)):
            used = (length + bs - 1) // bs
            blocks[i, :used] = table.block_table.np[row, :used]
        key_blocks.append(torch.from_numpy(blocks).to(runner.device))
    groups = runner.kv_cache_config.kv_cache_groups
    group_of_layer = {name: g for g, group in enumerate(groups) for name in group.layer_names}
    return MaskedAttention(*(torch.from_numpy(a).to(runner.device) for a in (query_index, query_valid, query_pos, mask)),
                           key_blocks, group_of_layer)
