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


def padded_batch():
    """input_ids, grids and attention_mask of a batch: the one-image prompt left-padded to the
    length of the two-image prompt."""
    (one, one_grid), (two, two_grid) = image_prompt([9707], (4, 6)), two_images()
    pad = two.size(1) - one.size(1)
    ids = torch.cat([torch.cat([torch.full((1, pad), 151643), one], dim=1), two])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, torch.cat([one_grid, two_grid]), mask


def test_left_padding_is_skipped():
    """A batch: the one-image prompt left-padded to the length of the two-image prompt. Positions
    start at 0 on the first real token; padding positions are compared nowhere."""
    ids, grid, mask = padded_batch()
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


def test_positions_leave_their_inputs_unchanged():
    """rope_positions reads input_ids, image_grid_thw and attention_mask (the caller passes the
    same grid to the vision tower) and returns new tensors; a second call gives the same."""
    ids, grid, mask = padded_batch()
    given = {"input_ids": ids, "image_grid_thw": grid, "attention_mask": mask}
    before = {name: t.clone() for name, t in given.items()}
    first = rope_positions(ids, grid, mask, IMAGE)
    for name, t in given.items():
        equal(t, before[name], f"{name} after rope_positions")
    second = rope_positions(ids, grid, mask, IMAGE)
    equal(second[0], first[0], "positions of a second call with the same inputs")
    equal(second[1], first[1], "next_position of a second call with the same inputs")


EDGES = {  # an image at either end of the prompt, or the whole prompt (no brackets needed)
    "starts with an image": lambda: (torch.tensor([[IMAGE] * 6 + [9707, 11]]),
                                     torch.tensor([[1, 4, 6]])),
    "ends with an image": lambda: (torch.tensor([[151644, 872] + [IMAGE] * 3]),
                                   torch.tensor([[1, 6, 2]])),
    "an image alone": lambda: (torch.tensor([[IMAGE] * 8]), torch.tensor([[1, 8, 4]])),
}


@pytest.mark.parametrize("name", EDGES)
def test_positions_of_an_image_at_an_end_of_the_prompt(name):
    """The next position is the largest position + 1 on any axis: after a last image of
    rows x cols merged tokens starting at p it is p + max(rows, cols), not the last token's
    t + 1."""
    ids, grid = EDGES[name]()
    positions, next_position = rope_positions(ids, grid, None, IMAGE)
    want, want_next = reference_positions(ids, grid, None)
    equal(positions, want, f"positions (axis, row, token) of a prompt that {name}")
    equal(next_position, want_next, f"next_position of a prompt that {name}")


def random_batch(generator, rows=3):
    """Rows of text runs and images (each image's tokens bracketed by <|vision_start|> and
    <|vision_end|>, as the processor writes them; a run may be empty, so an image may open or
    close the prompt), left-padded to the longest row plus 0 to 2 slots."""
    texts, grids = [], []
    for _ in range(rows):
        ids = []
        for _ in range(int(torch.randint(0, 4, (1,), generator=generator))):  # images in the row
            ids += torch.randint(0, 151000, (int(torch.randint(0, 4, (1,), generator=generator)),),
                                 generator=generator).tolist()
            h, w = (2 * torch.randint(1, 6, (2,), generator=generator)).tolist()
            ids += [VISION_START] + [IMAGE] * (h * w // 4) + [VISION_END]
            grids.append([1, h, w])
        ids += torch.randint(0, 151000, (int(torch.randint(1, 4, (1,), generator=generator)),),
                             generator=generator).tolist()
        texts.append(ids)
    T = max(map(len, texts)) + int(torch.randint(0, 3, (1,), generator=generator))
    input_ids = torch.full((rows, T), 151643)
    mask = torch.zeros(rows, T, dtype=torch.long)
    for row, ids in enumerate(texts):
        input_ids[row, T - len(ids):], mask[row, T - len(ids):] = torch.tensor(ids), 1
    return input_ids, (torch.tensor(grids) if grids else None), mask


def test_random_batches_equal_the_reference():
    """Eight batches of 3 rows, seeded: 0 to 3 images each of any even grid up to 10 x 10
    patches (rows > cols, rows < cols, square), text runs of 0 to 3 tokens, left padding."""
    generator = torch.Generator().manual_seed(11)
    for case in range(8):
        ids, grid, mask = random_batch(generator)
        positions, next_position = rope_positions(ids, grid, mask, IMAGE)
        assert positions.dtype == next_position.dtype == torch.long, (
            f"positions of dtype {positions.dtype}, next_position {next_position.dtype}: "
            "expected torch.long")
        want, want_next = reference_positions(ids, grid, mask)
        real = mask.bool()
        equal(positions[:, real], want[:, real], f"positions (axis, real token), batch {case}")
        equal(next_position, want_next, f"next_position, batch {case}")


def test_rotary_tables_of_a_batch():
    """Three rows of different positions (a random batch's, left padding included): each row's
    tables are its own."""
    ids, grid, mask = random_batch(torch.Generator().manual_seed(15))
    positions = reference_positions(ids, grid, mask)[0] * 3
    (cos, sin), (want_cos, want_sin) = rotary_of(tiny_config(), positions, torch.float32)
    close(cos, want_cos, "cos (B, T, 1, hd) of a batch of 3", atol=5e-5)
    close(sin, want_sin, "sin (B, T, 1, hd) of a batch of 3", atol=5e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_rotary_tables_far_into_a_long_answer(dtype):
    """The two-image prompt's positions moved past 3,000 (a long answer; bfloat16 holds only
    every 16th integer there, so the positions must meet the frequencies in float32), against
    transformers; float32 within 1e-3 (angles of 3,000 radians), bfloat16 within 1e-2."""
    ids, grid = two_images()
    positions = reference_positions(ids, grid, None)[0] + 3001
    before = positions.clone()
    (cos, sin), (want_cos, want_sin) = rotary_of(tiny_config(), positions, dtype)
    equal(positions, before, "positions after Qwen3VL.rotary")
    atol = 1e-3 if dtype == torch.float32 else 1e-2
    close(cos, want_cos, f"cos (B, T, 1, hd) at positions past 3,000, {dtype}", atol=atol)
    close(sin, want_sin, f"sin (B, T, 1, hd) at positions past 3,000, {dtype}", atol=atol)
