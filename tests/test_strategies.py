"""Decoding strategies are objects behind one interface (`samplers/strategy.py`), found by name in a
registry (`samplers/__init__.py`): one defined and registered outside the package decodes through
vLLM's engine, with no change to the scheduler or the runner."""
import pytest
import torch

from vllm_visual_ar.model_executors.llamagen_reference import generate as reference_raster
from vllm_visual_ar.requests import Decoding
from vllm_visual_ar.samplers.strategy import RowPlan, Strategy, StrategyRunner


class GreedyRunner(StrategyRunner):
    """Reads the logits of each row's last fed token and appends their most likely code."""

    def prepare(self, step, rows):
        return {row: RowPlan(logits=[step.fed(row)[1] - step.fed(row)[0] - 1]) for row in rows}

    def emit(self, step, rows, logits, at):
        return {row: [int(logits[at[row]][-1].argmax())] for row in rows}


class Greedy(Strategy):
    """Raster order, always the most likely code, whatever the request's sampling settings."""
    runner = GreedyRunner


@pytest.fixture
def greedy(monkeypatch):
    from vllm_visual_ar import samplers

    monkeypatch.setattr(samplers, "STRATEGIES", dict(samplers.STRATEGIES))
    samplers.register_strategy("greedy", Greedy)
    return "greedy"


def test_a_registered_strategy_is_a_valid_decoding_and_an_unregistered_one_is_not(greedy):
    from vllm_visual_ar.samplers import strategy_names

    assert "greedy" in strategy_names() and Decoding("greedy").strategy == "greedy"
    with pytest.raises(ValueError, match="window applies to strategies 'zipar', 'sjd' and 'zipar_sjd' only"):
        Decoding("greedy", window=4)


def test_strategies_registered_by_default_are_the_documented_ones():
    from vllm_visual_ar.samplers import strategy_names

    assert strategy_names() == ("raster", "zipar", "sjd", "zipar_sjd", "code")
    with pytest.raises(ValueError, match="strategy must be one of"):
        Decoding("greedy")


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_a_strategy_registered_from_outside_decodes_through_the_engine(tiny_generator, tiny_model, greedy,
                                                                        guidance_scale):
    """Sampling settings that would draw at random, yet the images are the reference's greedy ones:
    the runner planned the rows, mixed guidance over them and appended what the strategy emitted."""
    _, ref = tiny_model
    images = tiny_generator.generate([2, 7], guidance_scale=guidance_scale, temperature=1.0, top_k=0, seed=5,
                                     strategy=greedy)
    expected = reference_raster(ref, [2, 7], guidance_scale=guidance_scale, top_k=1).codes
    assert torch.equal(torch.stack([im.codes.flatten() for im in images]), expected)
    grid = tiny_generator.config.image_grid
    assert [im.stats.forward_passes for im in images] == [grid * grid] * 2
