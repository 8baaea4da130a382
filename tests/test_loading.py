"""Loading: the official 4B / 8B layouts (names, shapes, parameter counts, on the meta device),
a tied checkpoint that still holds lm_head.weight, a sharded checkpoint, bfloat16, and the peak
memory of a bf16 load."""
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

import fixtures as fx
import load_qwen
from model import Qwen3VL

REPO = Path(__file__).resolve().parent.parent


def count(module):
    return sum(p.numel() for p in module.parameters())  # a tied weight counts once


@pytest.mark.parametrize("size, total, vision, entries", [("4b", 4_437_815_808, 415_347_712, 714),
                                                          ("8b", 8_767_123_696, 576_388_336, 750)])
def test_official_sizes_match_the_reference_on_meta(size, total, vision, entries):
    hf = json.loads((fx.OFFICIAL_DIR / f"config-{size}.json").read_text())
    with torch.device("meta"):
        ref = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**copy.deepcopy(hf)))
        ours = Qwen3VL(load_qwen.config_from_hf(hf))
    want = {
        load_qwen.rename(name, load_qwen.TO_OURS): t.shape for name, t in ref.state_dict().items()
    }
    # the Conv3d kernel (C, 3, 2, 16, 16) is our Linear (C, 1536)
    C = want["visual.patch_embed.weight"][0]
    want["visual.patch_embed.weight"] = torch.Size([C, 3 * 2 * 16 * 16])
    tied = ref.lm_head.weight is ref.model.language_model.embed_tokens.weight
    if tied:  # filled once, as the embedding
        del want["lm_head.weight"]
    # every checkpoint tensor has a parameter of its shape, and there is no other parameter
    assert {name: p.shape for name, p in ours.named_parameters()} == want
    assert len(ref.state_dict()) == entries
    assert tied == (ours.lm_head.weight is ours.embed_tokens.weight) == hf["tie_word_embeddings"]
    assert count(ours) == count(ref) == total
    assert count(ours.visual) == count(ref.model.visual) == vision


def one_photo_prompt(ref_processor, photos):
    image = photos["chelsea"].reduce(2)
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Describe this image."}]}]
    return ref_processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                             return_dict=True, return_tensors="pt")


def test_every_checkpoint_tensor_lands_in_its_place(tiny_untied):
    """Value for value, under the checkpoint's own names (the Conv3d patch kernel flattened)."""
    ref, ours = fx.reference_model(tiny_untied), load_qwen.load_model(tiny_untied)
    params = dict(ours.named_parameters())
    for name, tensor in ref.state_dict().items():
        ours_name = load_qwen.rename(name, load_qwen.TO_OURS)
        assert torch.equal(params[ours_name].reshape(tensor.shape), tensor), name


def test_tied_checkpoint_that_keeps_lm_head(tiny_tied, tmp_path, ref_processor, photos):
    for file in ("config.json", "model.safetensors"):
        shutil.copy(tiny_tied / file, tmp_path / file)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    inputs = one_photo_prompt(ref_processor, photos)
    with torch.no_grad():
        want = fx.reference_model(tiny_tied)(**inputs, use_cache=False).logits
        ours = load_qwen.load_model(tmp_path)
        got = ours(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"])
    assert (got - want).abs().max() <= 1e-4


def test_sharded_checkpoint(tiny_untied, tmp_path, ref_processor, photos):
    """Official checkpoints come in shards listed by model.safetensors.index.json."""
    ref = fx.reference_model(tiny_untied)
    ref.save_pretrained(tmp_path, max_shard_size="20MB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    inputs = one_photo_prompt(ref_processor, photos)
    with torch.no_grad():
        want = ref(**inputs, use_cache=False).logits
        ours = load_qwen.load_model(tmp_path)
        got = ours(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"])
    assert (got - want).abs().max() <= 1e-4


def test_bfloat16_is_as_close_to_float32_as_the_reference_in_bfloat16(tiny_tied, ref_processor,
                                                                       photos):
    """The yardstick for our bf16 error is the reference's own: transformers in bf16 against
    transformers in f32, on the same prompt. Ours may be at most twice that."""
    inputs = one_photo_prompt(ref_processor, photos)
    ref_bf16 = Qwen3VLForConditionalGeneration.from_pretrained(
        tiny_tied, dtype=torch.bfloat16, attn_implementation=fx.REFERENCE_ATTN_IMPLEMENTATION
    ).eval()
    ours = load_qwen.load_model(tiny_tied, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        want = fx.reference_model(tiny_tied)(**inputs, use_cache=False).logits
        ref_bf16_logits = ref_bf16(**inputs, use_cache=False).logits.float()
        reference_error = (ref_bf16_logits - want).abs().max().item()
        got = ours(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"])
    assert got.dtype == torch.bfloat16
    our_error = (got.float() - want).abs().max().item()
    print(f"bf16 vs f32 max |dlogit|: ours {our_error:.2e}, reference {reference_error:.2e} "
          f"(f32 logits up to {want.abs().max().item():.2f})")
    assert our_error <= 2 * reference_error


# Runs in a fresh process. The requirement is about anonymous memory (RssAnon): the pages of
# the memory-mapped weights files are the page cache's, reclaimable, not a second copy. The
# kernel keeps no peak of RssAnon, so a thread samples it every half millisecond.
MEASURE = """
import sys, threading, time, torch, load_qwen
def anon_mib():
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) / 1024
before, peak, done = anon_mib(), [0.0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_mib())
        time.sleep(0.0005)
sampler = threading.Thread(target=sample)
sampler.start()
model = load_qwen.load_model(sys.argv[1], dtype=torch.bfloat16)
done.set()
sampler.join()
peak[0] = max(peak[0], anon_mib())
print(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, peak[0] - before)
"""


def test_bf16_load_does_not_pass_through_float32(tmp_path):
    cfg = fx.tiny_config_dict(tied=False)  # widened to ~180 M parameters, 345 MiB in bf16
    cfg["text_config"].update(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                              num_attention_heads=8, head_dim=64)
    cfg["text_config"]["rope_scaling"]["mrope_section"] = [12, 10, 10]
    cfg["vision_config"]["out_hidden_size"] = 512
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**cfg))
    model = model.to(torch.bfloat16).to_empty(device="cpu")  # random values are enough to weigh
    for p in model.parameters():
        p.data.uniform_(-0.02, 0.02)
    model.save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, check=True)
    weights, growth = map(float, out.stdout.split())
    print(f"bf16 load: {weights:.0f} MiB of weights, peak RssAnon grew {growth:.0f} MiB "
          f"(ratio {growth / weights:.2f})")
    assert weights > 300
    assert growth <= 1.3 * weights
