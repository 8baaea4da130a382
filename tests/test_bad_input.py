"""Bad input fails early with a ValueError that names the problem: the directory, the tensor,
the file; a safetensors header that does not fit its data names its tensor, for the checkpoint
and for PVM files alike."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import BPE

import fixtures as fx
import processor
import load_qwen
import pvm
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
              "text_config": {"model_type": "llama"},
              "vision_config": {"model_type": "clip_vision_model"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="llava"):
        load_qwen.load_model(tmp_path)


def official_4b():
    return json.loads((fx.OFFICIAL_DIR / "config-4b.json").read_text())


def edited(edit):
    config = official_4b()
    edit(config)
    return config


BAD_CONFIGS = {  # config.json -> the words of the error
    "not an object": ([1, 2], "not a Qwen3-VL checkpoint"),
    "no text_config": (edited(lambda c: c.pop("text_config")), "lacks text_config.vocab_size"),
    "null text_config": (edited(lambda c: c.update(text_config=None)), "lacks text_config."),
    "DeepStack beyond the depth": (
        edited(lambda c: c["vision_config"].update(deepstack_visual_indexes=[5, 11, 24])),
        "deepstack_visual_indexes [5, 11, 24] go beyond the vision depth 24"),
    "mrope_section": (edited(lambda c: c["text_config"]["rope_scaling"].update(
        mrope_section=[24, 20, 19])), "mrope_section sums to 63, not head_dim / 2 = 64"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_config_json_is_checked_field_by_field(case, tmp_path):
    config, words = BAD_CONFIGS[case]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(words)):
        load_qwen.load_model(tmp_path)


def test_an_index_without_weight_map(tiny_untied, tmp_path):
    """It lists no file: every tensor is missing, and the error names one."""
    shutil.copy(tiny_untied / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="is missing .* tensor.*e.g. model."):
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
    """The message names the tensor as the checkpoint spells it, the name to look for in the
    file."""
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
    name = "model.language_model.layers.9.mlp.up_proj.weight"
    extra = {**tensors, name: torch.zeros(128, 64)}
    with pytest.raises(ValueError, match=re.escape(name)):
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
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        "size 8875506608\n")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_qwen.load_model(tmp_path)


@pytest.fixture(scope="module")
def tokenizer(tiny_untied):
    return processor.load_tokenizer(tiny_untied)


def test_image_tokens_that_do_not_match_the_image(tiny_untied, tokenizer, photos):
    photo = photos["chelsea"].reduce(2)
    messages = [{"role": "user", "content": [{"type": "image", "image": photo},
                                             {"type": "text", "text": "What is this?"}]}]
    ids, pixel_values, grid = processor.encode_chat(tokenizer, messages)
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
            processor.encode_chat(tokenizer, messages)


# -----------------------------------------------------------------------------
# safetensors headers that do not fit their data: the safetensors library refuses them, and its
# words come with the file's path

def shift(header, name, begin=0, end=0):
    """Move a tensor's data_offsets by `begin` and `end` bytes."""
    first, last = header[name]["data_offsets"]
    header[name]["data_offsets"] = [first + begin, last + end]


HEADER_FAULTS = {  # case -> (edit(header, names in data order), safetensors' words, given names)
    "span too long": (lambda h, n: shift(h, n[0], end=4),
                      lambda n: "invalid shape, data type, or offset for tensor"),
    "span too short": (lambda h, n: shift(h, n[0], end=-4),
                       lambda n: "invalid shape, data type, or offset for tensor"),
    "overlap": (lambda h, n: shift(h, n[1], -4, -4),
                lambda n: rf"invalid offset for tensor `{re.escape(n[1])}`"),
    "beyond the file": (lambda h, n: shift(h, n[-1], 64, 64),
                        lambda n: rf"invalid offset for tensor `{re.escape(n[-1])}`"),
    "unknown dtype": (lambda h, n: h[n[0]].update(dtype="F33"),
                      lambda n: "unknown variant `F33`"),
}
FEW = ["model.language_model.norm.weight", "model.visual.merger.norm.weight",
       "model.visual.merger.norm.bias"]  # enough tensors for a header to be wrong about


@pytest.mark.parametrize("case", HEADER_FAULTS)
def test_a_weights_header_that_does_not_fit_is_refused_with_the_path(case, tensors, tiny_untied,
                                                             tmp_path):
    edit, pattern = HEADER_FAULTS[case]
    path = checkpoint_with({name: tensors[name] for name in FEW}, tiny_untied, tmp_path)
    names = fx.edit_safetensors_header(path / "model.safetensors", edit)
    with pytest.raises(ValueError, match=f"cannot read weights file {re.escape(str(path))}.*: "
                                         f".*{pattern(names)}"):
        load_qwen.load_model(path)


@pytest.fixture(scope="module")
def pvm_file(tiny_untied, tmp_path_factory):
    """A PVM file of the tiny model (layers 1 and 3, width 64)."""
    path = tmp_path_factory.mktemp("pvm") / "pvm.safetensors"
    pvm.save_pvm(pvm.attach_pvm(load_qwen.load_model(tiny_untied), (1, 3), 64), path)
    return path


@pytest.mark.parametrize("case", HEADER_FAULTS)
def test_a_pvm_header_that_does_not_fit_is_refused_with_the_path(case, pvm_file, tiny_untied,
                                                                 tmp_path):
    edit, pattern = HEADER_FAULTS[case]
    shutil.copy(pvm_file, tmp_path / "pvm.safetensors")
    names = fx.edit_safetensors_header(tmp_path / "pvm.safetensors", edit)
    with pytest.raises(ValueError, match=f"cannot read PVM weights {re.escape(str(tmp_path))}.*: "
                                         f".*{pattern(names)}"):
        pvm.load_pvm(load_qwen.load_model(tiny_untied), tmp_path / "pvm.safetensors")


def test_a_tokenizer_json_cut_short_or_of_another_model(tiny_untied, tmp_path):
    text = (tiny_untied / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=f"cannot read {re.escape(str(tmp_path))}/tokenizer.json"):
        processor.load_tokenizer(tmp_path)
    Tokenizer(BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=re.escape("lacks the token <|im_start|>")):
        processor.load_tokenizer(tmp_path)
