"""Exercise 5: the vision tower's mergers and DeepStack (vision.PatchMerger.forward,
vision.VisionTower.forward, model.place_image), against transformers' patch mergers and vision
model holding the same random weights, then the whole model on a prompt with two images."""
import copy

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


@pytest.mark.parametrize("count", [3, 5, 0])
def test_place_image_refuses_too_few_and_too_many_embeddings(count):
    """4 <|image_pad|> tokens and 3, 5 or no embeddings: a ValueError giving the tokens' count,
    then the embeddings'."""
    torch.manual_seed(2)
    x = torch.randn(2, 5, 8)
    is_image = torch.tensor([[False, True, True, False, False], [True, False, False, True, False]])
    with pytest.raises(ValueError, match=rf"\b4 <\|image_pad\|> tokens\D*\b{count}\b"):
        place_image(x, is_image, torch.randn(count, 8))


def test_place_image_over_random_batches_and_dtypes():
    """Random batches (any number of image tokens, none included), seeded, against the
    positions filled one by one; x in float32 or bfloat16 with the embeddings in float32 (as
    the tower gives them to a bfloat16 model: cast to x's dtype); x and the embeddings
    unchanged."""
    generator = torch.Generator().manual_seed(3)
    for case in range(8):
        dtype = torch.bfloat16 if case % 2 else torch.float32
        B, T = torch.randint(1, 4, (2,), generator=generator).tolist()
        x = torch.randn(B, T, 8, generator=generator).to(dtype)
        is_image = torch.rand(B, T, generator=generator) < 0.5
        embeds = torch.randn(int(is_image.sum()), 8, generator=generator)
        want, k = x.clone(), 0
        for b in range(B):
            for t in range(T):
                if is_image[b, t]:
                    want[b, t], k = embeds[k].to(dtype), k + 1
        before = x.clone(), embeds.clone()
        close(place_image(x, is_image, embeds), want, f"place_image(x) of x {(B, T, 8)}, {dtype}",
              atol=0.0)
        close(x, before[0], f"x after place_image (case {case})", atol=0.0)
        close(embeds, before[1], f"the embeddings after place_image (case {case})", atol=0.0)


@pytest.mark.parametrize("grid", [[[2, 4, 4]], [[1, 4, 4], [2, 4, 4]]], ids=["video", "then video"])
def test_the_tower_refuses_a_video_grid(models, grid):
    """A grid with t != 1 (a video, even after a still image) raises ValueError before anything
    is computed."""
    _, ours = models
    grid = torch.tensor(grid)
    pixel_values = torch.randn(int(grid.prod(dim=1).sum()), 1536)
    with pytest.raises(ValueError):
        ours.visual(pixel_values, grid)


def test_the_tower_in_bfloat16(models, images):
    """The tower in bfloat16 (the model's dtype) takes the processor's float32 pixel values:
    image embeddings and DeepStack features come out bfloat16, within 1e-2 + 2% of
    transformers' float32 tower; the pixel values are left unchanged."""
    ref, ours = models
    pixel_values, grid = images
    before = pixel_values.clone()
    tower = copy.deepcopy(ours.visual).to(torch.bfloat16)
    with torch.no_grad():
        want = ref.model.visual(pixel_values, grid_thw=grid)
        embeds, deepstack = tower(pixel_values, grid)
    close(pixel_values, before, "the pixel values after the tower", atol=0.0)
    close(embeds.float(), want.pooler_output, "image embeddings (N/4, D) in bfloat16", atol=1e-2,
          rtol=2e-2)
    assert embeds.dtype == torch.bfloat16, f"image embeddings of dtype {embeds.dtype}"
    for k, (got, expected) in enumerate(zip(deepstack, want.deepstack_features)):
        assert got.dtype == torch.bfloat16, f"DeepStack feature {k} of dtype {got.dtype}"
        close(got.float(), expected, f"DeepStack feature {k} in bfloat16", atol=1e-2, rtol=2e-2)


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
