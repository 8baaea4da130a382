"""Hand-made cases that teach what a piece computes: the rotary positions of a left-padded prompt,
a KV cache that would overflow, and config.json and checkpoints written by us and read back. The
positions of a prompt with an image and the mask of a padded prompt, worked by hand, are in
exercises/tests (test_ex03_mrope.py, test_ex06_mask_sampling.py), which this suite runs too."""
import json

import pytest
import torch

import fixtures as fx
import load_qwen
from model import KVCache, Qwen3VL, rope_positions, tiny_config

IMAGE = 151655


def test_rope_positions_skip_left_padding():
    ids = torch.tensor([[0, 0, 7, 8, 9]])
    positions, next_position = rope_positions(ids, None, torch.tensor([[0, 0, 1, 1, 1]]), IMAGE)
    assert positions[:, 0, 2:].tolist() == [[0, 1, 2]] * 3
    assert next_position.tolist() == [3]


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
