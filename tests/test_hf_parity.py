"""With pruning off, the exported pipeline generates exactly what transformers' generate does."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from fsr.runtime.pipeline import Pipeline
from fsr.runtime.reference import cut_after_eos

MAX_NEW = 12


def hf_generate(model, processor, images, prompts):
    """Greedy generation with plain transformers on the export's own source checkpoint."""
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
        add_generation_prompt=True) for p in prompts]
    pil = [Image.open(p).convert("RGB") for p in images]
    inputs = processor(images=pil, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    eos = {model.generation_config.eos_token_id}
    return [cut_after_eos(row.tolist(), eos) for row in new]


@pytest.fixture(scope="module")
def hf_source(export_none):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    source = export_none / "source"
    return LlavaForConditionalGeneration.from_pretrained(source).eval(), AutoProcessor.from_pretrained(source)


@pytest.fixture(scope="module")
def pipe(export_none):
    with Pipeline(export_none) as p:
        yield p


@pytest.mark.parametrize("i", range(3))
def test_batch1_matches_hf_generate(pipe, hf_source, images, prompts, i):
    model, processor = hf_source
    [expected] = hf_generate(model, processor, [images[i]], [prompts[i]])
    [got] = pipe.generate([images[i]], [prompts[i]], max_new_tokens=MAX_NEW)
    assert got.token_ids == expected
    assert len(got.token_ids) > 1


def test_batch2_matches_hf_generate(pipe, hf_source, images, prompts):
    """Two prompts of different lengths: left padding, positions and masks as in HF."""
    model, processor = hf_source
    expected = hf_generate(model, processor, images[:2], prompts[1:3])
    got = pipe.generate(images[:2], prompts[1:3], max_new_tokens=MAX_NEW)
    assert [g.token_ids for g in got] == expected


def test_source_checkpoint_loads_back(export_none, tiny_model):
    """The export's source/ is a standard checkpoint holding the same weights."""
    from transformers import LlavaForConditionalGeneration

    reloaded = LlavaForConditionalGeneration.from_pretrained(export_none / "source")
    ref = tiny_model.model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, ref[name]), name
