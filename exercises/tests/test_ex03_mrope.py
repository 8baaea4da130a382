"""Exercise 3: interleaved multimodal RoPE (model.rope_positions, model.Qwen3VL.rotary), against
transformers' get_rope_index and Qwen3VLTextRotaryEmbedding, then the whole text decoder on a
prompt with an image's positions (the image's tokens embedded as plain tokens: the vision tower
is exercise 5)."""
import dataclasses
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from transformers.models.qwen3_vl import modeling_qwen3_vl as reference

from checks import IMAGE, VISION_END, VISION_START, close, equal, hf_config, image_prompt
from model import Config, Qwen3VL, rope_positions, tiny_config

pytestmark = pytest.mark.ex03


def reference_positions(input_ids, image_grid_thw, attention_mask):
    """transformers' get_rope_index: positions (3, B, T) and each row's next position (B,)."""
    stand_in = SimpleNamespace(  # all that get_rope_index reads of the model
        config=hf_config(),
        get_vision_position_ids=partial(reference.Qwen3VLModel.get_vision_position_ids, None))
    positions, deltas = reference.Qwen3VLModel.get_rope_index(
        stand_in, input_ids, (input_ids == IMAGE).int(), image_grid_thw=image_grid_thw,
        attention_mask=attention_mask)
    real = input_ids.size(1) if attention_mask is None else attention_mask.sum(1)
    return positions, deltas[:, 0] + real  # delta = next position - real tokens


def two_images():
    """An image of 4 x 4 patches (2 x 2 merged), text, one of 6 x 2 patches (3 x 1), text."""
    ids = ([151644, 872, 198, VISION_START] + [IMAGE] * 4 + [VISION_END, 9707, 11]
           + [VISION_START] + [IMAGE] * 3 + [VISION_END, 1879, 30])
    return torch.tensor([ids]), torch.tensor([[1, 4, 4], [1, 6, 2]])


def test_text_an_image_and_text_by_hand():
    """Two text tokens, a 2 x 3 merged image (4 x 6 patches), two text tokens: the image's tokens
    count rows on h and columns on w from its start p = 2; the text after it resumes at
    p + max(rows, cols) = 5, not at p + 6 (its token count)."""
    ids = torch.tensor([[7, 8] + [IMAGE] * 6 + [9, 10]])
    positions, next_position = rope_positions(ids, torch.tensor([[1, 4, 6]]), None, IMAGE)
    want = torch.tensor([
        # text  | the image, row by row | text
        [0, 1,    2, 2, 2, 2, 2, 2,       5, 6],  # t: the image is one frame, at p
        [0, 1,    2, 2, 2, 3, 3, 3,       5, 6],  # h: p + row
        [0, 1,    2, 3, 4, 2, 3, 4,       5, 6],  # w: p + column
    ])
    equal(positions[:, 0], want, "positions (axis, token)")
    equal(next_position, torch.tensor([7]), "next_position")


PROMPTS = {
    "text only": lambda: (torch.tensor([[151644, 872, 198, 9707, 11, 1879, 0]]), None),
    "one image": lambda: image_prompt([9707, 11, 1879], (4, 6)),
    "two images": two_images,
}


@pytest.mark.parametrize("name", PROMPTS)
def test_positions_equal_the_reference(name):
    ids, grid = PROMPTS[name]()
    positions, next_position = rope_positions(ids, grid, None, IMAGE)
    want, want_next = reference_positions(ids, grid, None)
    equal(positions, want, f"positions (axis, row, token) of {name}")
    equal(next_position, want_next, f"next_position of {name}")


def test_left_padding_is_skipped():
    """A batch: the one-image prompt left-padded to the length of the two-image prompt. Positions
    start at 0 on the first real token; padding positions are compared nowhere."""
    (one, one_grid), (two, two_grid) = image_prompt([9707], (4, 6)), two_images()
    pad = two.size(1) - one.size(1)
    ids = torch.cat([torch.cat([torch.full((1, pad), 151643), one], dim=1), two])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    grid = torch.cat([one_grid, two_grid])
    positions, next_position = rope_positions(ids, grid, mask, IMAGE)
    want, want_next = reference_positions(ids, grid, mask)
    real = mask.bool()
    equal(positions[:, real], want[:, real], "positions (axis, real token) of a padded batch")
    equal(next_position, want_next, "next_position of a padded batch")


def rotary_of(config, positions, dtype):
    """Our Qwen3VL.rotary (the model built on the meta device: no memory) and transformers'."""
    with torch.device("meta"):
        model = Qwen3VL(config)
    text_config = hf_config(config).text_config
    want_cos, want_sin = reference.Qwen3VLTextRotaryEmbedding(text_config)(
        torch.zeros(1, dtype=dtype), positions)
    cos, sin = model.rotary(positions, dtype)
    return (cos, sin), (want_cos[:, :, None], want_sin[:, :, None])


@pytest.mark.parametrize("size", ["tiny", "4b"])
def test_rotary_tables_equal_the_reference(size):
    """Tiny: head_dim 32, sections (6, 5, 5); the 4B: head_dim 128, sections (24, 20, 20). The
    positions are those of the two-image prompt, where t, h and w differ."""
    config = tiny_config() if size == "tiny" else dataclasses.replace(
        Config(), num_layers=1, vision_depth=1, vision_deepstack_indexes=(0,))
    ids, grid = two_images()
    positions = reference_positions(ids, grid, None)[0] * 5  # angles large enough to differ
    for dtype in (torch.float32, torch.bfloat16):
        (cos, sin), (want_cos, want_sin) = rotary_of(config, positions, dtype)
        atol = 5e-5 if dtype == torch.float32 else 1e-2  # the angles reach 95 radians
        close(cos, want_cos, f"cos (B, T, 1, hd), {size}, {dtype}", atol=atol)
        close(sin, want_sin, f"sin (B, T, 1, hd), {size}, {dtype}", atol=atol)


def decoder(model, input_ids, image_grid_thw):
    """Our decoder written out without the vision tower: embed, positions, layers, final norm."""
    x = model.embed_tokens(input_ids)
    positions, _ = rope_positions(input_ids, image_grid_thw, None, IMAGE)
    cos, sin = model.rotary(positions, x.dtype)
    for layer in model.layers:
        x = layer(x, cos, sin, None, None, None)
    return model.norm(x)


@pytest.mark.parametrize("name", PROMPTS)
def test_the_decoder_equals_the_reference(name, models):
    ref, ours = models
    ids, grid = PROMPTS[name]()
    with torch.no_grad():  # the final hidden states: the output head adds nothing to check
        want = ref.model(input_ids=ids, image_grid_thw=grid, mm_token_type_ids=(ids == IMAGE).int())
        got = decoder(ours, ids, grid)
    close(got, want.last_hidden_state, f"final hidden states (B, T, D) of {name}", atol=1e-4,
          rtol=1e-4)
