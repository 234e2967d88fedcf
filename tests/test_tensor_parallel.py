"""Tensor parallelism through vLLM's own multiprocessing executor: a tiny model split over two CPU
ranks (`--tensor-parallel-size 2`) gives the same tokens as one rank, for every strategy. The
two-rank engine runs in a child process (its workers are processes of their own, and this
session's in-process engines hold vLLM's process-wide parallel state)."""
import json
import os
import subprocess
import sys

import pytest
from tiny_models import tiny_config, write_official_checkpoints, write_tiny_emu3_folder, write_tiny_lumina_folder

# Greedy requests get no generator of their own, so greedy SJD cases draft "horizontal": random
# drafts would come from each engine's global RNG (same tokens, other forward counts). A coupled
# image's random drafts come from its seed (`coupling.random_codes`), so its case drafts at random.
GREEDY = dict(top_k=1)
SAMPLED = dict(temperature=1.0, top_k=0, seed=11)
LLAMAGEN = [dict(classes=[1, 7], guidance_scale=3.0, **sampling, **decoding) for decoding, sampling in [
    (dict(), SAMPLED), (dict(strategy="zipar", window=3), GREEDY), (dict(strategy="zipar", window=3), SAMPLED),
    (dict(strategy="sjd", window=4, init="horizontal"), SAMPLED),
    (dict(strategy="sjd", window=4, init="horizontal", continue_after_reject=True), GREEDY),
    (dict(strategy="sjd", window=6, coupled=True), SAMPLED),
    (dict(strategy="sjd", window=6, init="horizontal", draft_candidates=3), SAMPLED),
    (dict(strategy="zipar_sjd", window=2, sjd_window=4), GREEDY),
    (dict(strategy="zipar_sjd", window=2, sjd_window=4), SAMPLED)]]
# Lumina-mGPT's attention splits its per-head query/key norms over the ranks (`chameleon.py`).
LUMINA = [dict(prompts=["a red cat"], guidance_scale=3.0, **sampling, **decoding) for decoding, sampling in [
    (dict(), GREEDY), (dict(), SAMPLED), (dict(strategy="zipar", window=3), GREEDY),
    (dict(strategy="sjd", window=5), SAMPLED), (dict(strategy="zipar_sjd", window=3, sjd_window=4), GREEDY)]]
EMU3 = [dict(prompts=["a red cat"], guidance_scale=3.0, **sampling, **decoding) for decoding, sampling in [
    (dict(), SAMPLED), (dict(strategy="sjd", window=5, init="horizontal"), GREEDY)]]

CHILD = r"""
import json, sys
from vllm_visual_ar.generator import ImageGenerator
folder, cases = sys.argv[1], json.loads(sys.argv[2])
gen = ImageGenerator(folder, max_images_in_flight=4, tensor_parallel_size=2, distributed_executor_backend="mp")
out = [[[im.codes.flatten().tolist(), im.stats.forward_passes] for im in gen.generate(**case)] for case in cases]
print("RANKS", gen.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size, flush=True)
print("RESULT " + json.dumps(out), flush=True)
"""


def two_ranks(folder: str, cases: list[dict], timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    return subprocess.run([sys.executable, "-c", CHILD, folder, json.dumps(cases)], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("family", ["llamagen", "lumina", "emu3"])
def test_two_ranks_give_the_tokens_of_one(family, tiny_generator, tiny_model, make_generator, tmp_path_factory):
    if family == "llamagen":
        (folder, _), one_rank, cases = tiny_model, tiny_generator, LLAMAGEN
    else:
        write = write_tiny_lumina_folder if family == "lumina" else write_tiny_emu3_folder
        folder = write(tmp_path_factory.mktemp(f"{family}_tp"))[0]
        one_rank, cases = make_generator(folder, max_images_in_flight=4), LUMINA if family == "lumina" else EMU3
    run = two_ranks(folder, cases)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    assert "RANKS 2" in run.stdout and "Worker_TP1" in run.stdout + run.stderr  # vLLM's rank-1 worker ran
    got = json.loads(lines[-1][len("RESULT "):])
    assert len(got) == len(cases)
    for case, images in zip(cases, got):
        expected = [[im.codes.flatten().tolist(), im.stats.forward_passes] for im in one_rank.generate(**case)]
        assert images == expected, case


def test_a_model_whose_heads_do_not_split_is_refused(tmp_path):
    """Three heads over two ranks: a clear error (vLLM's own config check; the models'
    `heads_per_rank` is the backstop), before any request."""
    from vllm_visual_ar.model_executors.convert import convert_llamagen

    config = tiny_config(grid=4, num_attention_heads=3, hidden_size=96)
    _, gpt_pt, vq_pt = write_official_checkpoints(tmp_path, config)
    folder = convert_llamagen(str(gpt_pt), str(vq_pt), str(tmp_path / "converted"), image_size=config.image_size,
                              num_heads=3)
    run = two_ranks(folder, LLAMAGEN[:1], timeout=600)
    assert run.returncode != 0 and "attention heads (3) must be divisible by tensor parallel size (2)" in run.stderr


LOAD_AWARE_CHILD = r"""
import json, sys
import numpy as np
from vllm_visual_ar.generator import ImageGenerator
from vllm_visual_ar.samplers.load import RowCost, StepShape
from conftest import COSTLY_ROWS, FREE_ROWS, frozen_rows
from test_load import simulated_rows

if __name__ == "__main__":  # vLLM's workers are spawned: they import this file
    gen = ImageGenerator(sys.argv[1], max_images_in_flight=4, tensor_parallel_size=2, distributed_executor_backend="mp")
    policy = gen.llm.llm_engine.engine_core.engine_core.scheduler._width_policy
    costly = RowCost()  # a model that has learnt that rows cost more than they give beside other images
    simulated_rows(costly, np.random.default_rng(0))
    costly.observe(StepShape(8), 3e-3)
    out = []
    for rows, strategy in ((costly, "zipar"), (frozen_rows(FREE_ROWS, keep_rows=True), "zipar_sjd"),
                           (frozen_rows(COSTLY_ROWS, keep_rows=True), "zipar_sjd")):
        policy.rows = rows  # ZipAR x SJD at sjd_window 1: ZipAR's rows, each started at the scheduler's word
        images = gen.generate([1, 2, 3], guidance_scale=2.0, top_k=1, strategy=strategy, window=4, load_aware=True,
                              **({"sjd_window": 1} if strategy == "zipar_sjd" else {}))
        out.append([[im.codes.flatten().tolist(), im.stats.forward_passes] for im in images])
    print("RESULT " + json.dumps(out), flush=True)
"""


def test_load_aware_choices_reach_every_rank(tiny_model, tmp_path):
    """Load-aware ZipAR's choice at admission is rewritten in the request's args before vLLM sends the
    request to its workers: both ranks run raster order (a rank still on the request's w=4 would fail
    its schedule check) and the images are raster's. A paced row (load-aware ZipAR x SJD, here at
    sjd_window 1) started in a step rides in a speculative slot, which every rank sees: rows free in
    every step give ZipAR w=4's reference on both ranks, rows too costly in every step raster order's
    image, one forward per token."""
    from vllm_visual_ar.model_executors.llamagen_reference import generate as reference_raster
    from vllm_visual_ar.model_executors.llamagen_reference import generate_zipar as reference_zipar
    from vllm_visual_ar.samplers.zipar import forward_passes

    folder, ref = tiny_model
    script = tmp_path / "child.py"
    script.write_text(LOAD_AWARE_CHILD)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(script), folder], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    assert "Worker_TP1" in run.stdout + run.stderr
    raster = reference_raster(ref, [1, 2, 3], guidance_scale=2.0, top_k=1)
    zipar = reference_zipar(ref, [1, 2, 3], 4, guidance_scale=2.0, top_k=1)
    grid = tiny_config(grid=8).image_grid
    for got, expected, forwards in zip(json.loads(lines[-1][len("RESULT "):]), (raster, zipar, raster),
                                       (grid * grid, forward_passes(grid, grid, 4), grid * grid)):
        assert [fw for _, fw in got] == [forwards] * 3
        assert [codes for codes, _ in got] == expected.codes.tolist()
