"""A CoDe model folder (VAR drafter + refiner) behind `vllm-visual-ar serve`, over HTTP with the
`openai` client: the same images as the offline engine, per-request draft_steps, previews by scale,
bad input answered with a 400 and the server serving on."""
import base64
import io

import httpx
import pytest
from PIL import Image
from tiny_models import write_tiny_code_folder


@pytest.fixture(scope="module")
def code_server(tmp_path_factory):
    from vllm_visual_ar.launch import running_server

    root = tmp_path_factory.mktemp("code-serve")
    folder, drafter, refiner, vq = write_tiny_code_folder(root)
    with running_server(str(root / "server.log"), model=folder) as url:
        yield url, (drafter, refiner, vq)


def pixels(b64: str):
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def expected_png_pixels(models, class_id, guidance_scale, seed, draft_steps=None):
    """The reference loop's image for one request, as the server would encode it."""
    import torch

    from vllm_visual_ar.model_executors.var_reference import generate_code, generate_var
    from vllm_visual_ar.model_executors.vq import images_to_uint8

    drafter, refiner, vq = models
    sampling = dict(top_k=0, top_p=1.0, temperature=1.0, seeds=[seed])
    codes = (generate_code(drafter, refiner, vq, [class_id], draft_steps, guidance_scale, **sampling) if draft_steps
             else generate_var(drafter, vq, [class_id], guidance_scale, **sampling))
    with torch.no_grad():
        image = vq.decode_codes(torch.cat(codes, 1)).mul(2).sub(1)
    return images_to_uint8(image)[0, ..., 0].numpy()


def test_openai_client_serves_var_and_code(code_server):
    import numpy as np
    from openai import OpenAI

    url, models = code_server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    for draft_steps in (None, 1, 2):
        extra = {"seed": 21, "guidance_scale": 1.5, "top_k": 0, "top_p": 1.0}
        if draft_steps:
            extra.update(strategy="code", draft_steps=draft_steps)
        result = client.images.generate(model=model, prompt="6", size="8x8", response_format="b64_json",
                                        extra_body=extra)
        got = np.asarray(pixels(result.data[0].b64_json))
        assert got.shape == (8, 8)
        assert (got == expected_png_pixels(models, 6, 1.5, 21, draft_steps)).all(), draft_steps


def test_streamed_previews_come_scale_by_scale(code_server):
    from openai import OpenAI

    url, _ = code_server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    events = list(client.images.generate(prompt="2", stream=True, partial_images=2,
                                         extra_body={"seed": 4, "strategy": "code", "draft_steps": 2}))
    assert [e.type for e in events][-1] == "image_generation.completed"
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    assert 1 <= len(partial) <= 2 and [e.partial_image_index for e in partial] == list(range(len(partial)))


@pytest.mark.parametrize("body,param", [
    ({"prompt": "3", "strategy": "code", "draft_steps": 0}, "draft_steps"),
    ({"prompt": "3", "strategy": "code", "draft_steps": 4}, "draft_steps"),
    ({"prompt": "3", "strategy": "code"}, "draft_steps"),
    ({"prompt": "3", "draft_steps": 2}, "draft_steps"),
    ({"prompt": "3", "strategy": "zipar", "window": 2}, "strategy"),
    ({"prompt": "3", "strategy": "code", "draft_steps": "2"}, "draft_steps"),
    ({"prompt": "3", "size": "32x32"}, "size"),
])
def test_bad_code_requests_get_a_400_and_the_server_serves_on(code_server, body, param):
    url, _ = code_server
    r = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok = httpx.post(f"{url}/v1/images/generations", json={"prompt": "3", "strategy": "code", "draft_steps": 1},
                    timeout=60)
    assert ok.status_code == 200
