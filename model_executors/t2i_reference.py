"""The plain-PyTorch text-to-image generate loop (the oracle the engine is tested against, token for
token): any causal LM as a function of token ids, one image's cond and uncond prompts, its family's
layout and guidance mix. Lumina-mGPT's and Emu3's own loops (transformers `generate` with their
logits processors: `lumina_mgpt/inference_solver.py`, Emu3's `prefix_allowed_tokens_fn`) do the
same steps: at each generated position, a token the layout forces (end of line, image end) is
placed as is; otherwise the cond logits (guided by the uncond stream's, over the image codes) are
restricted to the codes and a code is drawn. Both streams then feed the same token."""
from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def generate_image_tokens(next_logits: Callable[[list[int]], torch.Tensor], cond_ids: list[int],
                          uncond_ids: list[int] | None, layout, guidance_mix=None, guidance_scale: float = 1.0,
                          top_k: int = 0, temperature: float = 1.0, generator: torch.Generator | None = None,
                          coupled_seed: int | None = None) -> list[int]:
    """next_logits(ids) -> the LM's logits [V] for the token after `ids`. uncond_ids None: unguided.
    top_k 1 or temperature 0 is greedy. `coupled_seed`: draw by coupled noise (`samplers/coupling.py`)
    instead of from `generator`. -> the generated tokens (layout.num_tokens of them)."""
    from vllm_visual_ar.samplers.coupling import coupled_draw
    from vllm_visual_ar.samplers.sampling import target_probs

    tokens: list[int] = []
    codes = slice(layout.image_token_ids.start, layout.image_token_ids.stop)
    for index in range(layout.num_tokens):
        forced = layout.forced(index)
        if forced is not None:
            tokens.append(forced)
            continue
        logits = next_logits(cond_ids + tokens).float().clone()
        if uncond_ids is not None:
            uncond = next_logits(uncond_ids + tokens).float()
            logits[codes] = guidance_mix(logits[codes], uncond[codes], guidance_scale)
        x = logits[codes]
        if coupled_seed is not None:
            p = target_probs(x[None], 0.0 if top_k == 1 else temperature, top_k, 1.0)
            tokens.append(codes.start + int(coupled_draw(p, [coupled_seed], [index])[0]))
            continue
        if top_k == 1 or temperature == 0:
            tokens.append(codes.start + int(x.argmax()))
            continue
        if 0 < top_k < x.numel():
            x = x.masked_fill(x < x.topk(top_k).values[-1], float("-inf"))
        probs = (x / temperature).softmax(-1)
        tokens.append(codes.start + int(torch.multinomial(probs, 1, generator=generator)))
    return tokens


def transformers_next_logits(model) -> Callable[[list[int]], torch.Tensor]:
    """A transformers text-to-image LM (Chameleon, Emu3) as `next_logits`, recomputed from scratch
    for every token (slow, simple, no cache). The head is applied to the decoder's output directly:
    Chameleon's `forward` masks image tokens out of the logits, which image generation samples."""
    body = getattr(model.model, "text_model", model.model)  # Emu3 keeps its LM beside its VQ

    def next_logits(ids: list[int]) -> torch.Tensor:
        hidden = body(input_ids=torch.tensor([ids])).last_hidden_state
        return model.lm_head(hidden[0, -1])
    return next_logits


@torch.no_grad()
def generate_zipar_image_tokens(model, cond_ids: list[int], uncond_ids: list[int] | None, layout, window: int,
                                guidance_mix=None, guidance_scale: float = 1.0) -> tuple[list[int], int]:
    """Greedy ZipAR on a transformers text-to-image LM whose rows end with an end-of-line token, the
    authors' Lumina-mGPT loop (`Lumina-mGPT-ZipAR/.../modeling_chameleon.py::_sample`): row 0 from
    the image header; row r+1 starts once row r has `window - 1` codes (the window counts the row's
    leading token), by placing row r's end of line at its slot, which predicts (r+1, 0); every
    started row then advances one code per forward; a row's last code is fed for its key/value only;
    the last code brings the last end of line and the image end. Each stream keeps a transformers
    KV cache in feed order; a fed token sits at position prompt length + its slot in the image and
    sees the prompt and the cached or fed tokens whose slot is <= its own (a 4D mask).
    -> (the image's tokens in raster order, forwards)."""
    from transformers import DynamicCache

    body = getattr(model.model, "text_model", model.model)
    height, width, stride = layout.rows, layout.cols, layout.cols + 1
    assert layout.row_end is not None, "this loop is for layouts with an end of line per row"
    w = min(window, stride)
    streams = [list(cond_ids)] + ([list(uncond_ids)] if uncond_ids is not None else [])
    caches = [DynamicCache() for _ in streams]
    key_slots: list[list[int]] = [[] for _ in streams]  # slot of every cached key (prompt: -1)
    codes = slice(layout.image_token_ids.start, layout.image_token_ids.stop)

    def forward(i: int, ids: list[int], slots: list[int] | None) -> torch.Tensor:
        """Feed `ids` (at image `slots`, or the prompt) to stream i -> logits [len(ids), V]."""
        prefix = len(streams[i])
        past = key_slots[i]
        new = [-1] * len(ids) if slots is None else slots
        positions = list(range(prefix)) if slots is None else [prefix + s for s in slots]
        keys = torch.tensor(past + new)
        query = torch.tensor(new)
        if slots is None:  # the prompt: causal
            seen = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
        else:
            seen = keys[None, :] <= query[:, None]
        mask = torch.zeros(seen.shape).masked_fill(~seen, torch.finfo(torch.float32).min)
        out = body(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]),
                   attention_mask=mask[None, None], past_key_values=caches[i], use_cache=True)
        key_slots[i] = past + new
        return model.lm_head(out.last_hidden_state[0]).float()

    def choose(rows: list[torch.Tensor]) -> int:
        logits = rows[0][codes]
        if len(rows) > 1:
            logits = guidance_mix(logits, rows[1][codes], guidance_scale)
        return codes.start + int(logits.argmax())

    image: dict[int, int] = {}
    count, closed = [0] * height, [False] * height

    def sample(row: int, rows: list[torch.Tensor]) -> int:
        slot = row * stride + count[row]
        image[slot] = choose(rows)
        count[row] += 1
        return slot

    def place() -> list[int]:
        placed = []
        for r in range(height - 1):
            if not closed[r] and count[r] >= min(w - 1, width):
                closed[r] = True
                placed.append(r * stride + width)
        if count[-1] == width:
            closed[-1] = True
            placed += list(range(height * stride - 1, layout.num_tokens))
        for slot in placed:
            image[slot] = layout.forced(slot)
        return placed

    prompts = [forward(i, ids, None)[-1] for i, ids in enumerate(streams)]
    fed = [sample(0, prompts)]  # as the engine: the prompt's forward places nothing (`zipar_schedule`)
    forwards = 1
    while not closed[-1]:
        logits = [forward(i, [image[s] for s in fed], fed) for i in range(len(streams))]
        emitted = []
        for j, slot in enumerate(fed):
            row, col = divmod(slot, stride)
            if col == width:
                target = row + 1          # an end of line predicts the next row's first code
            elif col < width - 1:
                target = row
            else:
                target = None             # a row's last code: key/value only
            if target is not None:
                emitted.append(sample(target, [lg[j] for lg in logits]))
        fed = emitted + place()
        forwards += 1
    return [image[s] for s in range(layout.num_tokens)], forwards


@torch.no_grad()
def generate_zipar_sjd_image_tokens(model, cond_ids: list[int], uncond_ids: list[int] | None, layout, window: int,
                                    sjd_window: int, guidance_mix=None, guidance_scale: float = 1.0
                                    ) -> tuple[list[int], int]:
    """Greedy ZipAR x SJD (`samplers/zipar_sjd.py`, module doc) on a transformers text-to-image LM whose
    rows end with an end-of-line token, read from the rules, with horizontal drafts: rows start as in
    `generate_zipar_image_tokens` (row r's end of line, placed once row r has `window - 1` codes,
    predicts (r+1, 0)); each forward feeds what the last one committed and placed, then per started,
    unfinished row up to `sjd_window - 1` drafts of its next columns (the carried Jacobi tail, then
    the code to the left, at column 0 the code above). Greedy verification: a draft stands where it
    equals the argmax of the guided target before it; a row commits its accepted drafts and the
    target after them, never past column (codes of the row above) - (window - 1) unless that row is
    complete; the targets after the first miss (or past that column) are the row's next drafts.
    Drafts see the committed tokens whose slot is <= theirs and their own row's earlier drafts; their
    keys/values are dropped after the forward (the cache is cropped). -> (tokens, forwards)."""
    from transformers import DynamicCache

    body = getattr(model.model, "text_model", model.model)
    height, width, stride = layout.rows, layout.cols, layout.cols + 1
    assert layout.row_end is not None, "this loop is for layouts with an end of line per row"
    lag = min(window, stride) - 1
    streams = [list(cond_ids)] + ([list(uncond_ids)] if uncond_ids is not None else [])
    caches = [DynamicCache() for _ in streams]
    key_slots: list[list[int]] = [[] for _ in streams]
    codes = slice(layout.image_token_ids.start, layout.image_token_ids.stop)

    def forward(i: int, ids: list[int], slots: list[int] | None, rows: list[int] | None = None, kept: int = 0):
        """Feed `ids` (the prompt, or tokens at image `slots`, the last ones drafts of `rows`) to stream
        i; keep the keys/values of the first `kept` -> logits [len(ids), V]."""
        prefix = len(streams[i])
        past = key_slots[i]
        if slots is None:
            seen = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
            positions, new = list(range(prefix)), [-1] * len(ids)
        else:
            positions, new = [prefix + s for s in slots], slots
            draft_row = torch.tensor([-1] * (len(past) + kept) + rows)
            keys, query = torch.tensor(past + new), torch.tensor(new)
            seen = (keys[None, :] <= query[:, None]) & (
                (draft_row[None, :] < 0) | (draft_row[None, :] == draft_row[len(past):][:, None]))
        mask = torch.zeros(seen.shape).masked_fill(~seen, torch.finfo(torch.float32).min)
        out = body(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]),
                   attention_mask=mask[None, None], past_key_values=caches[i], use_cache=True)
        keep = len(ids) if slots is None else kept
        caches[i].crop(len(past) + keep)
        key_slots[i] = past + new[:keep]
        return model.lm_head(out.last_hidden_state[0]).float()

    def targets(logits: list[torch.Tensor], at: list[int]) -> list[int]:
        mixed = logits[0][at][:, codes]
        if len(logits) > 1:
            mixed = guidance_mix(mixed, logits[1][at][:, codes], guidance_scale)
        return (codes.start + mixed.argmax(-1)).tolist()

    image: dict[int, int] = {}
    count, started = [0] * height, [True] + [False] * (height - 1)
    carried: dict[int, list[int]] = {r: [] for r in range(height)}
    prompts = [forward(i, ids, None)[-1:] for i, ids in enumerate(streams)]
    image[0] = targets(prompts, [0])[0]
    count[0] = 1
    pending = [0]  # slots fed by the next forward (the prompt's forward places nothing)
    forwards = 1
    while count[-1] < width:
        fed, rows, chains = list(pending), [], []
        for r in range(height):
            if not started[r] or count[r] == width:
                continue
            c = count[r]
            head = pending.index(r * stride + c - 1 if c else (r - 1) * stride + width)
            room = width - c if r == 0 or count[r - 1] == width else count[r - 1] - lag - c + 1
            n = min(sjd_window - 1, width - 1 - c)
            drafts = carried[r][:n]
            while len(drafts) < n:
                col = c + len(drafts)
                drafts.append(drafts[-1] if drafts else image[r * stride + col - 1] if col else image[(r - 1) * stride])
            chains.append((r, c, head, len(fed), drafts, room))
            fed += [r * stride + c + j for j in range(n)]
            rows += [r] * n
        ids = [image[s] for s in pending] + [d for *_, drafts, _ in chains for d in drafts]
        logits = [forward(i, ids, fed, rows, len(pending)) for i in range(len(streams))]
        forwards += 1
        pending = []
        for r, c, head, first, drafts, room in chains:
            t = targets(logits, [head] + list(range(first, first + len(drafts))))
            n = 1
            while n < min(room, len(t)) and drafts[n - 1] == t[n - 1]:
                n += 1
            for j in range(n):
                image[r * stride + c + j] = t[j]
                pending.append(r * stride + c + j)
            count[r] += n
            carried[r] = t[n:]
        for r in range(height - 1):
            if not started[r + 1] and count[r] >= min(lag, width):
                started[r + 1] = True
                image[r * stride + width] = layout.forced(r * stride + width)
                pending.append(r * stride + width)
    for s in range(height * stride - 1, layout.num_tokens):
        image[s] = layout.forced(s)
    return [image[s] for s in range(layout.num_tokens)], forwards
