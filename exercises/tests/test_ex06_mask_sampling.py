"""Exercise 6: the decoding mask and sampling (model.causal_mask, generate.sample). The mask
against a definition written out, then through the model: a left-padded batch against each
prompt alone, decoding with the KV cache against one full forward, and greedy generation
against transformers'; sampling against transformers' temperature, top-k and top-p warpers."""
import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

import generate
from checks import IMAGE, close, equal, image_prompt, photo
from model import KVCache, causal_mask

pytestmark = pytest.mark.ex06


def allowed_by_definition(key_mask, query_slots):
    """(B, T, S): query t (at slot query_slots[t]) may see key s if s <= its slot and s is a real
    key; a query always sees its own slot (a padding query gets no empty row)."""
    B, S = key_mask.shape
    allowed = torch.zeros(B, len(query_slots), S, dtype=torch.bool)
    for b in range(B):
        for t, slot in enumerate(query_slots.tolist()):
            for s in range(S):
                allowed[b, t, s] = (s <= slot and bool(key_mask[b, s])) or s == slot
    return allowed


def test_the_mask_of_a_left_padded_prompt_by_hand():
    real = torch.tensor([[False, True, True]])
    mask = causal_mask(real, torch.arange(3), groups=2, dtype=torch.float32)
    equal(torch.tensor(mask.shape), torch.tensor([1, 1, 6, 3]), "shape (B, 1, g*T, S) of the mask")
    allowed = (mask[0, 0, :3] == 0).int()
    equal(allowed, torch.tensor([[1, 0, 0],    # padding: itself only
                                 [0, 1, 0],
                                 [0, 1, 1]]), "mask == 0 (row: query, column: key)")
    equal((mask[0, 0, 3:] == 0).int(), allowed, "rows of the second query head of the group")
    assert mask[0, 0, 0, 1] == float("-inf"), f"a hidden key holds {mask[0, 0, 0, 1]}, not -inf"


@pytest.mark.parametrize("case", ["prompt", "decoding"])
def test_the_mask_equals_its_definition(case):
    """A prompt of 7 slots in a batch of 3, rows padded differently; or 2 new tokens at slots 5
    and 6 of a cache of 8 slots, of which 7 and 8 are still empty. 3 query heads per group."""
    torch.manual_seed(0)
    if case == "prompt":
        key_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7, [0, 0, 0, 0, 0, 1, 1]]).bool()
        slots = torch.arange(7)
    else:
        key_mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 0]]).bool()
        slots = torch.tensor([5, 6])
    mask = causal_mask(key_mask, slots, groups=3, dtype=torch.float32)
    want = allowed_by_definition(key_mask, slots)                          # (B, T, S)
    B, T, S = want.shape
    equal(torch.tensor(mask.shape), torch.tensor([B, 1, 3 * T, S]), "shape (B, 1, g*T, S)")
    for head in range(3):  # rows head*T .. head*T + T - 1 belong to query head `head` of a group
        rows = mask[:, 0, head * T:(head + 1) * T]
        equal((rows == 0), want, f"may attend (batch, query, key), query head {head} of a group")
        assert (rows[~want] == float("-inf")).all(), "a hidden key must hold -inf"


def test_a_left_padded_batch_equals_each_prompt_alone(models):
    _, ours = models
    prompts = [torch.tensor([[151644, 872, 198, 9707, 11, 1879, 0, 151645]]),
               torch.tensor([[151644, 872, 198, 40, 151645]])]
    T = max(p.size(1) for p in prompts)
    ids, mask = torch.full((2, T), 151643), torch.zeros(2, T, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, T - prompt.size(1):], mask[row, T - prompt.size(1):] = prompt[0], 1
    with torch.no_grad():
        batch = ours.hidden_states(ids, attention_mask=mask)
        for row, prompt in enumerate(prompts):
            alone = ours.hidden_states(prompt)
            close(batch[row, T - prompt.size(1):], alone[0],
                  f"row {row} of the padded batch against the prompt alone", atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def image_inputs():
    import fixtures
    inputs = fixtures.reference_image_processor()(images=[photo("chelsea").resize((128, 96))],
                                                  return_tensors="pt")
    ids, grid = image_prompt([9707, 11, 1879, 151645, 198, 151644, 77091, 198],
                             inputs["image_grid_thw"][0, 1:].tolist())
    return ids, inputs["pixel_values"], grid


def test_decoding_with_the_cache_equals_one_full_forward(models, image_inputs):
    """The prompt but its last 5 tokens in one forward, then those 5 one at a time through
    model.KVCache, whose steps attend over the whole cache under causal_mask."""
    _, ours = models
    ids, pixel_values, grid = image_inputs
    P = ids.size(1) - 5
    with torch.no_grad():
        full = ours.hidden_states(ids, pixel_values, grid)
        cache = KVCache(ours.config, 1, ids.size(1), "cpu", torch.float32)
        steps = [ours.hidden_states(ids[:, :P], pixel_values, grid, cache=cache)[:, -1]]
        steps += [ours.hidden_states(ids[:, t:t + 1], cache=cache)[:, -1]
                  for t in range(P, ids.size(1))]
    close(torch.stack(steps, 1), full[:, P - 1:], "hidden states of the cached steps", atol=1e-4,
          rtol=1e-4)


def test_greedy_generation_equals_the_reference(models, image_inputs):
    ref, ours = models
    ids, pixel_values, grid = image_inputs
    tokens = list(generate.generate(ours, ids, pixel_values, grid, max_new_tokens=12,
                                    stop_tokens=()))
    with torch.no_grad():
        out = ref.generate(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid,
                           mm_token_type_ids=(ids == IMAGE).int(),
                           attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=12, min_new_tokens=12)
    equal(torch.tensor(tokens), out[0, ids.size(1):], "greedy tokens (position in the answer)")


def test_temperature_0_is_greedy():
    torch.manual_seed(1)
    logits = torch.randn(6, 50)
    equal(generate.sample(logits, temperature=0.0, top_k=5, top_p=0.5), logits.argmax(-1),
          "sample at temperature 0 (row)")


def test_the_generator_decides_the_draw():
    """Sampling draws from the generator it is given: the same seed, the same tokens."""
    torch.manual_seed(4)
    logits = torch.randn(64, 50)
    draws = [generate.sample(logits, 1.0, 20, 0.9, torch.Generator().manual_seed(seed))
             for seed in (5, 5, 6)]
    equal(draws[1], draws[0], "tokens drawn with the same seed (row)")
    assert not torch.equal(draws[2], draws[0]), "another seed draws the same 64 tokens"


def reference_probs(logits, temperature, top_k, top_p):
    """transformers' order: temperature, then top-k, then top-p; the softmax of what is left."""
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


def test_top_p_at_its_boundary_keeps_what_the_reference_keeps():
    """Four equal logits, each token exactly 0.25: at top_p 0.5 (0.75) the two (three) likelier
    tokens reach top_p exactly, and the next one goes, as in transformers."""
    for top_p, kept in ((0.5, 2), (0.75, 3)):
        want = int((reference_probs(torch.zeros(1, 4), 1.0, None, top_p) > 0).sum())
        assert want == kept, f"transformers keeps {want} tokens at top-p {top_p}, not {kept}"
        tokens = generate.sample(torch.zeros(4000, 4), 1.0, None, top_p,
                                 torch.Generator().manual_seed(0))
        got = len(tokens.unique())
        assert got == kept, (f"top-p {top_p} over four tokens of 0.25 each: {got} different "
                             f"tokens drawn in 4000 draws; transformers keeps {kept}")


SETTINGS = [(1.0, None, None), (0.5, None, None), (1.5, 4, None), (0.8, None, 0.7),
            (0.7, 6, 0.8), (1.2, 100, 0.9), (1.0, 0, 0.9), (2.0, 4, 0.6), (1.0, 1, None),
            (1.0, None, 1.0)]


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_sampled_frequencies_follow_the_reference(temperature, top_k, top_p):
    """20,000 draws from one row of 12 logits: tokens that the filters remove never appear; the
    others appear with the reference probability p, within 5 standard deviations plus 0.002.
    top_k 0 keeps every token, as None does; at temperature 2 the distribution is flat enough
    that top-k 4 removes real mass, so top-p's running mass must be that of the 4 kept tokens
    (renormalised), not of the whole vocabulary; top_k 1 is the likeliest token alone; top_p 1
    keeps every token."""
    torch.manual_seed(2)
    logits = torch.randn(12) * 2
    want = reference_probs(logits[None], temperature, top_k, top_p)[0]
    n = 20_000
    generator = torch.Generator().manual_seed(3)
    tokens = generate.sample(logits.expand(n, -1), temperature, top_k, top_p, generator)
    equal(torch.tensor(tokens.shape), torch.tensor([n]), "shape of the sampled tokens (B,)")
    counts = torch.bincount(tokens, minlength=12).float()
    for token, (count, p) in enumerate(zip(counts.tolist(), want.tolist())):
        if p == 0:
            assert count == 0, (f"token {token} drawn {count:.0f} times; the filters remove it "
                                f"(temperature {temperature}, top-k {top_k}, top-p {top_p})")
        else:
            allowed = 5 * (p * (1 - p) / n) ** 0.5 + 0.002
            assert abs(count / n - p) <= allowed, (
                f"token {token} drawn with frequency {count / n:.4f}, expected {p:.4f} "
                f"+- {allowed:.4f} (temperature {temperature}, top-k {top_k}, top-p {top_p})")


def test_sample_leaves_the_logits_unchanged():
    """The caller's logits (float32 or bfloat16) are read, not divided in place."""
    torch.manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(8, 50) * 3).to(dtype)
        before = logits.clone()
        generate.sample(logits, 0.7, 20, 0.8, torch.Generator().manual_seed(0))
        generate.sample(logits, 1.3, None, None, torch.Generator().manual_seed(0))
        equal(logits, before, f"the {dtype} logits after sample (row, token)")


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 20, 0.8), (1.0, None, None),
                                                       (0.3, 5, 0.95)])
def test_bfloat16_logits_are_sampled_as_their_float32_values(temperature, top_k, top_p):
    """The model's logits come in bfloat16; sample divides them by the temperature in float32,
    so the same draws (same generator) come from the bfloat16 logits as from those logits
    converted to float32. Logits from 16 to 26, as a trained model's are, all different within
    a row: a division in bfloat16 would round a scaled logit by up to half a bfloat16 step (0.25
    at temperature 0.3), which moves its probability by up to 28%."""
    torch.manual_seed(6)
    logits = (16 + torch.stack([torch.randperm(40) for _ in range(512)]) * 0.25).to(torch.bfloat16)
    got = generate.sample(logits, temperature, top_k, top_p, torch.Generator().manual_seed(7))
    want = generate.sample(logits.float(), temperature, top_k, top_p,
                           torch.Generator().manual_seed(7))
    equal(got, want, "tokens drawn from bfloat16 logits against their float32 values (row)")


def test_large_logits_and_extreme_temperatures():
    """Logits near 1,000 sample like the same logits near 0 (a softmax subtracts the maximum
    before exponentiating; exp(1000) overflows float32); temperature 1e-4 draws each row's
    likeliest token every time; temperature 1e4 draws each of 4 tokens about equally often."""
    torch.manual_seed(8)
    logits = torch.randn(12) * 2 + 1000
    want = reference_probs(logits[None], 0.8, 6, 0.9)[0]
    n = 20_000
    tokens = generate.sample(logits.expand(n, -1), 0.8, 6, 0.9, torch.Generator().manual_seed(9))
    frequencies = torch.bincount(tokens, minlength=12).float() / n
    close(frequencies, want, "frequencies (token) of logits near 1,000 at temperature 0.8, "
          "top-k 6, top-p 0.9", atol=0.02)
    rows = torch.randn(64, 50) * 3  # each row its own likeliest token
    equal(generate.sample(rows, 1e-4, None, None, torch.Generator().manual_seed(10)),
          rows.argmax(-1), "tokens drawn at temperature 1e-4 (row)")
    equal(generate.sample(rows, 1e-4, 5, 0.5, torch.Generator().manual_seed(10)),
          rows.argmax(-1), "tokens drawn at temperature 1e-4, top-k 5, top-p 0.5 (row)")
    tokens = generate.sample(torch.tensor([[3.0, 1.0, 0.0, -2.0]]).expand(n, -1), 1e4, None,
                             None, torch.Generator().manual_seed(11))
    frequencies = torch.bincount(tokens, minlength=4).float() / n
    close(frequencies, torch.full((4,), 0.25), "frequencies (token) at temperature 1e4",
          atol=0.02)


def test_the_mask_in_bfloat16():
    """The mask comes in the dtype asked for (the model's: bfloat16), still 0 or -inf."""
    key_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]]).bool()
    mask = causal_mask(key_mask, torch.tensor([1, 2]), groups=2, dtype=torch.bfloat16)
    assert mask.dtype == torch.bfloat16, f"the mask's dtype is {mask.dtype}, not bfloat16"
    want = allowed_by_definition(key_mask, torch.tensor([1, 2])).repeat(1, 2, 1)[:, None]
    equal(mask == 0, want, "may attend (batch, 1, g*T, key) in bfloat16")
    assert (mask[~want] == float("-inf")).all(), "a hidden key must hold -inf in bfloat16"


def test_the_mask_over_random_batches():
    """Random batches, seeded: 1 to 3 rows of 1 to 9 slots, any of them padding or empty, a run
    of 1 to S new queries starting anywhere, 1 to 4 query heads per group; against the
    definition. The key mask and the query slots are left unchanged."""
    generator = torch.Generator().manual_seed(12)
    for case in range(12):
        B, S = int(torch.randint(1, 4, (1,), generator=generator)), int(
            torch.randint(1, 10, (1,), generator=generator))
        T = int(torch.randint(1, S + 1, (1,), generator=generator))
        start = int(torch.randint(0, S - T + 1, (1,), generator=generator))
        groups = int(torch.randint(1, 5, (1,), generator=generator))
        key_mask = torch.rand(B, S, generator=generator) < 0.7
        slots = torch.arange(start, start + T)
        before = key_mask.clone(), slots.clone()
        mask = causal_mask(key_mask, slots, groups=groups, dtype=torch.float32)
        want = allowed_by_definition(key_mask, slots).repeat(1, groups, 1)[:, None]
        equal(torch.tensor(mask.shape), torch.tensor(want.shape), f"shape of the mask, case {case}")
        equal(mask == 0, want, f"may attend (batch, 1, g*T, key), case {case}")
        assert (mask[~want] == float("-inf")).all(), "a hidden key must hold -inf"
        equal(key_mask, before[0], "key_mask after causal_mask")
        equal(slots, before[1], "query_slots after causal_mask")
