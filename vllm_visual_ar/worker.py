"""vLLM worker whose model runner samples guided images: one token per guidance pair.

The runner mixes each pair's logits as LlamaGen does, `uncond + s * (cond - uncond)` over the image
codes, lets vLLM's sampler draw from the mixed row of the cond request (its temperature, top-k,
top-p and seed), and writes that token to the uncond request as well, so both streams feed the
same token next step. The scheduler (`scheduler.py`) guarantees both rows are in the batch.
"""
from __future__ import annotations

import torch

from vllm.platforms import current_platform

from vllm_visual_ar.requests import image_request_info
from vllm_visual_ar.samplers.sampling import cfg_mix

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as _BaseWorker
else:
    from vllm.v1.worker.gpu_worker import Worker as _BaseWorker


class GuidedSamplingMixin:
    """Mixed into the platform's V1 model runner class (CPUModelRunner or GPUModelRunner)."""

    def _guidance_rows(self):
        """-> (cond rows, uncond rows, scales) of the guided pairs in this batch, or None."""
        halves: dict[str, dict[str, int]] = {}
        scales: dict[str, float] = {}
        for row, req_id in enumerate(self.input_batch.req_ids):
            info = image_request_info(self.requests[req_id].sampling_params)
            if info is not None and info.guided:
                halves.setdefault(info.image_id, {})[info.role] = row
                scales[info.image_id] = info.guidance_scale
        if not halves:
            return None
        for image_id, rows in halves.items():
            if len(rows) != 2:
                raise RuntimeError(f"guided image {image_id} has only its {list(rows)} stream in this batch")
        cond = torch.tensor([h["cond"] for h in halves.values()], device=self.device)
        uncond = torch.tensor([h["uncond"] for h in halves.values()], device=self.device)
        scale = torch.tensor([scales[k] for k in halves], device=self.device, dtype=torch.float32)[:, None]
        return cond, uncond, scale

    def _sample(self, logits, spec_decode_metadata):
        guided = self._guidance_rows() if logits is not None and spec_decode_metadata is None else None
        if guided is None:
            return super()._sample(logits, spec_decode_metadata)
        cond, uncond, scale = guided
        k = self.model_config.hf_config.codebook_size
        logits[cond, :k] = cfg_mix(logits[cond, :k], logits[uncond, :k], scale).to(logits.dtype)
        output = super()._sample(logits, spec_decode_metadata)
        output.sampled_token_ids[uncond] = output.sampled_token_ids[cond]
        return output


_runner_classes: dict[type, type] = {}


def guided_runner_class(base: type) -> type:
    if base not in _runner_classes:
        _runner_classes[base] = type(f"VisualAR{base.__name__}", (GuidedSamplingMixin, base), {})
    return _runner_classes[base]


class VisualARWorker(_BaseWorker):
    """The platform's worker, with the runner's class swapped for its guided-sampling subclass
    (the mixin adds methods only, so swapping the class of the constructed runner is safe)."""

    def init_device(self):
        super().init_device()
        if getattr(self, "use_v2_model_runner", False):
            raise RuntimeError("vllm-visual-ar needs vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0")
        self.model_runner.__class__ = guided_runner_class(type(self.model_runner))
