"""Parity with transformers: prompt ids, logits and the vision tower, on tiny random checkpoints
(tied like the 4B, untied like the 8B) with real photos."""
import pytest
import torch
from PIL import Image

import fixtures as fx
import processor
import load_qwen


def image(name):
    return {"type": "image", "image": name}  # a photo's name; `chat` swaps in the PIL image


def text(s):
    return {"type": "text", "text": s}


# name -> one or more conversations (more than one: a left-padded batch)
CASES = {
    "text only": [[{"role": "user", "content": [text("Hello, world! Tell me a joke.")]}]],
    "one photo": [[{"role": "user", "content": [image("chelsea"), text("Describe this image.")]}]],
    # a portrait (rows > columns) and a square
    "two photos, two sizes": [[{"role": "user", "content": [
        image("rocket, portrait"), text("Compare it with"),
        image("astronaut"), text("Which is taller?")]}]],
    "system + multi-turn": [[  # content given as a plain string, too
        {"role": "system", "content": "Answer in as few words as possible."},
        {"role": "user", "content": [image("coffee"), text("What is in the cup?")]},
        {"role": "assistant", "content": "Coffee."},
        {"role": "user", "content": [text("Hot or cold?")]}]],
    "padded batch": [  # left padding on the shorter prompts; one has no image at all
        [{"role": "user", "content": [image("camera"), text("Hi")]}],
        [{"role": "user", "content": [text("What is in this picture, in detail?"),
                                      image("chelsea")]}],
        [{"role": "user", "content": [text("What is two plus two? Answer in one word.")]}]],
}


def chat(case, photos):
    """CASES[case] with the photos put in place of their names, at half size (64 to 70 visual
    tokens each, which keeps every forward fast; the sizes still differ)."""
    photos = {**photos, "rocket, portrait": photos["rocket"].transpose(Image.Transpose.ROTATE_90)}

    def parts(content):
        if isinstance(content, str):
            return content
        return [{**p, "image": photos[p["image"]].reduce(2)} if "image" in p else p
                for p in content]
    return [[{**m, "content": parts(m["content"])} for m in conversation]
            for conversation in CASES[case]]


def reference_inputs(ref_processor, conversations):
    return ref_processor.apply_chat_template(
        conversations, tokenize=True, add_generation_prompt=True, return_dict=True,
        return_tensors="pt", processor_kwargs={"padding": True})


@pytest.fixture(scope="module")
def tokenizer(tiny_tied):
    return processor.load_tokenizer(tiny_tied)


@pytest.mark.parametrize("case", [c for c in CASES if len(CASES[c]) == 1])
def test_prompt_ids_equal_the_processor(case, tokenizer, ref_processor, photos):
    conversation = chat(case, photos)[0]
    want = reference_inputs(ref_processor, [conversation])
    ids, pixel_values, grid = processor.encode_chat(tokenizer, conversation)
    assert ids.tolist() == want["input_ids"].tolist()
    if "pixel_values" not in want:
        assert pixel_values is None
        assert grid is None
    else:
        assert torch.equal(grid, want["image_grid_thw"])
        assert torch.equal(pixel_values, want["pixel_values"])


@pytest.fixture(scope="module", params=["tiny_tied", "tiny_untied"])
def models(request):
    """(reference, ours) loaded from the same checkpoint."""
    path = request.getfixturevalue(request.param)
    return fx.reference_model(path), load_qwen.load_model(path)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_the_reference(case, models, ref_processor, photos):
    ref, ours = models
    inputs = reference_inputs(ref_processor, chat(case, photos))
    with torch.no_grad():
        want = ref(**inputs, use_cache=False).logits
        got = ours(inputs["input_ids"], inputs.get("pixel_values"), inputs.get("image_grid_thw"),
                   inputs["attention_mask"])
    real = inputs["attention_mask"].bool()  # padding positions are compared nowhere
    assert len(CASES[case]) == 1 or not real.all()
    delta = (got - want).abs()[real].max().item()
    tying = "tied" if ours.config.tie_word_embeddings else "untied"
    print(f"max |dlogit| {case}, {tying}: {delta:.2e}")
    assert delta <= 1e-4
    assert torch.equal(got.argmax(-1)[real], want.argmax(-1)[real])  # the same greedy tokens


def test_text_only_padded_batch_equals_each_prompt_alone(models, ref_processor):
    """Without images the reference's plain forward counts positions from the first (padding)
    token, so the oracle here is the reference on each prompt alone, unpadded."""
    ref, ours = models
    prompts = ("Hi", "Tell me a story about a cat.")
    conversations = [[{"role": "user", "content": [text(s)]}] for s in prompts]
    batch = reference_inputs(ref_processor, conversations)
    with torch.no_grad():
        got = ours(batch["input_ids"], attention_mask=batch["attention_mask"])
        for row, conversation in enumerate(conversations):
            alone = reference_inputs(ref_processor, [conversation])
            want = ref(**alone, use_cache=False).logits[0]
            assert (got[row, -len(want):] - want).abs().max() <= 1e-4
    assert not batch["attention_mask"].bool().all()


def test_vision_tower_and_every_deepstack_feature(models, photos):
    """Three images in one call: landscape, portrait, and a 3000x40 strip (a 2 x 188 patch grid:
    the learned 48 x 48 position grid is shrunk to 2 rows and stretched to 188 columns)."""
    ref, ours = models
    images = [photos["chelsea"], photos["rocket"].transpose(Image.Transpose.ROTATE_90).reduce(2),
              photos["coffee"].resize((3000, 40), Image.BICUBIC)]
    inputs = fx.reference_image_processor()(images=images, return_tensors="pt")
    pixel_values, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    assert grid[:, 1:].tolist() == [[18, 28], [20, 14], [2, 188]]
    with torch.no_grad():
        want = ref.model.visual(pixel_values, grid_thw=grid)
        embeds, deepstack = ours.visual(pixel_values, grid)
    assert len(deepstack) == len(want.deepstack_features) == 3
    assert (embeds - want.pooler_output).abs().max() <= 1e-5
    for got_k, want_k in zip(deepstack, want.deepstack_features):
        assert (got_k - want_k).abs().max() <= 1e-5
