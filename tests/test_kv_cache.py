"""KV cache: a prefill, then new tokens one at a time or in chunks, gives the logits of the
reference's single full forward over the whole sequence, with images in the prompt, for one
prompt and for a left-padded batch, also when the cache grows between chunks; a cache that was
not told to grow says so."""
import pytest
import torch

import fixtures as fx
import load_qwen
from model import KVCache, Qwen3VL, tiny_config


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
        "one prompt": [user({"type": "image", "image": chelsea},
                            {"type": "text", "text": "What is this?"})],
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
        continuation = ref_processor.tokenizer(" A cat on a sofa.").input_ids
        new_ids = torch.tensor([continuation] * len(batch))
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


@pytest.mark.parametrize("grown", [False, True], ids=["all at once", "grown"])
@pytest.mark.parametrize("chunks", [(1,) * 6, (6,), (2, 1, 3)],
                         ids=["one at a time", "one chunk", "mixed"])
@pytest.mark.parametrize("batch", ["one prompt", "padded batch"])
def test_cached_decoding_equals_one_full_forward(batch, chunks, grown, models, cases):
    ours = models[1]
    prompt, new_ids, want, real = cases[batch]
    B, P = prompt["input_ids"].shape
    assert new_ids.shape[1] == sum(chunks) == 6
    assert (batch == "padded batch") == (not real.all())
    with torch.no_grad():
        if grown:  # room for the prompt alone; each chunk doubles it, the keys moved along
            cache = KVCache(ours.config, B, 2**7 * P, "cpu", torch.float32, capacity=P)
        else:
            cache = KVCache(ours.config, B, P + 6, "cpu", torch.float32)
        got = [ours(prompt["input_ids"], prompt["pixel_values"], prompt["image_grid_thw"],
                    prompt["attention_mask"], cache=cache)]                          # the prefill
        start = 0
        for n in chunks:
            if grown:
                capacity = cache.capacity
                cache.reserve(capacity + 1)
                assert cache.capacity == 2 * capacity
            got.append(ours(new_ids[:, start:start + n], cache=cache))              # (B, n, V)
            start += n
    got = torch.cat(got, 1)                                                          # (B, P + 6, V)
    delta = (got - want).abs()[real].max().item()  # padding is compared nowhere
    print(f"max |dlogit| cached, {batch}, chunks {chunks}: {delta:.2e}")
    assert delta <= 1e-4
    assert torch.equal(got.argmax(-1)[real], want.argmax(-1)[real])  # the same greedy tokens


def test_a_cache_that_could_grow_says_where_it_was_not_told_to():
    """A hand-written loop that outgrows the capacity gets a clear error that names reserve();
    after reserve() the same step fits, and no further than max_len."""
    torch.manual_seed(0)
    model = Qwen3VL(tiny_config()).eval()
    cache = KVCache(model.config, 1, 64, "cpu", torch.float32, capacity=6)
    assert cache.capacity == 8 and cache.k.shape[3] == 8  # a power of two, at least 8
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4, 5, 6]]), cache=cache)
        model(torch.tensor([[7, 8]]), cache=cache)
        with pytest.raises(ValueError, match="holds 8 tokens; 9 do not fit; reserve"):
            model(torch.tensor([[9]]), cache=cache)
        cache.reserve(9)
        assert cache.capacity == 16 and cache.k.shape[3] == 16
        model(torch.tensor([[9]]), cache=cache)
    with pytest.raises(ValueError, match="holds at most 64 tokens; 65 do not fit"):
        cache.reserve(65)
