"""KV cache: a prefill, then new tokens one at a time or in chunks, gives the logits of the
reference's single full forward over the whole sequence, with images in the prompt, for one
prompt and for a left-padded batch."""
import pytest
import torch

import fixtures as fx
import load_qwen
from model import KVCache


def user(*content):
    return [{"role": "user", "content": list(content)}]


@pytest.fixture(scope="module")
def models(tiny_untied):
    return fx.reference_model(tiny_untied), load_qwen.load_model(tiny_untied)


@pytest.fixture(scope="module")
def cases(models, ref_processor, photos):
    """name -> (reference inputs of the prompt, text tokens that follow it (B, 6), the reference's
    logits of one full forward over both (B, P + 6, V), the mask of real (non-padding) tokens).
    Each prompt has images; photos at half size keep the forwards fast."""
    chelsea, rocket, camera = (photos[k].reduce(2) for k in ("chelsea", "rocket", "camera"))
    conversations = {
        "one prompt": [user({"type": "image", "image": chelsea}, {"type": "text", "text": "What is this?"})],
        "padded batch": [
            user({"type": "image", "image": camera}, {"type": "text", "text": "Hi"}),
            user({"type": "text", "text": "Compare these two pictures, please:"},
                 {"type": "image", "image": rocket}, {"type": "image", "image": chelsea})],
    }
    out = {}
    for name, batch in conversations.items():
        prompt = ref_processor.apply_chat_template(
            batch, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True})
        new_ids = torch.tensor([ref_processor.tokenizer(" A cat on a sofa.").input_ids] * len(batch))
        new_ids[1:] = new_ids[1:].flip(1)  # another continuation for the second row
        full = extend(prompt, new_ids)
        with torch.no_grad():
            want = models[0](**full, use_cache=False).logits
        out[name] = prompt, new_ids, want, full["attention_mask"].bool()
    return out


def extend(prompt, new_ids):
    """The reference inputs of the prompt followed by the text tokens `new_ids` (B, n)."""
    ones = torch.ones_like(new_ids)
    return {**prompt,
            "input_ids": torch.cat([prompt["input_ids"], new_ids], 1),
            "attention_mask": torch.cat([prompt["attention_mask"], ones], 1),
            "mm_token_type_ids": torch.cat([prompt["mm_token_type_ids"], 0 * ones], 1)}


@pytest.mark.parametrize("chunks", [(1,) * 6, (6,), (2, 1, 3)], ids=["one at a time", "one chunk", "mixed"])
@pytest.mark.parametrize("batch", ["one prompt", "padded batch"])
def test_cached_decoding_equals_one_full_forward(batch, chunks, models, cases):
    ours = models[1]
    prompt, new_ids, want, real = cases[batch]
    B, P = prompt["input_ids"].shape
    assert new_ids.shape[1] == sum(chunks) == 6
    assert (batch == "padded batch") == (not real.all())
    with torch.no_grad():
        cache = KVCache(ours.config, B, P + 6, "cpu", torch.float32)
        got = [ours(prompt["input_ids"], prompt["pixel_values"], prompt["image_grid_thw"],
                    prompt["attention_mask"], cache=cache)]                          # the prefill
        start = 0
        for n in chunks:
            got.append(ours(new_ids[:, start:start + n], cache=cache))              # (B, n, V)
            start += n
    got = torch.cat(got, 1)                                                          # (B, P + 6, V)
    delta = (got - want).abs()[real].max().item()  # padding is compared nowhere
    print(f"max |dlogit| cached, {batch}, chunks {chunks}: {delta:.2e}")
    assert delta <= 1e-4
    assert torch.equal(got.argmax(-1)[real], want.argmax(-1)[real])  # the same greedy tokens
