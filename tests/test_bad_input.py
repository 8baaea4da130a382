"""Bad input fails early with a ValueError that names the problem: the directory, the tensor,
the file."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import load_qwen
from vision import load_image


def test_missing_directory(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        load_qwen.load_model(missing)


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match=f"config.json.*{re.escape(str(tmp_path))}"):
        load_qwen.load_model(tmp_path)


def test_config_of_another_architecture(tmp_path):
    config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
              "text_config": {"model_type": "llama"}, "vision_config": {"model_type": "clip_vision_model"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="llava"):
        load_qwen.load_model(tmp_path)


@pytest.fixture(scope="module")
def tensors(tiny_untied):
    return load_file(tiny_untied / "model.safetensors")


def checkpoint_with(tensors, tiny_untied, path):
    """A copy of the tiny untied checkpoint holding `tensors` instead of its own."""
    shutil.copy(tiny_untied / "config.json", path / "config.json")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("name", ["model.language_model.layers.1.mlp.up_proj.weight",
                                  "model.visual.patch_embed.proj.weight", "lm_head.weight"])
def test_checkpoint_missing_a_tensor(name, tensors, tiny_untied, tmp_path):
    """The message names the tensor as the checkpoint spells it, the name to look for in the file."""
    path = checkpoint_with({k: v for k, v in tensors.items() if k != name}, tiny_untied, tmp_path)
    with pytest.raises(ValueError, match=re.escape(name)):
        load_qwen.load_model(path)


@pytest.mark.parametrize("name", ["model.language_model.layers.2.self_attn.k_proj.weight",
                                  "model.visual.deepstack_merger_list.1.norm.bias"])
def test_checkpoint_holding_a_wrong_shape(name, tensors, tiny_untied, tmp_path):
    wrong = {**tensors, name: torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])}
    with pytest.raises(ValueError, match=re.escape(name)):
        load_qwen.load_model(checkpoint_with(wrong, tiny_untied, tmp_path))


def test_checkpoint_holding_an_unknown_tensor(tensors, tiny_untied, tmp_path):
    extra = {**tensors, "model.language_model.layers.9.mlp.up_proj.weight": torch.zeros(128, 64)}
    with pytest.raises(ValueError, match=re.escape("model.language_model.layers.9.mlp.up_proj.weight")):
        load_qwen.load_model(checkpoint_with(extra, tiny_untied, tmp_path))


def test_truncated_weights_file(tiny_untied, tmp_path):
    shutil.copy(tiny_untied / "config.json", tmp_path / "config.json")
    data = (tiny_untied / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"cannot read weights file {re.escape(str(tmp_path))}"):
        load_qwen.load_model(tmp_path)


def test_weights_file_that_is_not_safetensors(tiny_untied, tmp_path):
    """A clone made without Git LFS holds small pointer files in place of the weights."""
    shutil.copy(tiny_untied / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 8875506608\n")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_qwen.load_model(tmp_path)


@pytest.fixture(scope="module")
def tokenizer(tiny_untied):
    return load_qwen.load_tokenizer(tiny_untied)


def test_image_tokens_that_do_not_match_the_image(tiny_untied, tokenizer, photos):
    messages = [{"role": "user", "content": [{"type": "image", "image": photos["chelsea"].reduce(2)},
                                             {"type": "text", "text": "What is this?"}]}]
    ids, pixel_values, grid = load_qwen.encode_chat(tokenizer, messages)
    first = int((ids[0] == 151655).nonzero()[0])
    ids = torch.cat([ids[:, :first], ids[:, first + 1:]], 1)  # one <|image_pad|> fewer
    with pytest.raises(ValueError, match="image_pad"):
        load_qwen.load_model(tiny_untied)(ids, pixel_values, grid)


def test_unreadable_images(tmp_path, photos, tokenizer):
    photos["rocket"].save(tmp_path / "whole.jpg", quality=90)
    jpeg = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "notes.jpg").write_text("these are notes, not pixels\n")
    assert load_image(tmp_path / "whole.jpg").size == (640, 427)  # the intact file reads
    for path in (tmp_path / "truncated.jpg", tmp_path / "notes.jpg", tmp_path / "absent.png"):
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_image(path)
        messages = [{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                 {"type": "text", "text": "What is this?"}]}]
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_qwen.encode_chat(tokenizer, messages)
