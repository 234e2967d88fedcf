"""Coupled draws (SCD): noise fixed per (seed, position). On its own (the race picks each code with
its probability, the noise repeats for a (seed, position) and only for it), then vLLM's engine: coupled
raster equals the plain-PyTorch loop drawing with the same noise, coupled SJD equals coupled raster
token for token (alone, in a batch, any window). Their exactness (chi-square through the engine) is
`test_sjd.py::test_engine_samples_follow_the_exact_distribution`."""
import pytest
import torch

from vllm_visual_ar.model_executors.llamagen_reference import generate as reference_raster
from vllm_visual_ar.samplers.coupling import (_coupled_draw_tensors, coupled_draw, race_noise, random_codes,
                                              splitmix64)
from vllm_visual_ar.samplers.sjd import Drafts, verify_coupled

SAMPLED = dict(guidance_scale=3.0, temperature=1.0, top_k=20, top_p=0.9)


# -- the noise on its own ------------------------------------------------------------------------------
def test_noise_is_fixed_per_seed_and_position_and_differs_elsewhere():
    a = race_noise([7, 7, 7], [0, 1, 5], 64)
    assert torch.equal(a, race_noise([7, 7, 7], [0, 1, 5], 64))
    assert torch.equal(a[2], race_noise([7], [5], 64)[0])  # a position's noise is its own, wherever it is asked
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], race_noise([8], [0], 64)[0])
    grid = race_noise([s for s in range(50) for _ in range(50)], [p for _ in range(50) for p in range(50)], 8)
    assert len({tuple(row.tolist()) for row in grid}) == 2500


def test_random_drafts_of_a_coupled_image_are_uniform_and_fixed_per_seed_and_position():
    codes = random_codes(7, range(20000), 16)
    assert codes[100:200] == random_codes(7, range(100, 200), 16)  # a position's draft is its own
    assert codes[:200] != random_codes(8, range(200), 16)
    counts = torch.bincount(torch.tensor(codes), minlength=16).double()
    assert ((counts - 1250) ** 2 / 1250).sum() < 37.7  # chi-square, 15 degrees of freedom, p = 0.001
    noise = race_noise([7] * 20000, range(20000), 16)  # apart from the draws' noise at the same positions
    assert abs(torch.corrcoef(torch.stack([torch.tensor(codes).double(), noise.argmin(-1).double()]))[0, 1]) < 0.03


def test_coupled_draws_on_the_support_alone_equal_the_draws_over_every_code():
    """Top-k probabilities over a large codebook: the draw hashes the support only and picks what the
    race over every code picks. An index past the codes (SJD's "placed") races with noise 1, on the
    support alone and over a dense row."""
    torch.manual_seed(0)
    logits = torch.randn(40, 4096)
    p = logits.masked_fill(logits < logits.topk(50).values[:, -1:], float("-inf")).softmax(-1)
    seeds, positions = list(range(40)), list(range(100, 140))
    full = p.div(race_noise(seeds, positions, 4096)).argmax(-1)
    assert torch.equal(coupled_draw(p, seeds, positions), full)
    placed = torch.zeros(2, 65)
    placed[:, 64] = 1.0
    assert coupled_draw(placed, [7, 7], [5, 6], codes=64).tolist() == [64, 64]
    half = torch.zeros(200, 65)
    half[:, [3, 64]] = 0.5  # code 3 against the placed index, whose noise is 1: it wins where code 3's is above 1
    expected = torch.where(race_noise([7] * 200, range(200), 64)[:, 3] > 1, 64, 3)
    assert torch.equal(coupled_draw(half, [7] * 200, range(200), codes=64), expected)
    dense = torch.randn(200, 65).softmax(-1)  # every index possible: the race over the whole row
    noise = torch.cat([race_noise([7] * 200, range(200), 64), torch.ones(200, 1)], 1)
    assert torch.equal(coupled_draw(dense, [7] * 200, range(200), codes=64), dense.div(noise).argmax(-1))
    # On CPU the draw hashes in numpy; the tensor code (other devices) draws the same, negative seeds too
    for probs, seeds, positions, codes in ((p, seeds, positions, 4096), (placed, [7, 7], [5, 6], 64),
                                           (half, [-7] * 200, range(200), 64), (dense, [2**63 + 5] * 200, range(200), 64)):
        assert torch.equal(coupled_draw(probs, seeds, positions, codes),
                           _coupled_draw_tensors(probs, seeds, list(positions), codes))


def test_noise_is_splitmix64_computed_in_tensors():
    """The int64 tensor arithmetic (wrapping multiplications, logical shifts) gives SplitMix64's own
    numbers: entry k of (seed, position) is -log of the top 53 bits of splitmix64(state + k gamma)."""
    import math

    gamma, mask = 0x9E3779B97F4A7C15, (1 << 64) - 1
    cases = [(0, 0), (7, 5), (2**32 - 1, 255), (2**63 + 12345, 4095), (123456789, 2**20)]
    noise = race_noise([s for s, _ in cases], [p for _, p in cases], 300).double()
    for i, (seed, position) in enumerate(cases):
        state = splitmix64(seed) ^ position
        for k in (0, 1, 17, 255, 299):
            u = ((splitmix64((state + k * gamma) & mask) >> 11) + 0.5) * 2.0 ** -53
            assert noise[i, k].item() == pytest.approx(-math.log(u), rel=1e-6)


def test_coupled_draws_pick_each_code_with_its_probability():
    """Over many (seed, position) pairs the race is a categorical draw from p (chi-square)."""
    from scipy.stats import chisquare

    p = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    draws = torch.cat([coupled_draw(p.expand(200, -1), [seed] * 200, range(200)) for seed in range(20)])
    counts = torch.bincount(draws, minlength=5)
    assert counts[4] == 0
    assert chisquare(counts[:4].tolist(), (p[:4] * len(draws)).tolist()).pvalue > 1e-3


def test_coupled_verification_commits_the_coupled_draws():
    p = torch.tensor([[0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    draws = coupled_draw(p, [3] * 4, range(4))
    drawn = draws.tolist()
    committed, carried = verify_coupled(p, Drafts(drawn[:3], torch.zeros(3, 3)), draws)
    assert committed == drawn and carried.tokens == []  # every draft matches: all accepted and a bonus
    wrong = (drawn[1] + 1) % 3
    committed, carried = verify_coupled(p, Drafts([drawn[0], wrong, drawn[2]], torch.zeros(3, 3)), draws)
    assert committed == drawn[:2] and carried.tokens == drawn[2:] and torch.equal(carried.q, p[2:])


# -- the engine ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", [SAMPLED, dict(guidance_scale=1.0, temperature=0.8, top_k=0, top_p=1.0)])
def test_coupled_raster_equals_the_reference_loop_with_the_same_noise(tiny_generator, tiny_model, sampling):
    _, ref = tiny_model
    images = tiny_generator.generate([1, 4, 4], seed=21, coupled=True, **sampling)
    expected = reference_raster(ref, [1, 4, 4], coupled_seeds=[21, 22, 23], **sampling).codes
    assert torch.equal(torch.stack([im.codes.flatten() for im in images]), expected)
    assert not torch.equal(images[1].codes, images[2].codes)  # seeds 22 and 23


@pytest.mark.parametrize("window,init", [(2, "random"), (6, "horizontal"), (64, "random")])
def test_coupled_sjd_gives_the_image_coupled_raster_gives(tiny_generator, window, init):
    raster = tiny_generator.generate([2, 5, 9], seed=40, coupled=True, **SAMPLED)
    sjd = tiny_generator.generate([2, 5, 9], seed=40, coupled=True, strategy="sjd", window=window, init=init,
                                  **SAMPLED)
    for r, s in zip(raster, sjd):
        assert torch.equal(r.codes, s.codes)
        assert s.stats.forward_passes < r.stats.forward_passes == r.stats.tokens
        assert s.stats.accepted_drafts == s.stats.tokens - s.stats.forward_passes
    uncoupled = tiny_generator.generate([2, 5, 9], seed=40, **SAMPLED)
    assert any(not torch.equal(r.codes, u.codes) for r, u in zip(raster, uncoupled))  # coupling changes the draw


def test_coupled_images_are_the_same_alone_and_under_load(tiny_generator):
    from vllm_visual_ar.requests import Decoding, SamplingSettings, image_requests

    alone = tiny_generator.generate([3], seed=77, coupled=True, **SAMPLED)[0].codes.flatten()
    cfg = tiny_generator.config
    settings = SamplingSettings(**{k: v for k, v in SAMPLED.items()})
    reqs = image_requests(cfg, 3, settings, seed=77, decoding=Decoding("sjd", 5, coupled=True))
    reqs += image_requests(cfg, 3, settings, seed=77, decoding=Decoding(coupled=True))
    reqs += image_requests(cfg, 4, settings, seed=5) + image_requests(cfg, 6, settings, seed=6,
                                                                      decoding=Decoding("zipar", 3))
    reqs += image_requests(cfg, 1, settings, decoding=Decoding("sjd", 8, coupled=True))
    outs = tiny_generator.llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
    assert torch.equal(torch.tensor(outs[0].outputs[0].token_ids), alone)  # SJD, in a mixed batch
    assert torch.equal(torch.tensor(outs[2].outputs[0].token_ids), alone)  # raster, in a mixed batch


def test_a_coupled_images_forward_count_is_its_seeds_alone(tiny_generator):
    """Random drafts of a coupled image come from its seed and positions, not from the request's
    generator, which vLLM's sampler advances only in steps that are not all coupled draws: beside an
    uncoupled image (its prompt forward then runs vLLM's sampler) the image takes the forwards it takes
    alone, not only its tokens."""
    from vllm.sampling_params import RequestOutputKind

    from vllm_visual_ar.requests import Decoding, SamplingSettings, image_requests

    alone = tiny_generator.generate([3], seed=77, coupled=True, strategy="sjd", window=5, **SAMPLED)[0]
    cfg, engine = tiny_generator.config, tiny_generator.llm.llm_engine
    settings = SamplingSettings(**SAMPLED)
    for image_id, class_id, seed, decoding in (("coupled", 3, 77, Decoding("sjd", 5, coupled=True)),
                                               ("other", 4, 5, Decoding("sjd", 5))):
        for prompt, params in image_requests(cfg, class_id, settings, seed, image_id=image_id, decoding=decoding):
            params.output_kind = RequestOutputKind.DELTA
            engine.add_request(f"{image_id}-{params.extra_args['visual_ar']['role']}", prompt, params)
    tokens, forwards = [], 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "coupled-cond" and out.outputs[0].token_ids:
                tokens += out.outputs[0].token_ids
                forwards += 1
    assert tokens == alone.codes.flatten().tolist()
    assert forwards == alone.stats.forward_passes < len(tokens)


def test_unseeded_coupled_images_differ(tiny_generator):
    a, b = (tiny_generator.generate([3], coupled=True, strategy=s, **SAMPLED)[0].codes for s in ("raster", "sjd"))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(coupled="yes"), "coupled must be true or false"), (dict(coupled=1), "coupled must be true or false"),
    (dict(strategy="zipar", window=2, coupled=True), "coupled applies to strategies 'raster' and 'sjd'"),
    (dict(strategy="sjd", relaxed_delta=0.1, coupled=True), "coupled applies to exact SJD"),
])
def test_bad_coupled_arguments_are_value_errors(tiny_generator, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_generator.generate([1], **kwargs)
    assert tiny_generator.generate([1], top_k=1, coupled=True)[0].stats.tokens == tiny_generator.config.num_image_tokens
