"""An Emu3-Gen folder behind `vllm-visual-ar serve`, over HTTP with the `openai` client: a text
prompt with a negative prompt gives the reference loop's image, pixel for pixel."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import write_tiny_emu3_folder

from vllm_visual_ar.model_executors.t2i_reference import generate_image_tokens, transformers_next_logits


@pytest.fixture(scope="module")
def emu3_server(tmp_path_factory):
    from vllm_visual_ar.launch import running_server

    root = tmp_path_factory.mktemp("emu3-serve")
    folder, model = write_tiny_emu3_folder(root)
    with running_server(str(root / "server.log"), model=folder) as url:
        yield url, folder, model


def test_openai_client_draws_an_emu3_image(emu3_server):
    from openai import OpenAI
    from transformers import AutoTokenizer

    from vllm_visual_ar.families import family_of
    from vllm_visual_ar.model_executors.vq import images_to_uint8
    from vllm_visual_ar.requests import prompt_pair

    url, folder, model = emu3_server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    result = client.images.generate(prompt="a red cat", response_format="b64_json",
                                    extra_body={"guidance_scale": 3.0, "top_k": 1, "negative_prompt": "blurry"})
    family = family_of(folder)
    config = family.config(folder)
    cond, uncond, size = prompt_pair(config, "a red cat", "blurry", None, AutoTokenizer.from_pretrained(folder))
    layout = family.image_layout(config, size)

    def emu3_cfg(c, u, s):  # log-softmax space, as transformers' CFG processor
        return u.log_softmax(-1) + s * (c.log_softmax(-1) - u.log_softmax(-1))

    tokens = generate_image_tokens(transformers_next_logits(model), cond, uncond, layout, emu3_cfg, 3.0, top_k=1)
    expected = images_to_uint8(family.decoder(folder)(layout.codes_of(torch.tensor([tokens])),
                                                      (layout.rows, layout.cols)))[0].numpy()
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"))
    assert result.size == f"{size[0]}x{size[1]}"
    assert (got == expected).all()
