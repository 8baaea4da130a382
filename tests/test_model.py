"""Hand-made cases that teach what a piece computes: the 3-D rotary positions of a prompt with an
image, the mask of a padded prompt, a KV cache that would overflow, and config.json and
checkpoints written by us and read back."""
import json

import pytest
import torch

import fixtures as fx
import load_qwen
from model import KVCache, Qwen3VL, causal_mask, rope_positions, tiny_config

IMAGE = 151655


def test_rope_positions_of_text_an_image_and_text():
    """Two text tokens, a 2x3 merged image (a 4x6 patch grid), two text tokens: the image's
    tokens count rows on h and columns on w from its start p = 2; the text after it resumes at
    p + max(rows, cols) = 2 + 3 = 5, not at 2 + 6 (its token count)."""
    ids = torch.tensor([[7, 8] + [IMAGE] * 6 + [9, 10]])
    positions, next_position = rope_positions(ids, torch.tensor([[1, 4, 6]]), None, IMAGE)
    want = torch.tensor([
        # text  | the image, row by row          | text
        [0, 1,    2, 2, 2, 2, 2, 2,                5, 6],  # t: the image is one frame, at p
        [0, 1,    2, 2, 2, 3, 3, 3,                5, 6],  # h: p + row
        [0, 1,    2, 3, 4, 2, 3, 4,                5, 6],  # w: p + column
    ])
    assert torch.equal(positions[:, 0], want)
    assert next_position.tolist() == [7]


def test_rope_positions_skip_left_padding():
    ids = torch.tensor([[0, 0, 7, 8, 9]])
    positions, next_position = rope_positions(ids, None, torch.tensor([[0, 0, 1, 1, 1]]), IMAGE)
    assert positions[:, 0, 2:].tolist() == [[0, 1, 2]] * 3
    assert next_position.tolist() == [3]


def test_causal_mask_of_a_left_padded_prompt():
    """Row t may see keys 0..t that are real; a padding query sees itself (no empty row)."""
    real = torch.tensor([[False, True, True]])
    mask = causal_mask(real, torch.arange(3), groups=2, dtype=torch.float32)
    assert mask.shape == (1, 1, 2 * 3, 3)  # the rows repeat for the 2 query heads of a group
    allowed = (mask[0, 0, :3] == 0).int().tolist()
    assert allowed == [[1, 0, 0],   # padding: itself only
                       [0, 1, 0],
                       [0, 1, 1]]
    assert torch.equal(mask[0, 0, :3], mask[0, 0, 3:])


def test_a_cache_that_would_overflow_says_so():
    """A hand-written loop that decodes past the cache gets a clear error, not an index error."""
    torch.manual_seed(0)
    model = Qwen3VL(tiny_config()).eval()
    cache = KVCache(model.config, 1, 8, "cpu", torch.float32)  # 8 slots
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4, 5, 6]]), cache=cache)
        model(torch.tensor([[7, 8]]), cache=cache)
        with pytest.raises(ValueError, match="the KV cache holds 8 tokens; 9 do not fit"):
            model(torch.tensor([[9]]), cache=cache)


@pytest.mark.parametrize("size", ["4b", "8b"])
def test_config_json_round_trip(size):
    """config.json -> Config -> config.json -> Config is the identity on every field we read."""
    official = json.loads((fx.OFFICIAL_DIR / f"config-{size}.json").read_text())
    config = load_qwen.config_from_hf(official)
    assert load_qwen.config_from_hf(load_qwen.hf_config(config)) == config
    written = load_qwen.hf_config(config)
    for place in load_qwen.CONFIG_FIELDS.values():  # the same values under the same names
        assert load_qwen.lookup(written, place) == load_qwen.lookup(official, place), place


def test_a_saved_model_loads_back_and_transformers_reads_it(tmp_path, tiny_untied, ref_processor,
                                                            photos):
    model = load_qwen.load_model(tiny_untied)
    load_qwen.save_model(model, tmp_path)
    again = load_qwen.load_model(tmp_path)
    assert again.config == model.config
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    image = photos["chelsea"].reduce(2)
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is this?"}]}]
    inputs = ref_processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                               return_dict=True, return_tensors="pt")
    with torch.no_grad():
        want = fx.reference_model(tmp_path)(**inputs, use_cache=False).logits
        got = again(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"])
    assert (got - want).abs().max() <= 1e-4
