"""Speculative Jacobi Decoding: the acceptance rule on its own (exact in distribution), then vLLM's
engine: greedy SJD equals greedy raster token for token, and sampled SJD images follow the exact
distribution of a tiny model whose outputs can be enumerated."""
import itertools
import math

import pytest
import torch
from conftest import chi_square_p, enumerate_images, finish_reasons, scheduler_of, step_until_done

from vllm_visual_ar.model_executors.llamagen_reference import generate as reference_raster
from vllm_visual_ar.model_executors.llamagen_reference import generate_sjd as reference_sjd
from vllm_visual_ar.model_executors.llamagen_reference import generate_zipar as reference_zipar
from vllm_visual_ar.requests import Decoding, SamplingSettings, image_requests
from vllm_visual_ar.samplers.sjd import Drafts, fill_drafts, target_probs, verify, verify_batch, verify_prefix

GREEDY = dict(top_k=1)


# -- the rule as plain logic, on a synthetic model -------------------------------------------------
def synthetic_probs(prefix: tuple, vocab: int, temperature: float, top_k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(prefix) % (2**31))
    logits = torch.randn(vocab, generator=g) * 1.5
    return target_probs(logits[None], temperature, top_k, 1.0)[0]


def sjd_sample(length, vocab, window, init, temperature, top_k, generator, carry=True, continued=False):
    """SJD over the synthetic model, the loop the runner runs."""
    tokens = [int(torch.multinomial(synthetic_probs((), vocab, temperature, top_k), 1, generator=generator))]
    carried = Drafts.empty(vocab)
    while len(tokens) < length:
        k = min(window, length - len(tokens))
        drafts = fill_drafts(carried, k - 1, init, vocab, tokens[-1], len(tokens), 2, generator)
        p = torch.stack([synthetic_probs(tuple(tokens + drafts.tokens[:j]), vocab, temperature, top_k)
                         for j in range(k)])
        committed, carried = verify(p, drafts, generator, continued=continued)
        assert 1 <= len(committed) <= k
        if not carry:
            carried = Drafts.empty(vocab)
        tokens += committed
    return tuple(tokens)


def exact_distribution(length, vocab, temperature, top_k) -> dict[tuple, float]:
    out = {}
    for seq in itertools.product(range(vocab), repeat=length):
        prob = 1.0
        for i in range(length):
            prob *= float(synthetic_probs(seq[:i], vocab, temperature, top_k)[seq[i]])
        out[seq] = prob
    return out


def one_image_verify(p, drafts, generator, continued=False, ratio=None):
    """SJD's rule for one image written out plainly, as the authors' loop reads (the oracle of
    `verify_batch`): the uniforms, the first rejection, its residual draw (or a bonus token), then
    the carry: fresh samples of the later targets, or with continuation each later draft kept where
    it passes, else its residual draw, and a sample of the last target. Same draws, same order.
    `ratio`: the drafts' acceptance ratios when not SJD's own (relaxed, group); continuation still
    keeps a later draft by SJD's."""
    from vllm_visual_ar.samplers.sjd import draw, residual_draw

    k = p.shape[0]
    u = torch.rand(k, generator=generator)
    tokens = torch.tensor(drafts.tokens, dtype=torch.long)
    passes = [bool(u[i] < min(1.0, float(p[i, t] / drafts.q[i, t]))) for i, t in enumerate(drafts.tokens)]
    accepted = passes if ratio is None else [bool(u[i] < min(1.0, float(ratio[i]))) for i in range(k - 1)]
    if all(accepted):
        return drafts.tokens + [int(draw(p[k - 1:], generator)[0])], Drafts.empty(p.shape[1])
    j = accepted.index(False) + 1
    committed = drafts.tokens[: j - 1] + [int(residual_draw(p[j - 1: j], drafts.q[j - 1: j], generator)[0])]
    if continued and j < k - 1:
        redrawn = residual_draw(p[j: k - 1], drafts.q[j:], generator).tolist()
        carried = [int(tokens[m]) if passes[m] else redrawn[m - j] for m in range(j, k - 1)]
        carried.append(int(draw(p[k - 1:], generator)[0]))
    else:
        carried = draw(p[j:], generator).tolist()
    return committed, Drafts(carried, p[j:])


def test_verification_alone_and_batched_is_the_plain_rule_to_the_bit():
    """The engine verifies the images of a step together (`verify_batch`; `verify` is its one-image
    case): each image, drawing from its own generator, must get what the plain rule gives it alone
    (committed tokens, carried drafts and their q), with or without continuation, whatever the
    others' windows, drafts (sampled or initialised), acceptance ratios (SJD's own or given, as
    relaxed and group acceptance give them) and outcomes."""
    vocab = 7
    rng = torch.Generator().manual_seed(3)
    for trial in range(40):
        images = []
        for i in range(int(torch.randint(1, 6, (1,), generator=rng))):
            k = int(torch.randint(1, 9, (1,), generator=rng))
            p = torch.randn(k, vocab, generator=rng).mul(2).softmax(-1)
            sampled = int(torch.randint(0, k, (1,), generator=rng))  # drafts carried with a real q, then one-hot
            q = torch.cat([torch.randn(sampled, vocab, generator=rng).softmax(-1),
                           torch.eye(vocab)[torch.randint(0, vocab, (k - 1 - sampled,), generator=rng)]])
            tokens = [int(torch.multinomial(row, 1, generator=rng)) if j < sampled else int(row.argmax())
                      for j, row in enumerate(q)]
            if trial % 4 == 0 and k > 1:  # drafts that the targets hold likely: long accepted runs, bonus tokens
                tokens = p[:-1].argmax(-1).tolist()
                q = torch.eye(vocab)[tokens]
            given = torch.rand(k - 1, generator=rng) * 1.5 if trial % 3 == 1 and i % 2 else None
            images.append((p, Drafts(tokens, q), 100 * trial + i, bool(torch.randint(0, 2, (1,), generator=rng)),
                           given))
        plain = [one_image_verify(p, d, torch.Generator().manual_seed(seed), c, r) for p, d, seed, c, r in images]
        alone = [verify_batch([p], [d], [torch.Generator().manual_seed(seed)], [c], [r])[0]
                 for p, d, seed, c, r in images]
        together = verify_batch([p for p, *_ in images], [d for _, d, *_ in images],
                                [torch.Generator().manual_seed(seed) for _, _, seed, *_ in images],
                                [c for *_, c, _ in images], [r for *_, r in images])
        for want, *got in zip(plain, alone, together):
            for committed, carried in got:
                assert committed == want[0]
                assert carried.tokens == want[1].tokens and torch.equal(carried.q, want[1].q)


def test_a_window_held_back_commits_its_first_tokens_and_carries_what_it_settled_past_them():
    """ZipAR x SJD: a row may commit only up to the column the row above allows (`verify_prefix`). The
    whole window is verified; the tokens the test settled past that column (accepted drafts, the
    draw at the first rejection, the bonus) lead the next drafts with their targets as q, so that
    the drafts after them keep the context they were predicted from, then the window's own carry."""
    vocab = 6
    rng = torch.Generator().manual_seed(5)
    cut = 0
    for trial in range(60):
        k = int(torch.randint(1, 9, (1,), generator=rng))
        p = torch.randn(k, vocab, generator=rng).mul(3).softmax(-1)
        tokens = p[:-1].argmax(-1).tolist() if trial % 2 else torch.randint(0, vocab, (k - 1,), generator=rng).tolist()
        drafts, continued = Drafts(tokens, torch.eye(vocab)[tokens]), trial % 3 == 0
        full, carry = verify(p, drafts, torch.Generator().manual_seed(trial), continued=continued)
        for upto in range(1, k + 1):
            committed, carried = verify_prefix(p, drafts, upto, torch.Generator().manual_seed(trial),
                                               continued=continued)
            n = min(upto, len(full))
            cut += n < len(full)
            assert committed == full[:n]
            assert carried.tokens == full[n:] + carry.tokens
            assert torch.equal(carried.q, p[n:])
    assert cut > 20  # windows that settled more than they could commit


@pytest.mark.parametrize("window,init,temperature,top_k,continued", [
    (3, "random", 1.0, 0, False), (4, "horizontal", 0.8, 0, False), (5, "random", 1.3, 2, False),
    (4, "random", 1.0, 0, True), (5, "horizontal", 1.3, 2, True)])
def test_sjd_is_exact_in_distribution(window, init, temperature, top_k, continued):
    """Plain SJD, and with adaptive continuation (the drafts after a rejection kept where they pass)."""
    length, vocab, n = 4, 3, 6000
    g = torch.Generator().manual_seed(0)
    samples = [sjd_sample(length, vocab, window, init, temperature, top_k, g, continued=continued) for _ in range(n)]
    assert chi_square_p(samples, exact_distribution(length, vocab, temperature, top_k)) > 1e-3


def off_verify(p, drafts, generator, continued=False):
    """`verify` with the authors' pitfall: a sampled draft's acceptance ratio uses q(x) = 1 while
    its residual uses the q it was really drawn from (an inconsistent pair: biased)."""
    from vllm_visual_ar.samplers.sjd import draw

    k = p.shape[0]
    u = torch.rand(k, generator=generator)
    samples = draw(p, generator)
    committed = []
    for j in range(1, k):
        x, pj, qj = drafts.tokens[j - 1], p[j - 1], drafts.q[j - 1]
        if u[j - 1] < torch.clamp(pj[x] / 1.0, max=1.0):
            committed.append(x)
            continue
        residual = torch.clamp(pj - qj, min=0)
        committed.append(int(draw((residual / residual.sum() if residual.sum() > 0 else pj)[None], generator)[0]))
        return committed, Drafts(samples[j:].tolist(), p[j:])
    committed.append(int(samples[k - 1]))
    return committed, Drafts.empty(p.shape[1])


def test_an_acceptance_rule_that_is_a_little_off_is_caught(monkeypatch):
    """The same test statistic rejects the pitfall above, so the exactness test can fail."""
    import test_sjd as this

    monkeypatch.setattr(this, "verify", off_verify)
    length, vocab, n = 4, 3, 6000
    g = torch.Generator().manual_seed(0)
    samples = [sjd_sample(length, vocab, 3, "random", 1.0, 0, g) for _ in range(n)]
    assert chi_square_p(samples, exact_distribution(length, vocab, 1.0, 0)) < 1e-3


def test_a_continuation_that_keeps_drafts_without_testing_them_is_caught(monkeypatch):
    """Continuation carries a draft only if it passes against its new target; carrying every old
    draft (claiming the new target as its q) is biased, and the exactness test sees it."""
    import test_sjd as this

    real = this.verify

    def keep_all(p, drafts, generator, continued=False):
        committed, carried = real(p, drafts, generator)
        old = drafts.tokens[len(committed):]
        return committed, Drafts(old + carried.tokens[len(old):], carried.q)

    monkeypatch.setattr(this, "verify", keep_all)
    length, vocab, n = 4, 3, 6000
    g = torch.Generator().manual_seed(0)
    samples = [sjd_sample(length, vocab, 4, "random", 1.0, 0, g, continued=True) for _ in range(n)]
    assert chi_square_p(samples, exact_distribution(length, vocab, 1.0, 0)) < 1e-3


def test_greedy_targets_make_sjd_greedy_and_a_zero_residual_does_not_crash():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # The draft is the argmax: accepted, then the bonus is the argmax.
    assert verify(p, Drafts([1], torch.tensor([[0.0, 1.0, 0.0]])), None)[0] == [1, 2]
    # A draft whose q equals p exactly is always accepted; p == q leaves a zero residual, never used.
    assert verify(p, Drafts([1], p[:1].clone()), None)[0] == [1, 2]
    # Rejected: the residual is the argmax.
    committed, carried = verify(p, Drafts([0], torch.tensor([[1.0, 0.0, 0.0]])), None)
    assert committed == [1] and carried.tokens == [2] and torch.equal(carried.q, p[1:])


# -- the plain-PyTorch SJD loop (benchmarks/bench_device.py times it where vLLM cannot run) -------
@pytest.mark.parametrize("window,guidance_scale,continued", [(4, 3.0, False), (16, 1.0, True), (64, 3.0, True)])
def test_reference_sjd_under_greedy_targets_is_reference_raster(tiny_model, window, guidance_scale, continued):
    _, ref = tiny_model
    for label in (1, 7):
        result = reference_sjd(ref, label, window, guidance_scale=guidance_scale, continued=continued, **GREEDY)
        expected = reference_raster(ref, [label], guidance_scale=guidance_scale, **GREEDY)
        assert torch.equal(result.codes, expected.codes)
        assert -(-(ref.config.num_image_tokens - 1) // window) + 1 <= result.forward_passes < 64


@pytest.mark.parametrize("window,continued,candidates", [(3, False, 1), (4, True, 1), (2, False, 3), (4, True, 2)])
def test_reference_sjd_samples_follow_the_exact_distribution(enumerable_model, window, continued, candidates):
    """Plain, with continuation, and with sibling candidates at the first draft (a two-level tree)."""
    _, ref = enumerable_model
    sampling = dict(guidance_scale=2.0, temperature=1.0, top_k=0)
    g = torch.Generator().manual_seed(0)
    samples = [tuple(reference_sjd(ref, 1, window, generator=g, continued=continued, candidates=candidates,
                                   **sampling).codes[0].tolist()) for _ in range(2000)]
    assert chi_square_p(samples, enumerate_images(ref, 1, **sampling)) > 1e-3


def test_reference_sjd_continues_from_an_accepted_sibling_in_its_own_context(tiny_model, monkeypatch):
    """Siblings forced at every forward (each forward then commits a sibling and the token after it):
    the token after a sibling must be the target its own query gives, at its position, seeing the
    committed tokens and itself: under greedy targets, the teacher-forced argmax after it."""
    import vllm_visual_ar.samplers.sjd as sjd

    _, ref = tiny_model
    cfg, label, scale = ref.config, 3, 3.0
    monkeypatch.setattr(sjd, "draw_candidates", lambda q, first, count, g: [(first + 1) % cfg.codebook_size])
    monkeypatch.setattr(sjd, "verify_candidates", lambda p, candidates, q, g: (candidates[1], 1))
    result = reference_sjd(ref, label, 4, guidance_scale=scale, candidates=2, **GREEDY)
    codes = result.codes
    assert result.forward_passes == 1 + (cfg.num_image_tokens - 1 + 1) // 2
    with torch.no_grad():
        cond = ref(torch.tensor([label]), codes[:, :-1])
        uncond = ref(torch.tensor([cfg.num_classes]), codes[:, :-1])
    greedy = (uncond + scale * (cond - uncond)).argmax(-1)[0]
    after_sibling = list(range(0, cfg.num_image_tokens, 2))  # the first code, then each sibling's successor
    assert torch.equal(codes[0, after_sibling], greedy[after_sibling])


def test_several_candidates_for_one_position_are_an_exact_sample_of_its_target():
    """The multi-candidate rule on its own (candidates drawn from q without replacement): exact, and
    it accepts a candidate more often than one draft does."""
    from vllm_visual_ar.samplers.sjd import draw_candidates, verify_candidates

    p = torch.tensor([0.5, 0.1, 0.3, 0.1, 0.0])
    q = torch.tensor([0.1, 0.4, 0.1, 0.2, 0.2])
    g = torch.Generator().manual_seed(0)
    accepted = {}
    for count in (1, 3):
        tokens, hits = [], 0
        for _ in range(6000):
            first = int(torch.multinomial(q, 1, generator=g))
            token, chosen = verify_candidates(p, [first] + draw_candidates(q, first, count, g), q, g)
            tokens.append((token,))
            hits += chosen is not None
        assert chi_square_p(tokens, {(i,): float(v) for i, v in enumerate(p) if v > 0}) > 1e-3
        accepted[count] = hits / 6000
    assert accepted[3] > accepted[1] + 0.2  # 1 - TV(p, q) = 0.4 for one draft; about 0.78 with three
    assert draw_candidates(torch.tensor([0.0, 1.0, 0.0]), 1, 3, g) == []  # a one-hot q has no siblings


# -- the engine ----------------------------------------------------------------------------------
@pytest.mark.parametrize("window,init", [(2, "random"), (4, "horizontal"), (16, "random"), (64, "horizontal")])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_greedy_sjd_equals_greedy_raster(tiny_generator, tiny_model, window, init, guidance_scale):
    _, ref = tiny_model
    images = tiny_generator.generate([1, 7, 7], guidance_scale=guidance_scale, strategy="sjd", window=window,
                                     init=init, **GREEDY)
    expected = reference_raster(ref, [1, 7, 7], guidance_scale=guidance_scale, **GREEDY).codes
    assert torch.equal(torch.stack([im.codes.flatten() for im in images]), expected)
    n = tiny_generator.config.num_image_tokens
    for im in images:
        s = im.stats
        assert s.tokens == n and -(-(n - 1) // window) + 1 <= s.forward_passes <= n
        assert s.accepted_drafts == n - s.forward_passes  # each forward commits its accepted drafts + 1
        assert 0 <= s.acceptance_rate <= 1


@pytest.mark.parametrize("window,guidance_scale", [(4, 3.0), (16, 1.0)])
def test_greedy_sjd_with_continuation_equals_greedy_raster(tiny_generator, tiny_model, window, guidance_scale):
    _, ref = tiny_model
    images = tiny_generator.generate([2, 8], guidance_scale=guidance_scale, strategy="sjd", window=window,
                                     continue_after_reject=True, **GREEDY)
    expected = reference_raster(ref, [2, 8], guidance_scale=guidance_scale, **GREEDY).codes
    assert torch.equal(torch.stack([im.codes.flatten() for im in images]), expected)
    assert all(im.stats.forward_passes <= im.stats.tokens for im in images)


@pytest.mark.parametrize("guidance_scale,continued", [(3.0, False), (1.0, True)])
def test_forced_siblings_in_the_engine_equal_the_reference_loop(tiny_generator, tiny_model, monkeypatch,
                                                                guidance_scale, continued):
    """Siblings of the first draft, forced at every forward that has drafts and always accepted: each
    such forward commits a sibling and the token its own query gives, so that token shows the
    sibling's position, its attention (the committed tokens, x0 and itself, not the chain) and its
    key/value, which the next forward feeds again. Under greedy targets the engine must then give
    the reference loop's codes and forward count, alone and beside raster and ZipAR images."""
    import vllm_visual_ar.samplers.sjd as sjd

    _, ref = tiny_model
    cfg, engine, scheduler = tiny_generator.config, tiny_generator.llm.llm_engine, scheduler_of(tiny_generator)
    monkeypatch.setattr(sjd, "draw_candidates", lambda q, first, count, g: [(first + 1) % cfg.codebook_size])
    monkeypatch.setattr(sjd, "verify_candidates", lambda p, candidates, q, g: (candidates[1], 1))
    decoding = dict(strategy="sjd", window=4, init="horizontal", draft_candidates=2, continue_after_reject=continued)
    expected = [reference_sjd(ref, c, 4, guidance_scale=guidance_scale, candidates=2, continued=continued, **GREEDY)
                for c in (3, 6)]
    images = tiny_generator.generate([3, 6], guidance_scale=guidance_scale, **decoding, **GREEDY)
    for image, want in zip(images, expected):
        assert torch.equal(image.codes.flatten(), want.codes[0])
        assert image.stats.forward_passes == want.forward_passes
    raster = reference_raster(ref, [3], guidance_scale=guidance_scale, **GREEDY).codes[0]
    assert not torch.equal(expected[0].codes[0], raster)  # the forcing shows
    idle_free = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    plan = [(0, 3, Decoding("sjd", 4, "horizontal", draft_candidates=2, continue_after_reject=continued or None)),
            (0, 3, Decoding()), (2, 5, Decoding("zipar", 2)),
            (3, 6, Decoding("sjd", 4, "horizontal", draft_candidates=2, continue_after_reject=continued or None))]
    submit_at: dict[int, list] = {}
    for i, (step, c, decoding) in enumerate(plan):
        reqs = image_requests(cfg, c, SamplingSettings(guidance_scale=guidance_scale, **GREEDY), image_id=f"sib{i}",
                              decoding=decoding)
        submit_at.setdefault(step, []).extend((f"sib{i}-{j}", prompt, sp) for j, (prompt, sp) in enumerate(reqs))
    done = step_until_done(engine, submit_at)
    wanted = [expected[0].codes[0], raster,
              reference_zipar(ref, [5], 2, guidance_scale=guidance_scale, **GREEDY).codes[0], expected[1].codes[0]]
    for i, want in enumerate(wanted):
        assert torch.equal(torch.tensor(done[f"sib{i}-0"].token_ids), want), i
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == idle_free


def test_greedy_sjd_with_unforced_siblings_equals_greedy_raster(tiny_generator, tiny_model):
    """Greedy carried drafts are one-hot, so no sibling is drawn: the sibling slots are fed and not read."""
    _, ref = tiny_model
    images = tiny_generator.generate([2, 9], guidance_scale=3.0, strategy="sjd", window=8, draft_candidates=3,
                                     **GREEDY)
    expected = reference_raster(ref, [2, 9], guidance_scale=3.0, **GREEDY).codes
    assert torch.equal(torch.stack([im.codes.flatten() for im in images]), expected)


def test_every_forward_commits_between_one_and_window_tokens(tiny_generator):
    from vllm.sampling_params import RequestOutputKind

    cfg, engine = tiny_generator.config, tiny_generator.llm.llm_engine
    window = 5
    reqs = image_requests(cfg, 3, SamplingSettings(guidance_scale=2.0, temperature=1.0, top_k=5), seed=1,
                          image_id="perstep", decoding=Decoding("sjd", window))
    for i, (prompt, sp) in enumerate(reqs):
        sp.output_kind = RequestOutputKind.DELTA
        engine.add_request(f"perstep-{i}", prompt, sp)
    per_step = {0: [], 1: []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            per_step[int(out.request_id[-1])].append(list(out.outputs[0].token_ids))
    cond, uncond = per_step[0], per_step[1]
    assert cond == uncond  # both guidance streams take the same tokens, forward by forward
    assert sum(len(t) for t in cond) == cfg.num_image_tokens
    assert all(1 <= len(t) <= window for t in cond) and max(len(t) for t in cond) > 1


def test_sjd_raster_and_zipar_share_a_batch(tiny_generator, tiny_model):
    _, ref = tiny_model
    cfg, engine, scheduler = tiny_generator.config, tiny_generator.llm.llm_engine, scheduler_of(tiny_generator)
    idle_free = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    plan = [(0, 1, 3.0, Decoding("sjd", 4)), (0, 2, 1.0, Decoding()), (3, 3, 2.0, Decoding("zipar", 2)),
            (3, 4, 1.0, Decoding("sjd", 16, "horizontal")), (6, 5, 3.0, Decoding("sjd", 8)), (6, 6, 2.0, Decoding())]
    submit_at: dict[int, list] = {}
    for i, (step, c, s, decoding) in enumerate(plan):
        reqs = image_requests(cfg, c, SamplingSettings(guidance_scale=s, **GREEDY), image_id=f"sj{i}",
                              decoding=decoding)
        for j, (prompt, sp) in enumerate(reqs):
            submit_at.setdefault(step + (2 if (i == 0 and j == 1) else 0), []).append((f"sj{i}-{j}", prompt, sp))
    done = step_until_done(engine, submit_at)
    for i, (_, c, s, decoding) in enumerate(plan):
        if decoding.strategy == "zipar":
            expected = reference_zipar(ref, [c], decoding.window, guidance_scale=s, **GREEDY).codes[0]
        else:
            expected = reference_raster(ref, [c], guidance_scale=s, **GREEDY).codes[0]
        assert torch.equal(torch.tensor(done[f"sj{i}-0"].token_ids), expected), i
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == idle_free


def test_abort_mid_image_frees_the_pair(tiny_generator):
    cfg, engine, scheduler = tiny_generator.config, tiny_generator.llm.llm_engine, scheduler_of(tiny_generator)
    idle_free = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    for i, (prompt, sp) in enumerate(image_requests(cfg, 5, SamplingSettings(guidance_scale=4.0), image_id="sabort",
                                                    decoding=Decoding("sjd", 8))):
        engine.add_request(f"sabort-{i}", prompt, sp)
    for _ in range(4):
        engine.step()
    assert len(scheduler.running) == 2
    engine.abort_request(["sabort-0"])
    step_until_done(engine, max_steps=20)
    assert not scheduler.requests and scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == idle_free


@pytest.mark.parametrize("candidates", [None, 3])
def test_sampled_sjd_is_reproducible_by_seed_in_any_batch(tiny_generator, candidates):
    """Plain, and with siblings of the first draft (drawn from the image's own generator)."""
    sampling = dict(guidance_scale=3.0, temperature=1.0, top_k=20, top_p=0.9, strategy="sjd", window=6,
                    draft_candidates=candidates)
    alone = tiny_generator.generate([3], seed=31, **sampling)[0].codes
    batch = tiny_generator.generate([1, 3, 5], seed=30, **sampling)
    assert torch.equal(alone, batch[1].codes)
    cfg = tiny_generator.config
    settings = SamplingSettings(guidance_scale=3.0, temperature=1.0, top_k=20, top_p=0.9)
    reqs = image_requests(cfg, 3, settings, seed=31, decoding=Decoding("sjd", 6, draft_candidates=candidates))
    reqs += image_requests(cfg, 4, settings, seed=5) + image_requests(cfg, 6, settings, seed=6,
                                                                      decoding=Decoding("zipar", 3))
    outs = tiny_generator.llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
    assert torch.equal(torch.tensor(outs[0].outputs[0].token_ids), alone.flatten())


@pytest.mark.parametrize("kwargs", [dict(window=0), dict(window=-2), dict(window=1.5), dict(window="4"),
                                    dict(init="vertical"), dict(window=4, init=3), dict(continue_after_reject="yes"),
                                    dict(continue_after_reject=True, coupled=True), dict(draft_candidates=0),
                                    dict(draft_candidates=9), dict(draft_candidates=2.0),
                                    dict(draft_candidates=2, coupled=True), dict(draft_candidates=3, load_aware=True),
                                    dict(draft_candidates=2, group_acceptance=True)])
def test_bad_sjd_arguments_are_value_errors(tiny_generator, kwargs):
    with pytest.raises(ValueError, match="window|init|continue_after_reject|draft_candidates"):
        tiny_generator.generate([1], strategy="sjd", **kwargs)


@pytest.mark.parametrize("case", ["window 0", "init unknown", "logprobs", "halves differ"])
def test_bad_sjd_requests_finish_with_an_error(tiny_generator, case):
    cfg, engine = tiny_generator.config, tiny_generator.llm.llm_engine
    cond, uncond = image_requests(cfg, 2, SamplingSettings(guidance_scale=3.0), image_id=f"sbad-{case}",
                                  decoding=Decoding("sjd", 4))
    for _, sp in (cond, uncond):
        args = sp.extra_args["visual_ar"]
        if case == "window 0":
            args["window"] = 0
        elif case == "init unknown":
            args["init"] = "vertical"
        elif case == "logprobs":
            sp.logprobs = 2
    if case == "halves differ":
        uncond[1].extra_args["visual_ar"]["window"] = 5
    finished = finish_reasons(engine, (cond, uncond), f"sbad-{case}")
    assert set(finished.values()) == {"error"}, finished
    assert tiny_generator.generate([2], strategy="sjd", window=4, **GREEDY)[0].stats.tokens == cfg.num_image_tokens


# -- exactness in the engine, on a model small enough to enumerate ------------------------------------
@pytest.mark.parametrize("decoding", [
    dict(strategy="sjd", window=3), dict(strategy="sjd", window=4, init="horizontal"),
    dict(strategy="sjd", window=4, continue_after_reject=True), dict(strategy="sjd", window=4, load_aware=True),
    dict(strategy="sjd", window=3, draft_candidates=3),
    dict(strategy="sjd", window=4, continue_after_reject=True, draft_candidates=2),
    dict(coupled=True), dict(strategy="zipar_sjd", window=1, sjd_window=2, init="random"), dict()])
def test_engine_samples_follow_the_exact_distribution(enumerable_model, decoding):
    """Every exact decoding through the engine (SJD, its continuation, load-aware windows, siblings of
    the first draft, coupled draws), raster sampling as the control: 3,000 images each. Coupled SJD is coupled raster's image
    token for token (`test_coupling.py`), so coupled raster's case covers it. ZipAR x SJD is exact on
    a 2-row image: row 1 starts once row 0 is complete, so its rows are SJD windows in raster order."""
    gen, ref = enumerable_model
    sampling = dict(guidance_scale=2.0, temperature=1.0, top_k=0)
    images = gen.generate([1], n=3000, seed=0, **sampling, **decoding)
    samples = [tuple(im.codes.flatten().tolist()) for im in images]
    assert chi_square_p(samples, enumerate_images(ref, 1, **sampling)) > 1e-3


# -- relaxed acceptance (opt-in, not exact) --------------------------------------------------------
def test_latent_neighbours_and_relaxed_mass():
    from vllm_visual_ar.samplers.sjd import latent_neighbours, relaxed_mass

    codebook = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    assert latent_neighbours(codebook, 2).tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    neighbours = latent_neighbours(codebook, 3)
    # Code 0's neighbours nearest first: 1 (0.2), 2 (0.3), 3 (0.4); cumulative 0.2, 0.5, 0.9.
    assert torch.allclose(relaxed_mass(p, torch.tensor([0]), neighbours, 0.25), torch.tensor([0.3]))
    assert torch.allclose(relaxed_mass(p, torch.tensor([0]), neighbours, 0.5), torch.tensor([0.6]))
    assert torch.allclose(relaxed_mass(p, torch.tensor([0]), neighbours, 0.0), torch.tensor([0.1]))


def test_relaxed_acceptance_at_delta_zero_is_exact_sjd_and_more_delta_accepts_more(tiny_generator):
    sampling = dict(guidance_scale=2.0, temperature=1.0, top_k=0, strategy="sjd", window=8, seed=40)
    exact = tiny_generator.generate(list(range(8)), **sampling)
    zero = tiny_generator.generate(list(range(8)), relaxed_delta=0.0, **sampling)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(exact, zero))
    loose = tiny_generator.generate(list(range(8)), relaxed_delta=0.5, relaxed_neighbours=16, **sampling)
    assert sum(i.stats.accepted_drafts for i in loose) > sum(i.stats.accepted_drafts for i in exact)
    assert sum(i.stats.forward_passes for i in loose) < sum(i.stats.forward_passes for i in exact)


@pytest.mark.parametrize("kwargs", [dict(relaxed_delta=-0.1), dict(relaxed_delta=2), dict(relaxed_delta="x"),
                                    dict(relaxed_delta=0.1, relaxed_neighbours=0), dict(relaxed_neighbours=4)])
def test_bad_relaxed_arguments_are_value_errors(tiny_generator, kwargs):
    with pytest.raises(ValueError, match="relaxed"):
        tiny_generator.generate([1], strategy="sjd", **kwargs)


# -- group acceptance (GSD; opt-in, not exact) ------------------------------------------------------
def test_group_ratio_counts_the_codes_ranked_weighted_and_embedded_near_the_draft():
    from vllm_visual_ar.samplers.sjd import GROUP_RADIUS, group_ratio

    p = torch.tensor([[0.05, 0.1, 0.2, 0.3, 0.25, 0.1]])
    embeddings = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0], [3.5]])
    one_hot = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    # Draft 3 (p 0.3): 2 is alike (0.2) and near (1); 4 is alike but far (49); 5 is near but not
    # alike (0.1 is 0.2 away); the rest are neither. G = {3, 2}.
    assert torch.allclose(group_ratio(p, one_hot, torch.tensor([3]), embeddings, 2.0), torch.tensor([0.5]))
    assert torch.allclose(group_ratio(p, torch.full((1, 6), 1 / 6), torch.tensor([3]), embeddings, 2.0),
                          torch.tensor([0.5 * 3]))
    # Nothing near: the draft alone, SJD's p(d) / q(d).
    assert torch.allclose(group_ratio(p, one_hot, torch.tensor([3]), embeddings, 0.0), torch.tensor([0.3]))
    # Only GROUP_RADIUS ranks below and GROUP_RADIUS - 1 above the draft count, cut at the ends.
    assert GROUP_RADIUS == 7
    p = (torch.arange(20.0) + 1)[None] / 210  # ascending: rank = code; all within 0.15 of each other
    flat = torch.zeros(20, 1)
    for d, members in ((0, range(0, 7)), (10, range(3, 17)), (19, range(12, 20))):
        q = torch.nn.functional.one_hot(torch.tensor([d]), 20).float()
        expected = sum(i + 1 for i in members) / 210
        assert torch.allclose(group_ratio(p, q, torch.tensor([d]), flat, 1.0), torch.tensor([expected]))
    # A NaN embedding (a placed token's index) is near nothing, not even itself, but the draft counts.
    embeddings = torch.tensor([[0.0], [0.0], [math.nan]])
    p = torch.tensor([[0.0, 0.0, 1.0]])
    assert torch.allclose(group_ratio(p, torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([2]), embeddings, 1.0),
                          torch.tensor([1.0]))


def test_group_acceptance_accepts_more_and_is_greedy_raster_under_greedy_targets(tiny_generator, tiny_model):
    _, ref = tiny_model
    images = tiny_generator.generate([1, 7], guidance_scale=3.0, strategy="sjd", window=8, init="horizontal",
                                     group_acceptance=True, **GREEDY)
    expected = reference_raster(ref, [1, 7], guidance_scale=3.0, **GREEDY).codes
    assert torch.equal(torch.stack([im.codes.flatten() for im in images]), expected)
    sampling = dict(guidance_scale=2.0, temperature=1.0, top_k=0, strategy="sjd", window=8, seed=40)
    exact = tiny_generator.generate(list(range(8)), **sampling)
    grouped = tiny_generator.generate(list(range(8)), group_acceptance=True, **sampling)
    assert sum(i.stats.accepted_drafts for i in grouped) > sum(i.stats.accepted_drafts for i in exact)
    assert sum(i.stats.forward_passes for i in grouped) < sum(i.stats.forward_passes for i in exact)
    again = tiny_generator.generate(list(range(8)), group_acceptance=True, **sampling)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(grouped, again))


@pytest.mark.parametrize("kwargs,match", [(dict(group_acceptance="yes"), "group_acceptance must be"),
                                          (dict(group_acceptance=True, coupled=True), "group_acceptance"),
                                          (dict(group_acceptance=True, relaxed_delta=0.1), "group_acceptance"),
                                          (dict(strategy="zipar", window=2, group_acceptance=True), "sjd")])
def test_bad_group_acceptance_arguments_are_value_errors(tiny_generator, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_generator.generate([1], **{"strategy": "sjd", **kwargs})
