"""The shipped VAR / CoDe model `var-mnist` end to end through vLLM's engine: sample quality judged by
the project's evaluator for the drafter alone and for CoDe, and the CLI by name."""
import os
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def var_mnist(make_generator):
    return make_generator("var-mnist", max_images_in_flight=32)


@pytest.mark.parametrize("decoding", [{}, dict(strategy="code", draft_steps=3), dict(strategy="code", draft_steps=1)])
def test_var_mnist_draws_recognisable_digits(var_mnist, decoding):
    from vllm_visual_ar.evaluation import Evaluator
    from vllm_visual_ar.mnist import from_model_space

    # The model's defaults (guidance 2.0 as VAR's cfg, top-k 16); 10 images per class.
    results = var_mnist.generate(list(range(10)), n=10, seed=0, **decoding)
    codes = torch.stack([r.codes for r in results])
    quality = Evaluator()(from_model_space(var_mnist.decode_codes(codes)), [r.class_id for r in results])
    print(decoding, f"class agreement {quality.class_agreement:.3f}, frechet {quality.frechet:.2f}")
    assert quality.class_agreement >= 0.9
    assert all(r.stats.forward_passes == var_mnist.config.num_scales for r in results)


def test_code_without_draft_steps_uses_the_folders_default(var_mnist):
    """var-mnist's pair was fine-tuned for N = 3 (config.json `default_draft_steps`)."""
    assert var_mnist.config.default_draft_steps == 3
    default = var_mnist.generate([7, 2], seed=3, strategy="code")
    explicit = var_mnist.generate([7, 2], seed=3, strategy="code", draft_steps=3)
    other = var_mnist.generate([7, 2], seed=3, strategy="code", draft_steps=1)
    assert torch.equal(torch.stack([r.codes for r in default]), torch.stack([r.codes for r in explicit]))
    assert not torch.equal(torch.stack([r.codes for r in default]), torch.stack([r.codes for r in other]))


def test_cli_generates_with_the_named_embedded_var_model(tmp_path):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    done = subprocess.run([sys.executable, "-m", "vllm_visual_ar.cli", "generate", "--model", "var-mnist",
                           "--classes", "4", "--n", "2", "--seed", "0", "--strategy", "code", "--draft-steps", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["class4_0.png", "class4_1.png", "grid.png"]
    bad = subprocess.run([sys.executable, "-m", "vllm_visual_ar.cli", "generate", "--model", "var-mnist",
                          "--strategy", "code", "--draft-steps", "5", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert bad.returncode == 2 and "draft_steps" in bad.stderr
