"""Engine-free sampling pieces: classifier-free guidance mixing and LlamaGen-style token sampling.

The vLLM path mixes guidance with `cfg_mix` and lets vLLM's own sampler draw the token; the
plain-PyTorch reference loop uses `sample` (LlamaGen `autoregressive/models/generate.py::sample`:
temperature, then top-k, then top-p, then one multinomial draw).
"""
from __future__ import annotations

import torch


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale) -> torch.Tensor:
    """LlamaGen's guidance: uncond + s * (cond - uncond). `guidance_scale` is a float or a [N, 1] tensor."""
    return uncond + guidance_scale * (cond - uncond)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k set and outside the top-p nucleus to -inf. k=0 / p=1 disable."""
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum > top_p
        # Keep the token that crosses the threshold (the nucleus is never empty).
        drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [N, V] -> token ids [N]. temperature 0 means greedy."""
    if temperature == 0.0 or top_k == 1:
        return logits.argmax(dim=-1)
    probs = filter_top_k_top_p(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
