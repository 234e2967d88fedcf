"""Load-aware SJD and ZipAR windows (`samplers/load.py`): the cost models and the choices on their own, then vLLM's
engine: load-aware images stay exact (coupled ones give coupled raster's image whatever widths the
load gave them; sampled ones follow the exact distribution: `test_sjd.py`), fit the step budget,
and report the width each forward ran at."""
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import COSTLY_ROWS, FREE_ROWS, frozen_rows

from vllm_visual_ar.requests import Decoding
from vllm_visual_ar.samplers.load import (Marginal, RowCost, RowStart, StepCost, StepShape, WidthChoice, WidthPolicy,
                                         WindowOption, cap_to_budget, choose_widths)

SAMPLED = dict(guidance_scale=3.0, temperature=1.0, top_k=20, top_p=0.9)


def test_the_cost_model_recovers_marginal_costs_under_a_drifting_fixed_cost():
    cost = StepCost(prior_weight=0.0)  # no pull towards cheap drafts: the fit alone
    assert cost.marginal() is None
    rng = np.random.default_rng(0)
    for i in range(200):
        shape = StepShape(int(rng.integers(2, 130)), int(rng.integers(0, 200)), int(rng.integers(0, 16)),
                          int(rng.integers(0, 40)))
        # the fixed part grows step by step (a context that grows); the differences cancel it
        cost.observe(shape, 0.004 + 1e-5 * i + 5e-5 * shape.sequences + 1e-5 * shape.drafts
                     + 3e-4 * shape.wide_streams + 2e-5 * shape.extra)
    m = cost.marginal()
    assert m.sequence == pytest.approx(5e-5, rel=1e-3) and m.draft == pytest.approx(1e-5, rel=1e-3)
    assert m.wide_stream == pytest.approx(3e-4, rel=1e-3) and m.extra == pytest.approx(2e-5, rel=1e-3)
    nxt = StepShape(64, 0, 0, 0)
    assert cost.predict(nxt, m) == pytest.approx(0.004 + 1e-5 * 199 + 5e-5 * 64, rel=0.05)
    same = StepCost()
    for _ in range(20):
        same.observe(StepShape(100, 30, 2), 0.01)
    assert same.marginal() is None  # steps that never differ cannot tell what a draft costs: no claim


def test_under_load_widening_is_weighed_at_the_costs_upper_bounds():
    """Under load the evidence of drafts comes from probes (4 of 16 images widened every 4th step
    here) in noisy steps: in 3 of 40 draws of the noise the estimates make widening every image look
    worth it, where it costs (a verifying stream 0.2 ms on a 6 ms step); weighed at the costs' upper
    bounds none does. With plenty of evidence (one image, 300 steps) the bounds stay close to the
    estimates and a lone image still widens."""
    images = [WidthChoice(64, 0.5, streams=2)] * 16
    widened = {False: 0, True: 0}
    for seed in range(40):
        rng = np.random.default_rng(seed)
        cost = StepCost()
        for i in range(40):
            width = (4 if (i // 4) % 2 else 16) if i % 4 == 0 else 1
            shape = StepShape(32, 8 * (width - 1), 8 * (width > 1))
            cost.observe(shape, 6e-3 + 3e-5 * shape.drafts + 2e-4 * shape.wide_streams + rng.normal(0, 2e-3))
        base = cost.predict(StepShape(32), cost.marginal())
        for upper in (False, True):
            widened[upper] += max(choose_widths(images, base, 0, cost.marginal(upper=upper))) > 1
    assert widened[False] >= 2 and widened[True] == 0  # 3 and 0 here
    rng = np.random.default_rng(0)
    alone = StepCost()
    for i in range(300):
        width = [16, 1, 4, 1][i % 4]
        shape = StepShape(2, 2 * (width - 1), 2 * (width > 1))
        alone.observe(shape, 2e-3 + 3e-5 * shape.drafts + 2e-4 * shape.wide_streams + rng.normal(0, 1e-4))
    m, u = alone.marginal(), alone.marginal(upper=True)
    assert m.wide_stream < u.wide_stream < 1.3 * m.wide_stream and m.draft < u.draft < 1.3 * m.draft
    assert choose_widths([WidthChoice(64, 0.5, streams=2)], alone.predict(StepShape(2), m), 0, u)[0] > 8


def test_free_tokens_give_wide_steps_and_costly_ones_narrow():
    images = [WidthChoice(32, 0.6, streams=2) for _ in range(16)]
    overhead_bound = Marginal(1e-4, 0.0, 0.0, 0.0)  # a GPU-like step: extra tokens free
    token_bound = Marginal(1e-4, 1e-4, 1e-4, 1e-4)  # a small model on a CPU: every token and draft costs
    base = 0.01 + 32 * 1e-4
    assert set(choose_widths(images, base, 0, overhead_bound)) == {32}
    assert set(choose_widths(images, base, 0, token_bound)) == {1}
    alone = choose_widths([WidthChoice(32, 0.6, streams=2)], 0.01, 0, token_bound)[0]
    assert alone > 1  # one image: the per-step cost dominates, drafts pay
    assert choose_widths([WidthChoice(4, 2.0)], base, 0, overhead_bound) == [4]  # never past the ceiling
    # a flat optimum (one image: best at width 12, width 16 within 1% of it): the widest of it
    flat = Marginal(1e-4, 5.5e-5, 1.4e-4, 0.0)
    assert choose_widths([WidthChoice(16, 0.7, streams=2)], 3.6e-3, 0, flat, tolerance=0.0) == [12]
    assert choose_widths([WidthChoice(16, 0.7, streams=2)], 3.6e-3, 0, flat) == [16]


def simulated_policy(policy, images, steps, rng, window=16, draft=2e-5, wide_stream=2e-4):
    """The scheduler's loop on a machine whose step costs 1 ms + 0.1 ms per sequence + 0.02 ms per
    draft + 0.2 ms per stream verifying drafts (each image two streams), +-20% noise -> widths chosen."""
    chosen = []
    for _ in range(steps):
        widths = policy.widths([WidthChoice(window, 0.7, streams=2)] * images, StepShape(2 * images), 0)
        shape = StepShape(2 * images, sum(2 * (w - 1) for w in widths), sum(2 for w in widths if w > 1))
        seconds = 1e-3 + 1e-4 * shape.sequences + draft * shape.drafts + wide_stream * shape.wide_streams
        policy.observe(shape, seconds * rng.uniform(0.8, 1.2))
        chosen.append(widths)
    return chosen


def test_the_policy_narrows_under_load_and_widens_alone_whatever_came_before():
    """Under load (64 images) drafts cost more than they commit on this machine; alone, the step's
    fixed cost dominates and wide windows pay. The policy learns both from its own steps, and a
    long run held at width 1 does not make it forget what drafts cost (it used to: a fit left by a
    loaded batch held single images at width 1)."""
    rng = np.random.default_rng(1)
    policy = WidthPolicy()
    loaded = simulated_policy(policy, 64, 400, rng)
    # probes: a few images, at waits that double under load (64, 128, ...)
    assert [i for i, w in enumerate(loaded[50:], 50) if set(w) != {1}] == [64, 128, 256]
    assert max(sum(x > 1 for x in w) for w in loaded[50:]) == WidthPolicy.probe_images
    alone = simulated_policy(policy, 1, 100, rng)
    assert all(w[0] >= 8 for w in alone[5:])  # the best width here is 13; 8 to 16 are within 3% of it
    again = simulated_policy(policy, 64, 300, rng)
    # width 1 again at once; the waits start again from `probe_every` after the steps alone widened
    assert [i for i, w in enumerate(again) if set(w) != {1}] == [63, 127, 255]
    fresh = simulated_policy(WidthPolicy(), 1, 100, rng)
    assert all(w[0] >= 8 for w in fresh[20:])


def test_probes_go_no_wider_than_probe_width():
    """A probe widens a few images to a quarter of their windows and to their whole windows in turn,
    but no wider than `probe_width`: four images' 64-wide windows cost a loaded step several times."""
    loaded = simulated_policy(WidthPolicy(), 64, 300, np.random.default_rng(5), window=64)
    probes = [w for w in loaded[50:] if max(w) > 1]
    assert {max(w) for w in probes} == {WidthPolicy.probe_width // 4, WidthPolicy.probe_width}


def test_a_choice_that_holds_every_image_at_width_1_stands_for_a_few_steps_of_the_same_batch():
    """Under load the scheduler skips asking while the last choice, all at width 1, stands: for
    `hold_steps` steps in the same batch, twice as long each time it holds again (up to
    `hold_steps_most`), back to `hold_steps` in another batch, and never over a probe."""
    rng = np.random.default_rng(4)
    policy = WidthPolicy()
    simulated_policy(policy, 64, 100, rng)  # learnt: under load, width 1
    narrow, seconds = StepShape(128), 1e-3 + 1e-4 * 128

    def step(widths=None, batch="b"):
        widths = widths or policy.widths([WidthChoice(16, 0.7, streams=2)] * 64, narrow, 0, batch)
        policy.observe(narrow, seconds * rng.uniform(0.8, 1.2))
        return widths

    while policy.cost.steps >= policy._next_probe - 1:
        step()  # not next to a probe
    assert set(step()) == {1}
    assert policy.holds("b") and not policy.holds("another batch")
    for _ in range(WidthPolicy.hold_steps - 1):
        assert policy.holds("b")
        step([1] * 64)
    assert not policy.holds("b")  # asked again
    policy._next_probe = policy.cost.steps + 10**4  # no probe in between
    for batch, lengths in (("b", [2, 4, 8, 8]), ("c", [1, 2])):  # in units of hold_steps
        for length in lengths:
            assert set(step(batch=batch)) == {1}
            for _ in range(length * WidthPolicy.hold_steps - 1):
                assert policy.holds(batch)
                step([1] * 64)
            assert not policy.holds(batch)
    assert WidthPolicy.hold_steps_most == 8 * WidthPolicy.hold_steps
    policy._next_probe = policy.cost.steps + 8
    assert set(step(batch=None)) == {1} and not policy.holds(None)  # a choice not tied to a batch holds nothing
    while policy.cost.steps < policy._next_probe - 1:
        step()
    assert set(step()) == {1} and not policy.holds("b")  # a probe is due
    assert max(step()) > 1 and not policy.holds("b")  # the probe widens; wide choices hold nothing


def test_probes_find_drafts_that_became_cheap():
    """Learnt where drafts cost a lot (width 1 even alone), then the machine changes (another tenant
    leaves, say): at width 1 nothing more is learnt of drafts, only the policy's probes can tell. They
    are rare, so the estimate moves slowly (weak: docs/accel.md)."""
    rng = np.random.default_rng(2)
    policy = WidthPolicy()
    costly = simulated_policy(policy, 1, 200, rng, draft=1e-3, wide_stream=2e-2)
    assert [i for i, w in enumerate(costly[50:], 50) if w != [1]] == [64, 128, 192]  # alone: no backing off

    def widening(m):  # the estimated cost of one image's full window, both streams
        return 2 * (15 * m.draft + m.wide_stream)

    before = widening(policy.cost.marginal())
    simulated_policy(policy, 1, 1000, rng)
    assert widening(policy.cost.marginal()) < before / 3


def test_thin_evidence_errs_towards_cheap_drafts():
    rng = np.random.default_rng(3)
    pulled, plain = StepCost(), StepCost(prior_weight=0.0)
    for i in range(12):
        shape = StepShape(2, int(rng.integers(0, 30)), 2 * (i % 2))
        seconds = (2e-3 + 5e-5 * shape.drafts + 3e-4 * shape.wide_streams) * rng.uniform(0.8, 1.2)
        pulled.observe(shape, seconds)
        plain.observe(shape, seconds)
    assert pulled.marginal().draft < plain.marginal().draft
    assert pulled.marginal().wide_stream < plain.marginal().wide_stream


ZIPAR_W4 = [WindowOption(16, 1.0, 0.0, False, 128.0), WindowOption(8, 1.78, 0.88, True, 136.0),
            WindowOption(4, 2.91, 2.07, True, 136.0)]  # a 16x16 image: raster, ZipAR w=8, w=4


def simulated_rows(cost: RowCost, rng, steps=400):
    """Steps on a machine like this CPU (measured medians: 2.3 ms alone, 5.8 ms with 16 raster images,
    10.8-19.3 ms with 16 ZipAR w=4 images from the start of the image to its end): 2 ms + 0.12 ms per
    sequence, and for streams with rows 0.15 ms each + 0.03 ms per extra token + 1.6 us per token of
    context, + 1.5 ms per step that has any, +-20% noise; images with and without rows mixed."""
    for _ in range(steps):
        images = int(rng.choice([1, 4, 16]))
        wide = 2 * int(rng.integers(0, images + 1))
        extra, context = int(wide * rng.uniform(0.5, 2.5)), int(wide * rng.uniform(16, 270))
        seconds = 2e-3 + 1.2e-4 * 2 * images + 1.5e-4 * wide + 3e-5 * extra + 1.6e-6 * context + 1.5e-3 * (wide > 0)
        cost.observe(StepShape(2 * images, 0, wide, extra, context), seconds * rng.uniform(0.8, 1.2))


def test_the_row_model_keeps_other_streams_drafts_apart_from_rows():
    """Steps of SJD's drafts (vLLM's causal path, cheap per token) and of ZipAR x SJD's rows (the
    masked path, whose drafts also ride in speculative slots) teach the row model different costs.
    Counted as rows, or left out while their streams counted, SJD's steps made a lone ZipAR x SJD
    image's own setting look several times dearer than it ran, and it took raster order or ZipAR's
    rows alone. Here a lone image is best with its own rows and SJD windows (truth: 0.62 codes per
    ms against raster's 0.45 and ZipAR's rows' 0.40)."""
    rng = np.random.default_rng(0)
    cost = RowCost()
    for _ in range(600):
        kind = rng.choice(["raster", "sjd", "rows"])
        if kind == "raster":
            shape = StepShape(2)
        elif kind == "sjd":  # two streams feeding w - 1 drafts each
            d = 2 * int(rng.integers(3, 16))
            shape = StepShape(2, d, 2, 0, 0, other_wide=2, other_tokens=d)
        else:  # ZipAR x SJD's rows: their drafts in speculative slots, the codes committed before not
            d, e = 2 * int(rng.integers(6, 20)), 2 * int(rng.integers(1, 5))
            shape = StepShape(2, d, 2, e, 2 * int(rng.integers(20, 270)))
        rows = shape.wide_streams - shape.other_wide
        seconds = (2e-3 + 1e-4 * shape.sequences + 1e-4 * shape.other_wide + 2e-5 * shape.other_tokens
                   + 3e-4 * rows + 4e-5 * (shape.drafts + shape.extra - shape.other_tokens)
                   + 2e-6 * shape.wide_context + 1e-3 * (rows > 0))
        cost.observe(shape, seconds * rng.uniform(0.9, 1.1))
    options = [WindowOption(16, 1.0, 0.0, False, 129.0), WindowOption(8, 1.78, 0.9, True, 129.0),
               WindowOption(8, 3.5, 16.6, True, 129.0)]
    assert cost.choose(options, 2, 1, 2, 1, others_wide=False) == 2
    beta = cost.coefficients()
    assert beta[3] == pytest.approx(4e-5, rel=0.3) and beta[7] == pytest.approx(2e-5, rel=0.3)


def test_the_steps_the_row_model_sees(tiny_generator, policy):
    """The scheduler tells the row model which streams run rows: a ZipAR x SJD image's, each
    feeding about the tokens its option estimates (`zipar_sjd.row_drafts`: a row's window cut at the
    row's end); an SJD image's drafts are the other streams' tokens."""
    from vllm_visual_ar.samplers.zipar_sjd import ZipARSJD

    policy.rows = RowCost()
    tiny_generator.generate([1], guidance_scale=2.0, top_k=1, strategy="sjd", window=6)
    steps = list(policy.rows._steps[1]) + list(policy.rows._steps[0])
    assert not policy.rows._steps[1] and sum(x[7] > 0 for x, _ in steps) > 5  # SJD: other streams only
    policy.rows = RowCost()
    decoding = Decoding("zipar_sjd", 4, sjd_window=6)
    tiny_generator.generate([1], guidance_scale=2.0, top_k=1, strategy="zipar_sjd", window=4, sjd_window=6)
    request = SimpleNamespace(num_computed_tokens=0, num_output_tokens=0, num_prompt_tokens=1)
    own = ZipARSJD(tiny_generator.config, replace(decoding, load_aware=True)).window_options(request)[-1]
    fed = [x[3] / x[2] for x, _ in policy.rows._steps[1]]
    assert len(fed) > 5 and np.mean(fed) == pytest.approx(own.extra, rel=0.25)


def test_an_sjd_image_held_at_width_1_by_a_poor_start_comes_back_to_its_prior(tiny_generator):
    """SJD's yield moves across an image: evidence fades per forward, so an image whose first wide
    forwards accepted nothing, and which the policy then holds at width 1, drifts back to the prior
    slope (and a wider step that measures it again) instead of staying at width 1 for good."""
    from vllm_visual_ar.samplers.sjd import SJD

    tokens = tiny_generator.config.image_grid ** 2
    request = SimpleNamespace(num_output_tokens=1, num_computed_tokens=1, num_prompt_tokens=1, max_tokens=tokens,
                              spec_token_ids=[], sampling_params=SimpleNamespace(logprobs=None))
    sjd = SJD(tiny_generator.config, Decoding("sjd", 16, init="horizontal", load_aware=True))
    assert sjd.start(request) is None
    request.max_tokens = 1024  # room for the steps below (the tiny model's image is short)
    prior = sjd.width_choice(request).slope

    def step(width, committed):
        sjd.before_step(request, width)
        assert len(request.spec_token_ids) == width - 1
        request.num_output_tokens += committed
        request.num_computed_tokens = request.num_output_tokens
        return sjd.width_choice(request).slope

    for _ in range(4):
        poor = step(8, 1)  # nothing accepted
    assert poor < prior / 3
    held = [step(1, 1) for _ in range(60)]
    assert all(a < b for a, b in zip(held, held[1:])) and prior - held[-1] < (prior - poor) / 5
    assert step(16, 6) > held[-1]  # a wide step counts again


def test_a_load_aware_sjd_carry_stays_aligned_across_steps_at_width_1(tiny_generator):
    """The drafts an SJD forward carries past a rejection are for the positions after the tokens it
    committed. Steps at width 1 (vLLM's own path) commit tokens in between; the next wide step drafts
    each position with the draft made for that very position. Drafted one position off, as they
    were, the carry went on being verified at the wrong positions, accepted little, and a lone image
    whose width alternated learnt a low yield and stayed at width 1 (one in three, 250 forwards)."""
    from vllm_visual_ar.requests import ImageRequestInfo
    from vllm_visual_ar.samplers.sjd import SJDRunner
    from vllm_visual_ar.samplers.strategy import Step

    runner = SJDRunner(tiny_generator.config, None, "", "cpu")
    layout = runner.layout
    info = ImageRequestInfo("image", "single", 1.0, Decoding("sjd", 4, init="horizontal", load_aware=True))
    state = SimpleNamespace(output_token_ids=[layout.image_token_ids.start] * 5,
                            sampling_params=SimpleNamespace(temperature=1.0, top_k=0, top_p=1.0, seed=0))

    def step(fed):
        computed = 1 + len(state.output_token_ids) - 1  # one prompt token, then all but the last output
        return Step(["r"], np.array([0, fed]), np.array([computed]), np.array([1]), {"r": state}, {}, "cpu",
                    lambda _: info, None)

    def one_hot(codes):  # targets that put all mass on these codes, one per fed token
        logits = torch.full((len(codes), layout.codebook_size), -1e9)
        logits[torch.arange(len(codes)), torch.tensor(codes)] = 0.0
        return logits

    wide = step(4)  # the last token and 3 drafts (copies of code 0, horizontal)
    assert runner.prepare(wide, [0])[0].slot_tokens == [layout.image_token_ids.start] * 3
    committed = runner.emit(wide, [0], one_hot([1, 2, 3, 4]), [slice(0, 4)])[0]
    assert committed == [layout.image_token_ids.start + 1]  # the first draft rejected; 2, 3, 4 carried for the next
    state.output_token_ids += committed + [layout.image_token_ids.start + 9]  # then a step at width 1
    drafts = runner.prepare(step(4), [0])[0].slot_tokens
    assert drafts[:2] == [layout.image_token_ids.start + 3, layout.image_token_ids.start + 4]  # the draft for 2 is spent


def test_zipar_windows_chosen_at_admission_pay_alone_and_not_under_load():
    """The absolute step model (`RowCost`) learns what rows cost, context included; with it an image
    admitted alone takes its own window (ZipAR w=4 is 1.5x raster's images/s alone on this CPU) and
    one admitted beside 15 others raster order (ZipAR w=4 is 0.7-0.9x there). A model that has seen
    nothing yet gives the image its own window (its steps are the evidence)."""
    cost = RowCost()
    assert cost.choose(ZIPAR_W4, 2, 1, 2, 1) == 2
    simulated_rows(cost, np.random.default_rng(0))
    cost.observe(StepShape(32), 6e-3)  # the step it joins: 16 raster images
    assert cost.choose(ZIPAR_W4, 2, 1, 32, 16) == 0
    cost.observe(StepShape(2), 2.3e-3)  # alone
    assert cost.choose(ZIPAR_W4, 2, 1, 2, 1) == 2
    far = [replace(o, context=2000.0) for o in ZIPAR_W4]  # rows that read 2000 tokens back per layer
    assert cost.choose(far, 2, 1, 2, 1) == 0
    # rows cheap per stream but 3 ms of set-up per step that has any: a lone image refuses them, a
    # group admitted together, which pays the set-up once, takes them
    shared = RowCost()
    rng = np.random.default_rng(1)
    for _ in range(400):
        images = int(rng.choice([1, 4, 16]))
        wide = 2 * int(rng.integers(0, images + 1))
        shared.observe(StepShape(2 * images, 0, wide, 2 * wide, 136 * wide),
                       2e-3 + 1.2e-4 * 2 * images + 2e-5 * wide + 3e-3 * (wide > 0))
    shared.observe(StepShape(32), 5.84e-3)
    assert shared.choose(ZIPAR_W4, 2, 1, 32, 16) == 0 and shared.choose(ZIPAR_W4, 2, 16, 32, 16) == 2
    # eight images of a wave admitted with 24 queued behind them for room in the budget: raster order
    # lets the queue in, rows keep it out, and the eight take raster order; had the queue counted as
    # running beside their rows, they would have kept them
    assert shared.choose(ZIPAR_W4, 2, 8, 16, 8, queued=(48, 24)) == 0 and shared.choose(ZIPAR_W4, 2, 8, 64, 32) == 2
    # the last step ran rows: one image joining 15 raster ones shares the set-up the step pays anyway
    # and takes its own; where nothing ran before (the last step was another workload's) the step has
    # no set-up to share, and it takes raster order as above
    shared.observe(StepShape(4, 0, 2, 4, 272), 2e-3 + 4.8e-4 + 4e-5 + 3e-3)
    assert shared.choose(ZIPAR_W4, 2, 1, 32, 16) == 2 and shared.choose(ZIPAR_W4, 2, 1, 32, 16, others_wide=False) == 0
    policy = WidthPolicy()
    policy.rows = cost
    for _ in range(WidthPolicy.stale_after):
        policy.observe(StepShape(32), 6e-3)
    assert policy.options(ZIPAR_W4, 2, 2, 32, 16) == [2, 0]  # no rows for a while: one image probes them
    assert policy.options(ZIPAR_W4, 2, 1, 32, 16) == [0]
    for _ in range(WidthPolicy.stale_after):
        policy.observe(StepShape(2, 0, 2, 4, 300), 5e-3)
    assert policy.options(ZIPAR_W4, 2, 1, 2, 1) == [2]  # alone: no probe of raster order


def test_a_row_starts_where_the_step_s_codes_per_second_do_not_drop():
    """g T >= C dt on the absolute model's coefficients: a lone wide image (2 rows, 4 ms steps) starts a
    row that adds 0.4 ms, beside 14 other images it does not; an image still in raster order pays for
    the masked path (per stream and per token of context, and the step's set-up) and refuses where
    that costs, starts where it is cheap; a ZipAR x SJD row's drafts count, and a cheaper row started
    first in the step can tip it. Before 8 steps nothing is known: every row starts."""
    costly_path = frozen_rows((4e-3, 0, 1e-3, 2e-4, 5e-3, 1e-3))
    step = StepShape(4)  # T = 4 ms
    row = RowStart(2.0, 1.0, 1, True, 200, 2)  # dt = 2 x 0.2 ms
    assert costly_path.starts([row], step, 0) == [True]
    assert costly_path.starts([row], step, 14) == [False]
    first = RowStart(1.0, 1.9, 1.9, False, 200, 2)  # ZipAR w=4's rows: dt = 2 x (0.38 + 1 + 1) + 1 ms
    assert costly_path.starts([first], step, 0) == [True]  # alone: 1.9 x 4 >= 1 x 5.76
    assert costly_path.starts([first], step, 1) == [False]  # beside one other image: 7.6 < 2 x 5.76
    assert frozen_rows((4e-3, 0, 1e-4, 2e-4, 0, 0)).starts([first], step, 1) == [True]  # dt = 0.96 ms
    sjd_row = RowStart(1.0, 1.7, 5, True, 200, 2)  # dt = 2 x 5 x 0.2 = 2 ms
    assert costly_path.starts([sjd_row], step, 1) == [True]  # 1.7 x 4 >= 2 x 2
    assert costly_path.starts([row, sjd_row], step, 0) == [True, False]  # then 1.7 x 4.4 < 4 x 2
    assert RowCost().starts([row], step, 0) is None and WidthPolicy().row_starts([row, row], step, 0) == [True, True]


def test_widths_are_cut_to_the_spare_budget():
    assert cap_to_budget([16, 16, 4], [2, 2, 1], 10) == [3, 3, 3]
    assert cap_to_budget([16, 16, 4], [2, 2, 1], 12) == [4, 3, 3]
    assert cap_to_budget([16, 16], [2, 2], 0) == [1, 1]
    assert cap_to_budget([5, 3], [2, 2], 100) == [5, 3]


# -- the engine ----------------------------------------------------------------------------------------
def test_load_aware_coupled_sjd_keeps_coupled_rasters_images_at_any_load(tiny_generator):
    """Twelve guided images with window 64 in an engine of four in flight: widths vary step by step
    with the load, the images do not; every forward fits the step budget (no pair is split)."""
    classes = [i % 10 for i in range(12)]
    raster = tiny_generator.generate(classes, seed=3, coupled=True, **SAMPLED)
    loaded = tiny_generator.generate(classes, seed=3, coupled=True, strategy="sjd", window=64, load_aware=True,
                                     **SAMPLED)
    for r, s in zip(raster, loaded):
        assert torch.equal(r.codes, s.codes)
        assert s.stats.accepted_drafts == s.stats.tokens - s.stats.forward_passes
        assert 0 <= s.stats.accepted_drafts <= s.stats.draft_tokens


def test_wide_windows_fit_a_small_step_budget(tiny_generator):
    """A step budget of 64 tokens, far below what four guided images at window 64 would feed:
    load-aware images reserve width 2 and their steps are cut to the budget, never split."""
    from conftest import scheduler_of

    scheduler = scheduler_of(tiny_generator)
    budget = scheduler.max_num_scheduled_tokens
    scheduler.max_num_scheduled_tokens = 64  # the budget vLLM's scheduler and the admission read
    try:
        classes = [1, 2, 3, 4, 5, 6]
        raster = tiny_generator.generate(classes, seed=8, coupled=True, **SAMPLED)
        loaded = tiny_generator.generate(classes, seed=8, coupled=True, strategy="sjd", window=64, load_aware=True,
                                         **SAMPLED)
    finally:
        scheduler.max_num_scheduled_tokens = budget
    assert all(torch.equal(r.codes, s.codes) for r, s in zip(raster, loaded))


def test_the_width_of_each_forward_is_reported_and_within_the_window(tiny_generator):
    from vllm.sampling_params import RequestOutputKind

    from vllm_visual_ar.requests import Decoding, SamplingSettings, image_requests, step_width

    cfg, engine = tiny_generator.config, tiny_generator.llm.llm_engine
    tiny_generator.generate([1, 2, 3, 4], strategy="sjd", window=8, load_aware=True, **SAMPLED)  # cost model
    widths, committed = [], []
    for i in range(3):
        for j, (prompt, sp) in enumerate(image_requests(cfg, i, SamplingSettings(**SAMPLED), seed=i,
                                                        image_id=f"lw{i}",
                                                        decoding=Decoding("sjd", 8, load_aware=True))):
            sp.output_kind = RequestOutputKind.DELTA
            engine.add_request(f"lw{i}-{j}", prompt, sp)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id.endswith("-0") and out.outputs[0].token_ids and (w := step_width(out)) is not None:
                widths.append(w)
                committed.append(len(out.outputs[0].token_ids))
    assert widths and all(1 <= w <= 8 for w in widths)
    assert all(1 <= c <= w for c, w in zip(committed, widths))


def test_a_step_is_timed_with_the_work_around_its_forward_and_never_across_an_idle_wait(tiny_generator,
                                                                                       monkeypatch):
    """The cost models see a step from the start of its scheduling to the start of the next: the work
    around the forward (scheduling, the outputs' processing by the client) counts, as it does in
    images/s, and a decoding that takes fewer steps saves it. A step that leaves the engine with
    nothing to do is not timed: the next one may come after an idle wait."""
    import time

    from vllm.sampling_params import RequestOutputKind

    from vllm_visual_ar.requests import SamplingSettings, image_requests
    from conftest import scheduler_of

    engine = tiny_generator.llm.llm_engine
    policy = scheduler_of(tiny_generator)._width_policy
    seen = []
    observe = policy.observe
    monkeypatch.setattr(policy, "observe", lambda shape, seconds: (seen.append(seconds), observe(shape, seconds)))

    def run(name: str, pause: float) -> int:
        for j, (prompt, sp) in enumerate(image_requests(tiny_generator.config, 3, SamplingSettings(**SAMPLED), seed=1,
                                                        image_id=name)):
            sp.output_kind = RequestOutputKind.DELTA
            engine.add_request(f"{name}-{j}", prompt, sp)
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
            time.sleep(pause)  # a slow client between steps
        return steps

    steps = run("timed-slow", 0.02)
    assert len(seen) == steps - 1 and min(seen) >= 0.02  # the last step, after which the engine idles, is not timed
    time.sleep(0.3)
    seen.clear()
    steps = run("timed-fast", 0.0)
    assert len(seen) == steps - 1 and max(seen) < 0.3


@pytest.fixture
def policy(tiny_generator):
    """The engine's load policy, its cost models restored after the test."""
    from conftest import load_policy

    with load_policy(tiny_generator) as policy:
        yield policy


def test_greedy_load_aware_zipar_equals_reference_zipar_at_the_window_it_was_given(tiny_generator, tiny_model,
                                                                                    policy):
    """Load-aware ZipAR images get a window at admission and decode exactly as the reference does at
    that window: with a cost model that knows nothing their own (ZipAR w=4), with one that has learnt
    that rows cost more than they give beside other images raster order, for which they restart."""
    from vllm_visual_ar.model_executors.llamagen_reference import generate as reference_raster
    from vllm_visual_ar.model_executors.llamagen_reference import generate_zipar as reference_zipar
    from vllm_visual_ar.samplers.zipar import forward_passes

    _, ref = tiny_model
    grid, classes = tiny_generator.config.image_grid, [1, 2, 3, 4, 5, 6]
    zipar = reference_zipar(ref, classes, 4, guidance_scale=2.0, top_k=1).codes
    raster = reference_raster(ref, classes, guidance_scale=2.0, top_k=1).codes
    runs = {forward_passes(grid, grid, 4): zipar, grid * grid: raster}
    costly = RowCost()
    simulated_rows(costly, np.random.default_rng(0))
    costly.observe(StepShape(8), 3e-3)
    seen = []
    for rows in (RowCost(), costly):
        policy.rows, policy._since_rows, policy._since_plain = rows, 0, 0
        images = tiny_generator.generate(classes, guidance_scale=2.0, top_k=1, strategy="zipar", window=4,
                                         load_aware=True)
        for i, im in enumerate(images):
            assert torch.equal(im.codes.flatten(), runs[im.stats.forward_passes][i])
        seen.append(images[0].stats.forward_passes)  # the first admitted
    assert seen == [forward_passes(grid, grid, 4), grid * grid]


def test_paced_rows_start_only_in_steps_that_gain(tiny_generator, tiny_model, policy):
    """Load-aware ZipAR x SJD images that keep their own setting at admission start each row only in a
    step that gains from it (`sjd_window=1`: ZipAR's rows, paced). Rows free in every step: ZipAR's
    reference, image and forwards (the next test: ZipAR x SJD's). Rows too costly in every step: none
    starts early, each starts when the row above completes, which under greedy decoding is raster
    order: the raster reference's image, in one forward per token at sjd_window 1 and in fewer with
    the rows' own SJD windows (greedy SJD is exact)."""
    from vllm_visual_ar.model_executors.llamagen_reference import generate as reference_raster
    from vllm_visual_ar.model_executors.llamagen_reference import generate_zipar as reference_zipar
    from vllm_visual_ar.samplers.zipar import forward_passes

    _, ref = tiny_model
    grid, classes = tiny_generator.config.image_grid, [1, 2, 3, 4]
    raster = reference_raster(ref, classes, guidance_scale=2.0, top_k=1).codes
    policy.rows = frozen_rows(FREE_ROWS, keep_rows=True)
    images = tiny_generator.generate(classes, guidance_scale=2.0, top_k=1, strategy="zipar_sjd", window=4,
                                     sjd_window=1, load_aware=True)
    assert torch.equal(torch.stack([im.codes.flatten() for im in images]),
                       reference_zipar(ref, classes, 4, guidance_scale=2.0, top_k=1).codes)
    assert [im.stats.forward_passes for im in images] == [forward_passes(grid, grid, 4)] * len(classes)
    policy.rows = frozen_rows(COSTLY_ROWS, keep_rows=True)  # admission keeps the rows; no step starts one
    images = tiny_generator.generate(classes, guidance_scale=2.0, top_k=1, strategy="zipar_sjd", window=4,
                                     sjd_window=1, load_aware=True)
    assert torch.equal(torch.stack([im.codes.flatten() for im in images]), raster)
    assert [im.stats.forward_passes for im in images] == [grid * grid] * len(classes)
    images = tiny_generator.generate(classes, guidance_scale=2.0, top_k=1, strategy="zipar_sjd", window=4,
                                     sjd_window=6, load_aware=True)
    assert torch.equal(torch.stack([im.codes.flatten() for im in images]), raster)
    assert all(im.stats.forward_passes < grid * grid for im in images)


def test_load_aware_zipar_sjd_falls_back_to_zipar_rows_or_raster_order(tiny_generator, tiny_model, policy):
    """Load-aware ZipAR x SJD offers raster order and ZipAR's rows alone (both restarting it as strategy
    "zipar") beside its own rows and SJD windows. Greedy: with a cost model that keeps rows and finds
    them free in every step an image keeps its own and equals the ZipAR x SJD reference; with one
    where rows cost more than they give it restarts in raster order, vLLM's own path, and equals the
    raster reference."""
    from vllm_visual_ar.model_executors.llamagen_reference import generate as reference_raster
    from vllm_visual_ar.model_executors.llamagen_reference import generate_zipar_sjd as reference_zipar_sjd
    from vllm_visual_ar.samplers.zipar_sjd import ZipARSJD

    _, ref = tiny_model
    grid, classes = tiny_generator.config.image_grid, [1, 2, 3, 4]
    decoding = Decoding("zipar_sjd", 4, sjd_window=6, load_aware=True)
    request = SimpleNamespace(num_computed_tokens=0, num_output_tokens=0, num_prompt_tokens=1)
    options = ZipARSJD(tiny_generator.config, decoding).window_options(request)
    assert [(o.window, o.decoding) for o in options] == [
        (grid, Decoding("zipar", grid, load_aware=True)), (4, Decoding("zipar", 4, load_aware=True)), (4, None)]
    assert options[0].commits < options[1].commits < options[2].commits and not options[0].wide
    raster = reference_raster(ref, classes, guidance_scale=2.0, top_k=1).codes
    policy.rows, policy._since_rows, policy._since_plain = frozen_rows(FREE_ROWS), 0, 0
    images = tiny_generator.generate(classes, guidance_scale=2.0, top_k=1, strategy="zipar_sjd", window=4,
                                     sjd_window=6, load_aware=True)
    for c, im in zip(classes, images):
        expected = reference_zipar_sjd(ref, c, 4, 6, guidance_scale=2.0, top_k=1)
        assert torch.equal(im.codes.flatten(), expected.codes[0])
        assert im.stats.forward_passes == expected.forward_passes
    policy.rows, policy._since_rows, policy._since_plain = frozen_rows(COSTLY_ROWS), 0, 0
    images = tiny_generator.generate(classes, guidance_scale=2.0, top_k=1, strategy="zipar_sjd", window=4,
                                     sjd_window=6, load_aware=True)
    assert torch.equal(torch.stack([im.codes.flatten() for im in images]), raster)
    assert [im.stats.forward_passes for im in images] == [grid * grid] * len(classes)


def test_images_admitted_a_few_at_a_time_weigh_the_wave_queued_behind_them(tiny_generator, policy):
    """A step budget of 100 tokens admits one load-aware ZipAR x SJD image at a time (its own rows
    reserve 90). Under a cost model where a lone image gains from its rows and a step of four does
    not, the lone image keeps them, and the first image of a wave of four, weighing the step with the
    three queued behind it, takes raster order, and so does the rest of the wave. Weighing only
    itself, it kept its rows and its reservation held the wave back (64 in flight on the embedded
    model: 0.55x raster's images/s). Raster order's reservation is small: the image that took it
    frees room in the same step, and the whole wave is admitted in that step."""
    from conftest import scheduler_of

    scheduler = scheduler_of(tiny_generator)
    grid, budget = tiny_generator.config.image_grid, scheduler.max_num_scheduled_tokens
    # a + b s + c m: a lone image's rows pay (2.6 codes for 2c more), four images' step does not
    policy.rows, policy._since_rows, policy._since_plain = frozen_rows((2e-2, 5e-3, 2e-2, 0, 0, 0)), 0, 0
    decoding = dict(strategy="zipar_sjd", window=4, sjd_window=6, load_aware=True, guidance_scale=2.0, top_k=1)
    admitted = []  # requests admitted per step, while any waited
    scheduler._admissible_groups = lambda: admitted.append(type(scheduler)._admissible_groups(scheduler)) or \
        admitted[-1]
    scheduler.max_num_scheduled_tokens = 100
    try:
        alone = tiny_generator.generate([1], **decoding)
        del admitted[:]
        wave = tiny_generator.generate([1, 2, 3, 4], **decoding)
    finally:
        scheduler.max_num_scheduled_tokens = budget
        del scheduler._admissible_groups
    assert alone[0].stats.forward_passes < grid * grid
    assert [im.stats.forward_passes for im in wave] == [grid * grid] * 4
    assert [len(a) for a in admitted if a] == [8]  # four guided images, in one step


def test_an_image_admitted_to_an_idle_engine_weighs_a_step_without_the_last_workload_s_rows(tiny_generator,
                                                                                              policy):
    """The cost model's picture of the step an image joins is the last step run. In an idle engine
    that was another workload's: had it run rows, the set-up of the masked path (f) would look paid
    already, and a lone image would take rows that it alone pays for."""
    from conftest import frozen_rows

    grid = tiny_generator.config.image_grid
    decoding = dict(strategy="zipar_sjd", window=4, sjd_window=6, load_aware=True, guidance_scale=2.0, top_k=1)
    policy.rows, policy._since_rows, policy._since_plain = frozen_rows((2e-2, 5e-3, 1e-3, 0, 0, 0.1)), 0, 0
    policy.rows._last = policy.rows.features(StepShape(2, 0, 2, 4, 300))  # the last step: a pair running rows
    assert tiny_generator.generate([1], **decoding)[0].stats.forward_passes == grid * grid


def test_images_held_at_width_1_are_neither_asked_nor_prepared_while_the_hold_stands(tiny_generator, tiny_model,
                                                                                     policy, monkeypatch):
    """Under load, a choice that holds every image at width 1 stands for `hold_steps` steps of the same
    batch, in which the scheduler does not call the images' strategies (one call per stream and step
    was most of what load-aware SJD cost over raster in a loaded step). The held forwards are still
    counted: each image reports width 1 for every forward (no drafts in its statistics), gives greedy
    raster's image, and its yield estimate fades for each held forward as for one it was asked about."""
    from vllm_visual_ar.model_executors.llamagen_reference import generate as reference_raster
    from vllm_visual_ar.samplers.sjd import SJD

    _, ref = tiny_model
    classes = [1, 2, 3, 4]
    costly = WidthPolicy()
    simulated_policy(costly, 64, 200, np.random.default_rng(5), draft=1e-2, wide_stream=1e-1)  # drafts never pay
    calls = {"before_step": 0, "width_choice": 0}
    for name in calls:
        original = getattr(SJD, name)

        def counted(self, *args, _original=original, _name=name):
            calls[_name] += 1
            return _original(self, *args)
        monkeypatch.setattr(SJD, name, counted)
    kept = policy.cost, policy._next_probe, policy._probe_wait
    policy.cost, policy._next_probe, policy._probe_wait = costly.cost, 10**9, 10**9
    try:
        images = tiny_generator.generate(classes, guidance_scale=2.0, top_k=1, strategy="sjd", window=8,
                                         load_aware=True)
    finally:
        policy.cost, policy._next_probe, policy._probe_wait = kept
    tokens = tiny_generator.config.image_grid ** 2
    assert torch.equal(torch.stack([im.codes.flatten() for im in images]),
                       reference_raster(ref, classes, guidance_scale=2.0, top_k=1).codes)
    assert all(im.stats.forward_passes == tokens and im.stats.draft_tokens == 0 for im in images)
    streams = 2 * len(classes)
    asked = -(-tokens // WidthPolicy.hold_steps) + 2  # a choice per hold, and the prompt's forward
    assert calls["before_step"] <= streams * asked and calls["width_choice"] <= len(classes) * asked

    # the estimate of an image asked every step, and of one held between asks, after the same forwards
    request = SimpleNamespace(num_output_tokens=1, num_computed_tokens=1, num_prompt_tokens=1, max_tokens=1024,
                              spec_token_ids=[])
    asked_each, held = (SJD(tiny_generator.config, Decoding("sjd", 16, load_aware=True)) for _ in range(2))
    for sjd in (asked_each, held):
        sjd.start(request)
        sjd._accepted, sjd._log_widths = 0.0, 10.0  # a poor start
    slopes = []
    for sjd, asks in ((asked_each, range(9)), (held, (0, 8))):
        request.num_output_tokens = 1
        for forward in range(9):
            if forward in asks:
                sjd.before_step(request, 1)
            assert sjd.step_width(request) == 1
            request.num_output_tokens += 1
        slopes.append(sjd.width_choice(request).slope)
    assert slopes[0] == pytest.approx(slopes[1]) and slopes[0] > 0.1


def test_greedy_load_aware_sjd_equals_greedy_raster(tiny_generator, tiny_model):
    from vllm_visual_ar.model_executors.llamagen_reference import generate as reference_raster

    _, ref = tiny_model
    images = tiny_generator.generate([5, 6, 7, 8, 9], guidance_scale=2.0, top_k=1, strategy="sjd", window=16,
                                     load_aware=True)
    expected = reference_raster(ref, [5, 6, 7, 8, 9], guidance_scale=2.0, top_k=1).codes
    assert torch.equal(torch.stack([im.codes.flatten() for im in images]), expected)


def test_bad_load_aware_arguments_are_value_errors(tiny_generator):
    with pytest.raises(ValueError, match="load_aware must be true or false"):
        tiny_generator.generate([1], strategy="sjd", load_aware="yes")
    with pytest.raises(ValueError, match="load_aware applies to strategies 'zipar', 'sjd' and 'zipar_sjd' only"):
        tiny_generator.generate([1], load_aware=True)
