"""The LlamaGen model class and guided (CFG) raster decoding in vLLM's engine, against the
plain-PyTorch reference model and generate loop."""
from types import SimpleNamespace

import pytest
import torch
from conftest import finish_reasons, raw_logits, rel_err, scheduler_of, step_until_done

from vllm_visual_ar.model_executors.llamagen_reference import generate as reference_generate
from vllm_visual_ar.requests import SamplingSettings, image_requests
from vllm_visual_ar.samplers.sampling import cfg_mix

GREEDY = dict(top_k=1)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_engine_logits_equal_reference_logits(tiny_generator, tiny_model, guidance_scale):
    _, ref = tiny_model
    cfg = tiny_generator.config
    settings = SamplingSettings(guidance_scale=guidance_scale, temperature=1.0)
    requests = image_requests(cfg, 3, settings, seed=7)
    for _, sp in requests:
        sp.logprobs = cfg.codebook_size
    outputs = tiny_generator.llm.generate([p for p, _ in requests], [sp for _, sp in requests], use_tqdm=False)
    codes = torch.tensor(outputs[0].outputs[0].token_ids)[None]
    engine_logits = raw_logits(outputs[0], cfg.codebook_size)
    with torch.no_grad():
        cond = ref(torch.tensor([3]), codes[:, :-1])[0]
        expected = cond
        if guidance_scale != 1.0:
            uncond = ref(torch.tensor([cfg.num_classes]), codes[:, :-1])[0]
            expected = cfg_mix(cond, uncond, guidance_scale)
            assert torch.equal(torch.tensor(outputs[1].outputs[0].token_ids), codes[0]), "both streams share tokens"
            assert rel_err(raw_logits(outputs[1], cfg.codebook_size), uncond) <= 1e-4
    assert not engine_logits.isnan().any()
    assert rel_err(engine_logits, expected) <= 1e-4


@pytest.mark.parametrize("classes,guidance_scale", [([4], 4.0), ([4], 1.0), ([0, 1, 2, 3, 5, 6], 4.0),
                                                    ([2, 9, 9], 1.0)])
def test_greedy_generation_equals_reference_loop(tiny_generator, tiny_model, classes, guidance_scale):
    _, ref = tiny_model
    images = tiny_generator.generate(classes, guidance_scale=guidance_scale, **GREEDY)
    expected = reference_generate(ref, classes, guidance_scale=guidance_scale, **GREEDY).codes
    got = torch.stack([im.codes.flatten() for im in images])
    assert torch.equal(got, expected)
    n_tokens = tiny_generator.config.num_image_tokens
    for im in images:  # raster order: one forward per token, counted from the engine's per-step outputs
        assert (im.stats.tokens, im.stats.forward_passes) == (n_tokens, n_tokens)
        assert im.stats.streams == (2 if guidance_scale != 1.0 else 1)


def test_mixed_guidance_scales_share_a_batch(tiny_generator, tiny_model):
    _, ref = tiny_model
    cfg = tiny_generator.config
    jobs = [(1, 1.0), (2, 2.0), (3, 5.0), (4, 0.0)]  # unguided, guided at three scales, pure uncond
    prompts, params = [], []
    for c, s in jobs:
        for p, sp in image_requests(cfg, c, SamplingSettings(guidance_scale=s, **GREEDY)):
            prompts.append(p)
            params.append(sp)
    outputs = tiny_generator.llm.generate(prompts, params, use_tqdm=False)
    by_image = [o for o, sp in zip(outputs, params) if sp.extra_args["visual_ar"]["role"] != "uncond"]
    for (c, s), out in zip(jobs, by_image):
        expected = reference_generate(ref, [c], guidance_scale=s, **GREEDY).codes[0]
        assert torch.equal(torch.tensor(out.outputs[0].token_ids), expected), (c, s)


def test_staggered_arrivals_stay_exact(tiny_generator, tiny_model):
    """Continuous batching: images join and leave mid-flight, more than fit at once; each equals
    the reference run alone. Halves of one pair even arrive at different steps."""
    _, ref = tiny_model
    cfg = tiny_generator.config
    engine = tiny_generator.llm.llm_engine
    plan = [(0, 1, 4.0), (0, 2, 1.0), (5, 3, 2.0), (17, 4, 4.0), (17, 5, 4.0), (17, 6, 1.0), (40, 7, 3.0)]
    submit_at: dict[int, list] = {}
    for i, (step, c, s) in enumerate(plan):
        reqs = image_requests(cfg, c, SamplingSettings(guidance_scale=s, **GREEDY), image_id=f"img{i}")
        for j, (prompt, sp) in enumerate(reqs):
            # The uncond half of image 2 arrives 3 steps after its cond half.
            submit_at.setdefault(step + (3 if (i == 2 and j == 1) else 0), []).append((f"img{i}-{j}", prompt, sp))
    done = {rid: list(out.token_ids) for rid, out in step_until_done(engine, submit_at).items()}
    for i, (_, c, s) in enumerate(plan):
        expected = reference_generate(ref, [c], guidance_scale=s, **GREEDY).codes[0]
        assert torch.equal(torch.tensor(done[f"img{i}-0"]), expected), i
        if s != 1.0:
            assert done[f"img{i}-1"] == done[f"img{i}-0"]


def test_abort_of_one_half_frees_both_streams(tiny_generator):
    cfg = tiny_generator.config
    engine = tiny_generator.llm.llm_engine
    scheduler = scheduler_of(tiny_generator)
    idle_free = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    for i, (prompt, sp) in enumerate(image_requests(cfg, 5, SamplingSettings(guidance_scale=4.0), image_id="abort-me")):
        engine.add_request(f"abort-{i}", prompt, sp)
    for _ in range(5):
        engine.step()
    assert len(scheduler.running) == 2
    engine.abort_request(["abort-0"])  # the cond half only
    step_until_done(engine, max_steps=20)  # the uncond half must finish with its cond half
    assert not scheduler.requests and not scheduler.running
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == idle_free


def test_same_seed_gives_same_image_alone_or_in_a_batch(tiny_generator):
    sampling = dict(guidance_scale=3.0, temperature=1.0, top_k=20, top_p=0.9)
    alone = tiny_generator.generate([3], seed=11, **sampling)[0].codes
    again = tiny_generator.generate([3], seed=11, **sampling)[0].codes
    batch = tiny_generator.generate([1, 3, 5], seed=10, **sampling)  # class 3 is image 1 -> seed 11
    other = tiny_generator.generate([3], seed=12, **sampling)[0].codes
    assert torch.equal(alone, again)
    assert torch.equal(alone, batch[1].codes)
    assert not torch.equal(alone, other)


@pytest.mark.parametrize("kwargs,names", [
    (dict(classes=[10]), "class"), (dict(classes=[-1]), "class"), (dict(classes=[]), "classes"),
    (dict(classes=[1], guidance_scale=-0.5), "guidance_scale"), (dict(classes=[1], n=0), "n must"),
    (dict(classes=[1], top_p=0.0), "top_p"), (dict(classes=[1], top_p=1.5), "top_p"),
    (dict(classes=[1], top_k=-2), "top_k"), (dict(classes=[1], temperature=-1.0), "temperature"),
    (dict(classes=[1], seed=-3), "seed"), (dict(classes=[1], top_k=[1, 2]), "next-scale"),
])
def test_bad_input_raises_value_error_and_engine_keeps_working(tiny_generator, tiny_model, kwargs, names):
    with pytest.raises(ValueError, match=names):
        tiny_generator.generate(**kwargs)
    _, ref = tiny_model
    image = tiny_generator.generate([2], guidance_scale=2.0, **GREEDY)[0]
    assert torch.equal(image.codes.flatten(), reference_generate(ref, [2], guidance_scale=2.0, **GREEDY).codes[0])


def test_unknown_model_folder_is_a_value_error(tmp_path):
    from vllm_visual_ar.generator import ImageGenerator

    with pytest.raises(ValueError, match="does not exist"):
        ImageGenerator(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        ImageGenerator(str(tmp_path / "empty"))


def test_kv_limited_admission_keeps_pairs_whole_and_exact(tiny_model, make_generator):
    """With KV blocks for only 5 streams (one block holds a whole tiny image), images wait for
    room as whole pairs; none is preempted, and each equals the reference run alone."""
    folder, ref = tiny_model
    gen = make_generator(folder, max_images_in_flight=8, num_gpu_blocks_override=5)
    cfg, engine, scheduler = gen.config, gen.llm.llm_engine, scheduler_of(gen)
    plan = [(1, 4.0), (2, 1.0), (3, 4.0), (4, 2.0), (5, 1.0), (6, 4.0), (7, 3.0)]
    for i, (c, s) in enumerate(plan):
        for j, (prompt, sp) in enumerate(image_requests(cfg, c, SamplingSettings(guidance_scale=s, **GREEDY))):
            engine.add_request(f"kv{i}-{j}", prompt, sp)
    running = []

    def watch():
        running.append(len(scheduler.running))
        assert all(r.num_preemptions == 0 for r in scheduler.running)

    done = step_until_done(engine, each_step=watch)
    assert max(running) <= 5
    for i, (c, s) in enumerate(plan):
        expected = reference_generate(ref, [c], guidance_scale=s, **GREEDY).codes[0]
        assert torch.equal(torch.tensor(done[f"kv{i}-0"].token_ids), expected), i


def test_the_pair_check_catches_a_split_pair(tiny_generator):
    """Every step checks that both halves of a guided pair run, with the same tokens once past their
    prompts (a text model's prompts differ in length): the check itself, on a live pair."""
    cfg, engine, scheduler = tiny_generator.config, tiny_generator.llm.llm_engine, scheduler_of(tiny_generator)
    for j, (prompt, sp) in enumerate(image_requests(cfg, 3, SamplingSettings(guidance_scale=2.0, **GREEDY))):
        engine.add_request(f"split-{j}", prompt, sp)
    # the engine's ids (vLLM suffixes the ones given)
    a, b = sorted(next(m for m in scheduler._pair_members.values() if min(m).startswith("split-")))

    def check(scheduled):
        scheduler._check_pairs(SimpleNamespace(num_scheduled_tokens=scheduled))

    check({a: 3, b: 5})  # prompts of different lengths
    engine.step()
    engine.step()  # both past their prompts
    check({a: 1, b: 1})
    check({})
    for split in ({a: 1}, {b: 1}, {a: 1, b: 2}):
        with pytest.raises(RuntimeError, match="guidance pair split"):
            check(split)
    step_until_done(engine)


def test_head_size_without_a_kernel_is_padded_exactly(tmp_path, make_generator):
    """LlamaGen-3B has head_dim 100, which vLLM's attention kernels lack: the model zero-pads
    q, k and v to 112. A tiny model with head_dim 100 must still equal the reference."""
    from tiny_models import tiny_config, write_tiny_model

    config = tiny_config(grid=4, hidden_size=200, num_attention_heads=2)
    assert config.head_dim == 100
    ref = write_tiny_model(tmp_path / "hd100", config)
    gen = make_generator(str(tmp_path / "hd100"), max_images_in_flight=2)
    got = torch.stack([im.codes.flatten() for im in gen.generate([3, 6], guidance_scale=2.0, **GREEDY)])
    assert torch.equal(got, reference_generate(ref, [3, 6], guidance_scale=2.0, **GREEDY).codes)


@pytest.mark.parametrize("case", ["two conds", "malformed", "max_tokens differ", "bad role"])
def test_bad_pairs_finish_with_an_error_and_the_engine_keeps_serving(tiny_generator, tiny_model, case):
    """Hand-made requests (plain LLM.generate users) that cannot form a guidance pair must not hang
    or crash the engine."""
    from vllm import SamplingParams

    cfg = tiny_generator.config
    engine = tiny_generator.llm.llm_engine
    cond, uncond = image_requests(cfg, 2, SamplingSettings(guidance_scale=3.0), image_id=f"bad-{case}")
    if case == "two conds":
        reqs = [cond, cond]
    elif case == "malformed":
        reqs = [(cond[0], SamplingParams(max_tokens=cfg.num_image_tokens, extra_args={"visual_ar": {"role": "cond"}}))]
    elif case == "max_tokens differ":
        short = uncond[1].clone()
        short.max_tokens, short.min_tokens = 5, 5
        reqs = [cond, (uncond[0], short)]
    else:
        odd = uncond[1].clone()
        odd.extra_args = {"visual_ar": dict(uncond[1].extra_args["visual_ar"], role="negative")}
        reqs = [cond, (uncond[0], odd)]
    finished = finish_reasons(engine, reqs, f"bad-{case}")
    assert "error" in finished.values(), finished
    _, ref = tiny_model
    image = tiny_generator.generate([2], guidance_scale=3.0, **GREEDY)[0]
    assert torch.equal(image.codes.flatten(), reference_generate(ref, [2], guidance_scale=3.0, **GREEDY).codes[0])
