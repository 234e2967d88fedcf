"""KV cache layers owned by one phase of a request, in vLLM's block pool (CoDe's drafter and refiner).

A model whose forwards run different layers in different phases of a request (CoDe: the drafter's
layers for the small scales, the refiner's for the rest; `samplers/next_scale.py`) labels each
attention layer with its phase. Its KV spec is then a `PhaseKVSpec`, so vLLM puts each phase's
layers in KV cache groups of their own (its hybrid allocator: one block table per group, one shared
block pool, `vllm/v1/core/kv_cache_utils.py::_get_kv_cache_groups_uniform_page_size`), and each
group is managed by a `PhaseKVManager`. A request visits its phases in a fixed order (its route;
CoDe: drafter then refiner, or the drafter alone), and holds blocks in a phase's groups from its
start until it leaves that phase, when they go back to the pool (the drafter's KV is freed at the
hand-off, as `autoregressive_infer_cfg_draft` does with `kv_caching(False)`); groups of phases off
its route never hold its blocks. A later phase's groups hold blocks from the start because vLLM's
workers learn of a request's blocks only as appended ids (a block table row never has holes
filled), so the refiner's blocks for the drafted scales are taken as those scales are drafted:
the peak is the drafter's and the refiner's KV for the drafted positions, then the refiner's for
the whole image, not the two models' KV for every position.

The scheduler tells the managers each request's phase and route (`set_phase`) before vLLM allocates
for a step, and forgets the request when it is freed. A request whose phase was never set holds
blocks in every group (the safe default). Prefix caching is off for the plugin's engines, so these
managers never see cache hits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

# request id -> (phases still ahead of it, the current one first; phases it has left).
# Set by the scheduler, in the process that owns the KV cache manager.
_PHASES: dict[str, tuple[tuple, tuple]] = {}


def set_phase(request_id: str, phase, route) -> None:
    """The request is in `phase` of its `route` (its phases in order; empty: no phases)."""
    if route:
        at = list(route).index(phase)
        _PHASES[request_id] = (tuple(route[at:]), tuple(route[:at]))


def forget(request_id: str) -> None:
    _PHASES.pop(request_id, None)


@dataclass(frozen=True, kw_only=True)
class PhaseKVSpec(FullAttentionSpec):
    """Full attention whose blocks a request holds only while it is in `phase`."""
    phase: str = ""

    @classmethod
    def of(cls, spec: FullAttentionSpec, phase: str) -> "PhaseKVSpec":
        return cls(**{f.name: getattr(spec, f.name) for f in fields(spec) if f.init}, phase=phase)

    def is_uniform_with_collection(self, kv_cache_specs) -> bool:
        # Layers of different phases must not share a group (one block table).
        return all(isinstance(s, PhaseKVSpec) and s.phase == self.phase for s in kv_cache_specs.values())

    @classmethod
    def merge(cls, specs):
        if len({getattr(s, "phase", None) for s in specs}) > 1:
            raise AssertionError("layers of different phases never share a KV cache group")
        return replace(super().merge(specs), phase=specs[0].phase)  # the base merge drops the phase


class PhaseKVManager(FullAttentionManager):
    """A full-attention group's manager that holds a request's blocks only while its phase is
    current or ahead on the request's route: a request off the route gets vLLM's null block for
    every position (nothing is written there: the phase's layers never run for it), and when the
    request leaves the phase its blocks go back to the pool and become null blocks."""

    def _holds(self, request_id: str) -> bool:
        phases = _PHASES.get(request_id)
        return phases is None or self.kv_cache_spec.phase in phases[0]

    def get_num_blocks_to_allocate(self, request_id, num_tokens, *args, **kwargs) -> int:
        if not self._holds(request_id):
            return 0
        return super().get_num_blocks_to_allocate(request_id, num_tokens, *args, **kwargs)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        if self._holds(request_id):
            return super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        # Null blocks stand for positions this group never holds; the workers need not hear of them
        # (vLLM's sliding-window manager nulls blocks the same way).
        blocks = self.req_to_blocks[request_id]
        blocks.extend([self._null_block] * max(0, math.ceil(num_tokens / self.block_size) - len(blocks)))
        return []

    def remove_skipped_blocks(self, request_id, processed_computed_tokens, num_prompt_tokens=None) -> None:
        phases = _PHASES.get(request_id)
        if phases is None or self.kv_cache_spec.phase not in phases[1] or request_id not in self.req_to_blocks:
            return
        blocks = self.req_to_blocks[request_id]  # the request has left this phase for good
        freed = [b for b in reversed(blocks) if not b.is_null]
        if freed:
            blocks[:] = [self._null_block] * len(blocks)
            self.block_pool.free_blocks(freed)


def register() -> None:
    """Make vLLM's KV cache manager use `PhaseKVManager` for `PhaseKVSpec` groups, in this process.
    vLLM registers its built-in specs only into an empty registry, so they go in first."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(PhaseKVSpec, PhaseKVManager, uniform_type_base_spec=PhaseKVSpec)


def group_layout(kv_cache_config) -> list[tuple[str | None, int]]:
    """vLLM's KV cache groups of an engine as (phase, block size); phase None: every phase's."""
    return [(getattr(g.kv_cache_spec, "phase", None), g.kv_cache_spec.block_size)
            for g in kv_cache_config.kv_cache_groups]


def expected_layout(layers_per_phase: dict[str, int], block_size: int) -> list[tuple[str | None, int]]:
    """The groups vLLM forms for a model whose attention layers are labelled by phase (all with one
    page size), without starting it: its rule (`_get_kv_cache_groups_uniform_page_size`) splits each
    phase's layers into groups of the smallest phase's layer count, or of the largest one when that
    is under 1.5 times the smallest. An unlabelled model is one group."""
    if not layers_per_phase:
        return [(None, block_size)]
    smallest, largest = min(layers_per_phase.values()), max(layers_per_phase.values())
    size = largest if largest < 1.5 * smallest else smallest
    return [(phase, block_size) for phase, n in layers_per_phase.items() for _ in range(math.ceil(n / size))]


def blocks_needed(layout, total_tokens: int, phase_tokens: dict[str, int] | None) -> int:
    """Pool blocks a request needs at its peak. Without phases: `total_tokens` in every group. With
    them (`phase_tokens`: the tokens it holds KV for at the end of each phase, in route order): the
    most, over its phases, of that phase's tokens in the groups it holds then (that phase's, the
    later ones' and the unphased)."""
    if not phase_tokens or all(phase is None for phase, _ in layout):
        return sum(math.ceil(total_tokens / bs) for _, bs in layout)
    route = list(phase_tokens)
    return max(sum(math.ceil(tokens / bs) for phase, bs in layout if phase is None or phase in route[i:])
               for i, tokens in enumerate(phase_tokens.values()))
