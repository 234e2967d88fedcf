"""Plain-PyTorch LlamaGen class-to-image GPT and its generate loop: the test oracle and speed baseline.

Written independently of the vLLM model class (`llamagen.py`) on purpose: 2D RoPE in complex form,
a static KV cache and an explicit boolean mask, as in LlamaGen's `autoregressive/models/gpt.py` and
`generate.py` (and gpt-fast). Parameter names are LlamaGen's, so one state dict serves both. The
same module also trains the embedded model (`scripts/train_embedded.py`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from vllm_visual_ar.model_executors.llamagen_config import LlamaGenConfig
from vllm_visual_ar.samplers.coupling import coupled_draw
from vllm_visual_ar.samplers.sampling import cfg_mix, sample, target_probs


def rope_2d_table(cfg: LlamaGenConfig) -> torch.Tensor:
    """Complex rotations [cls_token_num + grid^2, head_dim/2].

    LlamaGen (`precompute_freqs_cis_2d`): the first head_dim/4 frequency pairs rotate by the row
    index, the next head_dim/4 by the column index (base^(2i/(head_dim/2))). The class-token prefix
    gets rows of zeros (cos = sin = 0), which zeroes its query and key: a quirk of the original
    checkpoints that the model must reproduce.
    """
    half = cfg.head_dim // 2
    freqs = 1.0 / (cfg.rope_base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    t = torch.arange(cfg.image_grid).float()
    row = torch.outer(t, freqs)[:, None, :].expand(-1, cfg.image_grid, -1)
    col = torch.outer(t, freqs)[None, :, :].expand(cfg.image_grid, -1, -1)
    angles = torch.cat([row, col], dim=-1).reshape(cfg.image_grid ** 2, half)
    rot = torch.polar(torch.ones_like(angles), angles)
    return torch.cat([torch.zeros(cfg.cls_token_num, half, dtype=rot.dtype), rot])


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] rotated pairwise (interleaved) by rot [S, D/2] complex."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot[None, :, None, :]).flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.wqkv = nn.Linear(cfg.hidden_size, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        self.k_cache: torch.Tensor | None = None  # [B, H_kv, S_max, D]
        self.v_cache: torch.Tensor | None = None

    def forward(self, x, rot, mask, input_pos=None):
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], -1)
        q = apply_rope(q.view(b, s, self.n_head, self.head_dim), rot).transpose(1, 2)
        k = apply_rope(k.view(b, s, self.n_kv_head, self.head_dim), rot).transpose(1, 2)
        v = v.view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
        if input_pos is not None:  # static cache: write at the given positions, attend to all of it
            self.k_cache[:b, :, input_pos] = k
            self.v_cache[:b, :, input_pos] = v
            k, v = self.k_cache[:b], self.v_cache[:b]
        rep = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rot, mask, input_pos=None):
        h = x + self.attention(self.attention_norm(x), rot, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.embedding_table = nn.Embedding(cfg.num_classes + 1, cfg.hidden_size)  # last row: null class


class LlamaGenReference(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.config = cfg
        self.cls_embedding = LabelEmbedder(cfg)
        self.tok_embeddings = nn.Embedding(cfg.codebook_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.codebook_size, bias=False)
        self.register_buffer("rope", rope_2d_table(cfg), persistent=False)

    # -- full-sequence forward (training, and the logits oracle) --------------------------------
    def forward(self, labels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """labels [B] (num_classes = null), codes [B, S] -> logits [B, 1 + S, codebook_size].

        Row j predicts image code j (teacher forcing: the input is [class, code_0..code_{S-1}])."""
        h = torch.cat([self.cls_embedding.embedding_table(labels)[:, None], self.tok_embeddings(codes)], 1)
        n = h.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
        for layer in self.layers:
            h = layer(h, self.rope[:n], mask)
        return self.output(self.norm(h)).float()

    # -- KV-cached inference ---------------------------------------------------------------------
    def setup_cache(self, batch: int, dtype=None, device="cpu", max_len: int | None = None):
        cfg = self.config
        dtype = dtype or self.output.weight.dtype  # the weights' (a bfloat16 model keeps a bfloat16 cache)
        max_len = max_len or cfg.cls_token_num + cfg.num_image_tokens
        for layer in self.layers:
            att = layer.attention
            shape = (batch, att.n_kv_head, max_len, att.head_dim)
            att.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            att.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.causal_mask = torch.ones(max_len, max_len, dtype=torch.bool, device=device).tril()

    def copy_cache(self, source: int, target: int) -> None:
        """Every layer's cached key/value at slot `source` copied to slot `target` (an accepted tree
        node's entry moved onto the chain's slot for its position)."""
        for layer in self.layers:
            att = layer.attention
            att.k_cache[:, :, target] = att.k_cache[:, :, source]
            att.v_cache[:, :, target] = att.v_cache[:, :, source]

    def step(self, h: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Embedded inputs h [B, S, D] at positions input_pos [S] -> logits of the last position [B, V]."""
        return self.step_masked(h, input_pos, self.causal_mask[None, None, input_pos])[:, -1]

    def step_masked(self, h: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor,
                    rope_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Write the inputs' keys/values at cache slots input_pos, attend with mask [1, 1, S, max_len]
        (True = visible) -> logits of every input [B, S, V]. rope_pos: the inputs' positions when
        they are not their cache slots."""
        rot = self.rope[input_pos if rope_pos is None else rope_pos]
        for layer in self.layers:
            h = layer(h, rot, mask, input_pos)
        return self.output(self.norm(h)).float()


@dataclass
class ReferenceResult:
    codes: torch.Tensor  # [N, grid*grid] raster order
    forward_passes: int
    seconds: float
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def generate(model: LlamaGenReference, classes: list[int], guidance_scale: float = 4.0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None, coupled_seeds: list[int] | None = None) -> ReferenceResult:
    """LlamaGen's c2i generate loop: batch [cond; uncond], prefill the class token, then one token
    per forward, guidance `uncond + s(cond - uncond)` at every step, one sample shared by both halves.
    guidance_scale == 1 runs a single (cond) stream, as the engine does. `coupled_seeds` (one per
    image): draw by coupled noise (`samplers/coupling.py`) instead of from `generator`."""
    cfg = model.config
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    labels = torch.tensor(classes, device=device)
    guided = guidance_scale != 1.0
    n = len(classes)
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])
    model.setup_cache(labels.shape[0], device=device)

    def next_token(logits, position):
        if guided:
            logits = cfg_mix(logits[:n], logits[n:], guidance_scale)
        if coupled_seeds is None:
            return sample(logits, temperature, top_k, top_p, generator)
        return coupled_draw(target_probs(logits, temperature, top_k, top_p), coupled_seeds,
                            [position] * len(coupled_seeds))

    pos = torch.arange(cfg.cls_token_num, device=device)
    h = model.cls_embedding.embedding_table(labels)[:, None]
    token = next_token(model.step(h, pos), 0)
    codes = [token]
    for i in range(cfg.num_image_tokens - 1):
        pos = torch.tensor([cfg.cls_token_num + i], device=device)
        x = torch.cat([token, token]) if guided else token
        token = next_token(model.step(model.tok_embeddings(x)[:, None], pos), i + 1)
        codes.append(token)
    return ReferenceResult(torch.stack(codes, 1), cfg.num_image_tokens, time.perf_counter() - t0)


@torch.no_grad()
def guided_targets(logits: torch.Tensor, guided: bool, guidance_scale: float, temperature: float, top_k: int,
                   top_p: float) -> torch.Tensor:
    """A [cond; uncond] batch's logits [B, S, V] -> the target distributions [S, V]: guidance mixed,
    then the sampling filters (what the verifying loops test their drafts against)."""
    mixed = cfg_mix(logits[0], logits[1], guidance_scale) if guided else logits[0]
    return target_probs(mixed, temperature, top_k, top_p)


def generate_sjd(model: LlamaGenReference, label: int, window: int, guidance_scale: float = 4.0,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, init: str = "horizontal",
                 continued: bool = False, candidates: int = 1) -> ReferenceResult:
    """Speculative Jacobi Decoding for one image over the static cache, the plain loop the engine's
    SJD runs (`samplers/sjd.py`; the authors' LlamaGen solver, `llamagen/llamagen_solver.py` in
    tyshiwo1/Accelerating-T2I-AR-with-SJD): each forward feeds the last committed token and up to
    window - 1 drafts at the next positions under the causal mask, verifies them (`sjd.verify`) and
    carries the samples past a rejection as the next drafts. The last committed token is always a
    fresh sample, so the next forward starts there: every cache slot before it holds a token fed
    with its true context, and the slots after it are overwritten.

    candidates > 1: a two-level draft tree, SJD-PAC's proactive drafting cut to its first level
    (the oracle for the engine's `draft_candidates`). The first draft, when it was sampled (carried with a
    real q), gets up to candidates - 1 siblings drawn from the same q without replacement
    (`sjd.draw_candidates`), fed at its position in cache slots past the image, each seeing the
    committed tokens and itself; the chain continues after the first draft only. The position is
    verified by the multi-candidate rule (`sjd.verify_candidates`); an accepted sibling commits
    itself and a sample of the target its own output gives, and its cache entry is copied onto its
    position's slot (SJD-PAC compacts the winning path's KV the same way); the chain's later
    samples are carried as plain SJD carries them (with `continued`, SJD-PAC's rule: the chain's
    drafts kept where they pass against this forward's targets, `sjd.continued_carry`)."""
    from vllm_visual_ar.samplers.sjd import Drafts, draw_candidates, fill_drafts, verify, verify_with_siblings

    cfg = model.config
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    prefix, total, v = cfg.cls_token_num, cfg.num_image_tokens, cfg.codebook_size
    guided = guidance_scale != 1.0
    labels = torch.tensor([label] + ([cfg.num_classes] if guided else []), device=device)
    sibling_slots = torch.arange(prefix + total, prefix + total + candidates - 1, device=device)
    model.setup_cache(len(labels), device=device, max_len=prefix + total + candidates - 1)

    targets = partial(guided_targets, guided=guided, guidance_scale=guidance_scale, temperature=temperature,
                      top_k=top_k, top_p=top_p)

    logits = model.step(model.cls_embedding.embedding_table(labels)[:, None], torch.arange(prefix, device=device))
    mixed = cfg_mix(logits[:1], logits[1:], guidance_scale) if guided else logits
    codes = [int(sample(mixed, temperature, top_k, top_p, generator)[0])]
    carried, forwards, verified, accepted = Drafts.empty(v), 1, 0, 0
    while len(codes) < total:
        k = min(window, total - len(codes))
        drafts = fill_drafts(carried, k - 1, init, v, codes[-1], len(codes), cfg.image_grid, generator, device)
        siblings = draw_candidates(drafts.q[0], drafts.tokens[0], candidates, generator) if k > 1 < candidates else []
        fed = torch.tensor([codes[-1]] + drafts.tokens + siblings, device=device)[None].expand(len(labels), -1)
        pos = torch.arange(prefix + len(codes) - 1, prefix + len(codes) - 1 + k, device=device)
        mask = model.causal_mask[pos]
        if siblings:  # at the first draft's position, in their own slots: see the committed tokens and x0
            own = sibling_slots[: len(siblings)]
            seen = model.causal_mask[pos[:1]].expand(len(siblings), -1).clone()
            seen[torch.arange(len(siblings), device=device), own] = True
            mask, pos = torch.cat([mask, seen]), torch.cat([pos, own])
        rope = torch.cat([pos[:k], pos[1:2].expand(len(siblings))])
        p = targets(model.step_masked(model.tok_embeddings(fed), pos, mask[None, None], rope))
        if not siblings:
            committed, carried = verify(p, drafts, generator, continued=continued)
        else:
            committed, carried, sibling = verify_with_siblings(p[:k], p[k:], drafts, siblings, generator, continued)
            if sibling is not None:  # its cache entry, at its position
                model.copy_cache(int(sibling_slots[sibling]), int(pos[1]))
        forwards, verified, accepted = forwards + 1, verified + k - 1, accepted + len(committed) - 1
        codes += committed
    return ReferenceResult(torch.tensor([codes], device=device), forwards, time.perf_counter() - t0,
                           {"drafts": (verified, accepted)})


@torch.no_grad()
def generate_zipar(model: LlamaGenReference, classes: list[int], window: int, guidance_scale: float = 4.0,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   generator: torch.Generator | None = None) -> ReferenceResult:
    """ZipAR row-parallel decoding with an explicit attention mask: the oracle for the engine's ZipAR.

    The loop is the authors' (`LlamaGen-ZipAR/autoregressive/models/generate_zipar.py`): a static
    cache indexed by raster slot, row 0 in raster order, row r+1 (r >= 1) started once row r has
    `window` tokens by a stand-in (a copy of row r-1's latest token) fed at the slot of (r, W-1),
    and row r's true last token fed for its key/value when it arrives. It differs from the authors'
    code where the masked semantics differ from theirs: a query at slot q sees the slots <= q that
    hold a real token already fed, never an empty slot (theirs: zero K/V there) and never a stand-in
    other than itself (theirs: the stand-in until it is overwritten).
    """
    from vllm_visual_ar.samplers.zipar import check_window

    cfg = model.config
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    height = width = cfg.image_grid
    w = min(check_window(window), width)
    prefix = cfg.cls_token_num
    n, guided = len(classes), guidance_scale != 1.0
    labels = torch.tensor(classes, device=device)
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])
    model.setup_cache(labels.shape[0], device=device)
    slots = prefix + cfg.num_image_tokens
    written = torch.zeros(slots, dtype=torch.bool, device=device)  # slot holds a real, fed token
    written[:prefix] = True
    codes = torch.full((n, cfg.num_image_tokens), -1, dtype=torch.long, device=device)
    count = [0] * height

    def sample_rows(logits: torch.Tensor, rows: list[int]) -> None:
        for j, row in enumerate(rows):  # logits [B, len(rows), V]
            lg = logits[:, j]
            if guided:
                lg = cfg_mix(lg[:n], lg[n:], guidance_scale)
            codes[:, row * width + count[row]] = sample(lg, temperature, top_k, top_p, generator)
            count[row] += 1

    forwards = 1
    sample_rows(model.step(model.cls_embedding.embedding_table(labels)[:, None],
                           torch.arange(prefix, device=device))[:, None], [0])
    while count[-1] < width:
        # (slot, token ids [n], row whose next token this input predicts or None, real token?)
        inputs: list[tuple[int, torch.Tensor, int | None, bool]] = []
        for row in range(height):
            if count[row] == 0:
                break
            col = count[row] - 1
            slot = prefix + row * width + col
            if written[slot]:
                continue  # finished row, last token already fed
            if col < width - 1:
                target = row
            elif row + 1 < height and count[row + 1] == 0:
                target = row + 1
            else:
                target = None
            inputs.append((slot, codes[:, row * width + col], target, True))
        bottom = max(r for r in range(height) if count[r] > 0)
        if w < width and 1 <= bottom < height - 1 and count[bottom] == w and count[bottom + 1] == 0:
            above = bottom - 1
            inputs.append((prefix + bottom * width + width - 1, codes[:, above * width + count[above] - 1],
                           bottom + 1, False))
        pos = torch.tensor([s for s, *_ in inputs], device=device)
        visible = written.clone()
        for s, _, _, real in inputs:
            visible[s] |= real
        mask = visible[None, :] & (torch.arange(slots, device=device)[None, :] <= pos[:, None])
        mask[torch.arange(len(inputs), device=device), pos] = True  # a stand-in sees itself
        tokens = torch.stack([t for _, t, _, _ in inputs], 1)
        tokens = torch.cat([tokens, tokens]) if guided else tokens
        logits = model.step_masked(model.tok_embeddings(tokens), pos, mask[None, None])
        predicting = [j for j, (_, _, target, _) in enumerate(inputs) if target is not None]
        sample_rows(logits[:, predicting], [inputs[j][2] for j in predicting])
        written = visible
        forwards += 1
    return ReferenceResult(codes, forwards, time.perf_counter() - t0)


@torch.no_grad()
def generate_zipar_sjd(model: LlamaGenReference, label: int, window: int, sjd_window: int,
                       guidance_scale: float = 4.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       generator: torch.Generator | None = None, init: str = "horizontal",
                       continued: bool = False) -> ReferenceResult:
    """ZipAR x SJD for one image: the oracle for the engine's `samplers/zipar_sjd.py`, written from its
    rules (module doc there) over a KV cache in feeding order with an explicit mask.

    Each forward feeds what the previous one committed (and a stand-in when a row starts), then for
    every started, unfinished row the drafts of its next columns, at most `sjd_window` - 1, within
    the row. A row's head is its latest code, else its stand-in, else (hand-over) the row above's last
    code. Each row's chain is verified as one SJD window, of which the codes up to the column the
    row above allows (its codes less `window`) are committed, the rest carried (`sjd.verify_prefix`).
    Committed tokens keep their cache slots; the drafts' slots are reused by the next forward."""
    from vllm_visual_ar.samplers.sjd import Drafts, verify_prefix

    cfg = model.config
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    height = width = cfg.image_grid
    w, k, v = min(window, width), sjd_window, cfg.codebook_size
    prefix = cfg.cls_token_num
    guided = guidance_scale != 1.0
    labels = torch.tensor([label] + ([cfg.num_classes] if guided else []), device=device)
    capacity = prefix + 2 * height * width + height
    model.setup_cache(len(labels), device=device, max_len=capacity)

    targets = partial(guided_targets, guided=guided, guidance_scale=guidance_scale, temperature=temperature,
                      top_k=top_k, top_p=top_p)

    h = model.cls_embedding.embedding_table(labels)[:, None]
    logits = model.step(h, torch.arange(prefix, device=device))[:, None]
    mixed = cfg_mix(logits[:1, 0], logits[1:, 0], guidance_scale) if guided else logits[:1, 0]
    code = {0: int(sample(mixed, temperature, top_k, top_p, generator)[0])}  # raster index -> code
    count, started = [1] + [0] * (height - 1), [True] + [False] * (height - 1)
    slot_raster, slot_stand_in = [-1] * prefix, [False] * prefix  # per kept cache slot
    pending = [(0, code[0], False)]  # (raster, token, stand-in) fed by the next forward
    carried = {r: Drafts.empty(v) for r in range(height)}
    forwards, verified, accepted = 1, 0, 0
    while count[-1] < width:
        fed = list(pending)
        draft_rows: list[int] = []
        chains = []  # (row, index of the head in fed, first column, drafts)
        for r in range(height):
            if not started[r] or count[r] == width:
                continue
            c = count[r]
            if c > 0:
                head = next(i for i, (ras, _, si) in enumerate(pending) if ras == r * width + c - 1 and not si)
            else:
                head = next((i for i, (ras, _, si) in enumerate(pending) if si and ras == r * width - 1),
                            None)
                if head is None:
                    head = next(i for i, (ras, _, si) in enumerate(pending) if ras == r * width - 1)
            limit = width - 1 if r == 0 or count[r - 1] == width else count[r - 1] - w
            assert c <= limit
            n = min(k - 1, width - 1 - c)
            tokens = list(carried[r].tokens[:n])
            q = carried[r].q[:n]
            while len(tokens) < n:
                col = c + len(tokens)
                if init == "random":
                    tokens.append(int(torch.randint(v, (1,), generator=generator, device=device)))
                else:
                    tokens.append(tokens[-1] if tokens else code[r * width + col - 1] if col > 0
                                  else code[(r - 1) * width])
            fresh = torch.nn.functional.one_hot(torch.tensor(tokens[len(q):], dtype=torch.long, device=device), v)
            drafts = Drafts(tokens, torch.cat([q.to(device), fresh.float()]))
            chains.append((r, head, c, drafts, len(fed), limit - c + 1))
            fed += [(r * width + c + i, t, False) for i, t in enumerate(tokens)]
            draft_rows += [r] * n
        kept = len(slot_raster)
        p = len(pending)
        raster = torch.tensor(slot_raster + [ras for ras, _, _ in fed])
        stand_in = torch.tensor(slot_stand_in + [si for _, _, si in fed])
        row_of_draft = torch.tensor([-1] * (kept + p) + draft_rows)
        slots = torch.arange(kept, kept + len(fed))
        mask = torch.zeros(len(fed), capacity, dtype=torch.bool)
        length = kept + len(fed)
        seen = (raster[None, :] <= raster[slots][:, None]) & (~stand_in[None, :] | (
            torch.arange(length)[None, :] == slots[:, None]))
        seen &= (row_of_draft[None, :] < 0) | (row_of_draft[None, :] == row_of_draft[slots][:, None])
        mask[:, :length] = seen
        x = torch.tensor([t for _, t, _ in fed], device=device)[None].expand(len(labels), -1)
        rope = torch.tensor([prefix + ras for ras, _, _ in fed], device=device)
        logits = model.step_masked(model.tok_embeddings(x), slots.to(device), mask[None, None].to(device), rope)
        forwards += 1
        slot_raster += [ras for ras, _, _ in pending]
        slot_stand_in += [si for _, _, si in pending]
        pending = []
        for r, head, c, drafts, first, room in chains:
            at = [head] + list(range(first, first + len(drafts.tokens)))
            committed, carried[r] = verify_prefix(targets(logits[:, at]), drafts, room, generator,
                                                  continued=continued)
            verified += min(len(drafts.tokens), room - 1)  # the drafts it could commit
            accepted += len(committed) - 1
            for i, t in enumerate(committed):
                code[r * width + c + i] = t
                pending.append((r * width + c + i, t, False))
            count[r] += len(committed)
        for r in range(height - 1):  # hand-over: row 1, and every row when rows do not overlap
            if count[r] == width and not started[r + 1] and (r == 0 or w >= width):
                started[r + 1] = True
        if w < width:
            bottom = max(r for r in range(height) if started[r])
            if 1 <= bottom < height - 1 and count[bottom] >= w:
                started[bottom + 1] = True
                above = bottom - 1
                pending.append((bottom * width + width - 1, code[above * width + count[above] - 1], True))
    codes = torch.tensor([[code[i] for i in range(height * width)]], device=device)
    return ReferenceResult(codes, forwards, time.perf_counter() - t0, {"drafts": (verified, accepted)})


def load_reference(model_dir: str, device: str = "cpu") -> LlamaGenReference:
    """The reference model with a converted folder's weights (`model.safetensors`, LlamaGen names)."""
    import os

    from safetensors.torch import load_file

    model = LlamaGenReference(LlamaGenConfig.from_pretrained(model_dir))
    model.load_state_dict(load_file(os.path.join(model_dir, "model.safetensors")))
    return model.to(device).eval()
