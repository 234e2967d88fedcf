"""Raster order: one token per forward. vLLM's own path, except for coupled draws (`coupling.py`),
whose tokens the runner half draws from noise fixed per (seed, position)."""
from vllm_visual_ar.samplers.coupling import CoupledTokens, check_coupled
from vllm_visual_ar.samplers.strategy import DRAW_ONLY, Strategy, StrategyRunner


class RasterRunner(StrategyRunner):
    def __init__(self, *args):
        super().__init__(*args)
        self.coupled = CoupledTokens(self.device)

    def takes(self, info):
        return info is not None and bool(info.decoding.coupled)  # else vLLM's own draw; None: not an image

    def prepare(self, step, rows):
        return dict.fromkeys(rows, DRAW_ONLY)

    def emit(self, step, rows, logits, at):
        return self.coupled.tokens(step, rows, logits, at, self.layout_of)

    def forget(self, req_id, info):
        if info is not None:
            self.coupled.seeds.forget(info.image_id)


class Raster(Strategy):
    """One token per forward in raster order."""
    fields = ("coupled",)
    runner = RasterRunner

    @classmethod
    def checked(cls, decoding):
        return {"coupled": check_coupled(decoding.coupled)}
