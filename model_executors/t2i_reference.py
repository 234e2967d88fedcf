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
                          top_k: int = 0, temperature: float = 1.0, generator: torch.Generator | None = None) -> list[int]:
    """next_logits(ids) -> the LM's logits [V] for the token after `ids`. uncond_ids None: unguided.
    top_k 1 or temperature 0 is greedy. -> the generated tokens (layout.num_tokens of them)."""
    tokens: list[int] = []
    codes = slice(layout.code_ids.start, layout.code_ids.stop)
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
