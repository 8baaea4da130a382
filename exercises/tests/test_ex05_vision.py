"""Exercise 5: the vision tower's mergers and DeepStack (vision.PatchMerger.forward,
vision.VisionTower.forward, model.place_image), against transformers' patch mergers and vision
model holding the same random weights, then the whole model on a prompt with two images."""
import pytest
import torch
from PIL import Image
from transformers.models.qwen3_vl import modeling_qwen3_vl as reference

import fixtures
from checks import (IMAGE, VISION_END, VISION_START, close, copy_weights, hf_config, photo,
                    randomize)
from model import place_image, tiny_config
from vision import PatchMerger

pytestmark = pytest.mark.ex05


@pytest.mark.parametrize("deepstack", [False, True])
def test_patch_merger_equals_the_reference(deepstack):
    """The final merger normalises each patch (width C) before the 2 x 2 shuffle; DeepStack's
    normalise the shuffled groups (width 4C)."""
    ref = reference.Qwen3VLVisionPatchMerger(hf_config().vision_config, deepstack)
    randomize(ref, seed=0)
    with torch.no_grad():  # larger weights than the usual 0.02: the GELU's curve must matter
        ref.linear_fc1.weight.normal_(0.0, 0.2)
    ours = copy_weights(PatchMerger(tiny_config(), postshuffle_norm=deepstack), ref)
    torch.manual_seed(1)
    x = torch.randn(4 * 6, 64) * 2 + 0.5  # 6 merge windows of 4 patches
    with torch.no_grad():
        close(ours(x), ref(x), f"PatchMerger(x), {'DeepStack' if deepstack else 'final'}",
              atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def images():
    """Two images of different grids, a landscape (10 x 14 patches) and a portrait (16 x 12):
    pixel_values and image_grid_thw from the reference processor."""
    pictures = [photo("chelsea").resize((224, 160), Image.BICUBIC),
                photo("rocket").transpose(Image.Transpose.ROTATE_90).resize((192, 256))]
    inputs = fixtures.reference_image_processor()(images=pictures, return_tensors="pt")
    return inputs["pixel_values"], inputs["image_grid_thw"]


def test_vision_tower_and_every_deepstack_feature(models, images):
    ref, ours = models
    pixel_values, grid = images
    with torch.no_grad():
        want = ref.model.visual(pixel_values, grid_thw=grid)
        embeds, deepstack = ours.visual(pixel_values, grid)
    close(embeds, want.pooler_output, "image embeddings (N/4, D)", atol=1e-4, rtol=1e-4)
    assert len(deepstack) == len(want.deepstack_features), (
        f"{len(deepstack)} DeepStack features, expected {len(want.deepstack_features)}")
    for k, (got, expected) in enumerate(zip(deepstack, want.deepstack_features)):
        close(got, expected, f"DeepStack feature {k} (for decoder layer {k})", atol=1e-4,
              rtol=1e-4)


def test_place_image_puts_the_embeddings_at_the_image_tokens_in_order():
    torch.manual_seed(2)
    x = torch.randn(2, 5, 8)
    is_image = torch.tensor([[False, True, True, False, False], [True, False, False, True, False]])
    embeds = torch.randn(4, 8)
    want = x.clone()
    want[0, 1], want[0, 2], want[1, 0], want[1, 3] = embeds  # row by row, left to right
    close(place_image(x, is_image, embeds), want, "place_image(x)", atol=0.0)
    with pytest.raises(ValueError, match=r"\b4 <\|image_pad\|> tokens\D*\b3\b"):
        place_image(x, is_image, embeds[:3])  # 4 image tokens, 3 embeddings


def test_the_model_with_two_images_equals_the_reference(models, images):
    """Everything so far together; DeepStack adds feature k at the image tokens after decoder
    layer k (Qwen3VL.hidden_states, written already)."""
    ref, ours = models
    pixel_values, grid = images
    tokens = [[VISION_START] + [IMAGE] * (h * w // 4) + [VISION_END] for _, h, w in grid.tolist()]
    ids = torch.tensor([[151644, 872, 198, *tokens[0], 9707, *tokens[1], 1879, 151645]])
    with torch.no_grad():  # the final hidden states: the output head adds nothing to check
        want = ref.model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid,
                         mm_token_type_ids=(ids == IMAGE).int()).last_hidden_state
        got = ours.hidden_states(ids, pixel_values, grid)
    close(got, want, "final hidden states (B, T, D) of a prompt with two images", atol=1e-4,
          rtol=1e-4)
