"""generate.generate_batch: a left-padded batch gives transformers' batched greedy tokens and each
prompt's own; several samples per prompt share one prefill; each row stops at its own stop token;
the KV cache grows with the answer, never allocated for the cap; torch.compile serves every step.

The untied tiny checkpoint, as in test_generate.py: tied random weights repeat one token."""
import pytest
import torch

import fixtures as fx
import processor
import generate
import load_qwen
import pvm

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

N = 48  # new tokens: enough for the KV cache to grow past its first capacity in every row


def user(*content):
    return [{"role": "user", "content": list(content)}]


@pytest.fixture(scope="module")
def conversations(photos):
    """Two different photos and a text-only prompt, of different lengths (photos at half size
    keep the forwards fast)."""
    return [
        user({"type": "image", "image": photos["chelsea"].reduce(2)},
             {"type": "text", "text": "What is this?"}),
        user({"type": "text", "text": "Write a poem about the sea, please, a long one."}),
        user({"type": "text", "text": "Compare:"},
             {"type": "image", "image": photos["rocket"].reduce(2)}),
    ]


def processed(ref_processor, conversations):
    """The reference processor's tensors, left-padded to the longest prompt."""
    return ref_processor.apply_chat_template(
        conversations, tokenize=True, add_generation_prompt=True, return_dict=True,
        return_tensors="pt", processor_kwargs={"padding": True})


@pytest.fixture(scope="module")
def batch(ref_processor, conversations):
    inputs = processed(ref_processor, conversations)
    assert not inputs["attention_mask"].all()  # padding to skip in two rows
    return inputs


@pytest.fixture(scope="module")
def model(tiny_untied):
    return load_qwen.load_model(tiny_untied)


def ours(model, inputs, **options):
    return generate.generate_batch(model, inputs["input_ids"], inputs["attention_mask"],
                                   inputs["pixel_values"], inputs["image_grid_thw"], **options)


@pytest.fixture(scope="module")
def greedy(model, batch):
    return ours(model, batch, max_new_tokens=N)


def test_greedy_batch_equals_reference_and_each_prompt_alone(greedy, batch, tiny_untied,
                                                             ref_processor, conversations, model):
    with torch.no_grad():
        out = fx.reference_model(tiny_untied).generate(**batch, do_sample=False, max_new_tokens=N)
    want = out[:, batch["input_ids"].size(1):].tolist()
    assert all(len(row) == N for row in want)  # no early stop: every token is compared
    assert greedy == want
    assert greedy == [alone(model, ref_processor, c) for c in conversations]


def alone(model, ref_processor, conversation):
    """The greedy answer to one conversation, unpadded, by the streaming generate."""
    inputs = processed(ref_processor, [conversation])
    prompt = inputs["input_ids"], inputs.get("pixel_values"), inputs.get("image_grid_thw")
    return list(generate.generate(model, *prompt, max_new_tokens=N))


def test_pvm_batch_equals_each_prompt_alone(tiny_untied, batch, ref_processor, conversations):
    """PVM's visual bank is padded across the batch (none for the text-only prompt) and copied
    with the cache's rows for each sample."""
    with_pvm = pvm.attach_pvm(load_qwen.load_model(tiny_untied), [1, 3], 64)
    for layer in (1, 3):
        with_pvm.layers[layer].pvm_block.gate_alpha.data.fill_(1.0)
    answers = ours(with_pvm, batch, max_new_tokens=N, num_samples=2)
    assert answers == [alone(with_pvm, ref_processor, c) for c in conversations for _ in range(2)]


def test_left_pad_makes_the_reference_processors_batch(batch, conversations, tiny_untied):
    tokenizer = processor.load_tokenizer(tiny_untied)
    prompts = [processor.encode_chat(tokenizer, c) for c in conversations]
    input_ids, attention_mask, pixel_values, image_grid_thw = processor.left_pad(prompts)
    assert torch.equal(attention_mask, batch["attention_mask"])
    assert torch.equal(input_ids * attention_mask, batch["input_ids"] * attention_mask)
    assert torch.equal(pixel_values, batch["pixel_values"])
    assert torch.equal(image_grid_thw, batch["image_grid_thw"])
    assert processor.left_pad(prompts[1:2])[2:] == (None, None)  # the text-only prompt


def test_greedy_samples_are_the_one_answer_and_the_vision_tower_runs_once(model, batch, greedy):
    """num_samples copies the cache's rows after one prefill: the vision tower runs once, over
    the batch's two images, not once per sample; greedy samples are all the same answer."""
    images_seen = []
    hook = model.visual.register_forward_hook(lambda m, args, out: images_seen.append(len(args[1])))
    try:
        answers = ours(model, batch, max_new_tokens=N, num_samples=3)
    finally:
        hook.remove()
    assert images_seen == [2]  # one call, two images
    assert answers == [row for row in greedy for _ in range(3)]  # prompt 0's 3, prompt 1's 3, ..


def test_seeded_sampling_reproduces(model, batch, ref_processor, conversations):
    options = dict(max_new_tokens=12, temperature=1.0, top_k=50, num_samples=4)
    first = ours(model, batch, seed=1, **options)
    assert len(first) == 3 * 4 and all(len(answer) == 12 for answer in first)
    assert ours(model, batch, seed=1, **options) == first
    assert ours(model, batch, seed=2, **options) != first
    assert len({tuple(answer) for answer in first[:4]}) > 1  # one prompt's samples differ
    # a batch of one prompt draws what the streaming generate draws
    alone = processed(ref_processor, conversations[:1])
    prompt = alone["input_ids"], alone["pixel_values"], alone["image_grid_thw"]
    streamed = list(generate.generate(model, *prompt, max_new_tokens=12, temperature=1.0,
                                      top_k=50, seed=5))
    assert ours(model, alone, max_new_tokens=12, temperature=1.0, top_k=50, seed=5) == [streamed]


def test_each_row_stops_at_its_own_stop_token(model, batch, greedy):
    """A row ends after its first stop token (kept); the others go on, unchanged; decoding ends
    when every row has stopped, with no step whose logits go unused."""
    def until(row, stops):
        return row[:next((i + 1 for i, t in enumerate(row) if t in stops), len(row))]

    stop = greedy[1][5]  # stops row 1 early; the other rows wherever it comes, if it does
    cut = ours(model, batch, max_new_tokens=N, stop_tokens=(stop,))
    assert cut == [until(row, (stop,)) for row in greedy]
    assert len(cut[1]) <= 6 and max(map(len, cut)) == N  # one row stopped, another went on
    stops = tuple(row[3] for row in greedy)  # every row stops within its first 4 tokens
    heads = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: heads.append(1))
    saved = model.config.eos_token_ids
    model.config.eos_token_ids = stops  # the default stop tokens: the checkpoint's eos ids
    try:
        answers = ours(model, batch, max_new_tokens=N)
    finally:
        model.config.eos_token_ids = saved
        hook.remove()
    assert answers == [until(row, stops) for row in greedy]
    assert max(map(len, answers)) <= 4
    assert len(heads) == max(map(len, answers))  # the prefill, then one step per later token
    assert ours(model, batch, max_new_tokens=0, num_samples=2) == [[]] * 6


def test_the_cache_grows_with_the_answer_not_the_cap(model, tiny_untied):
    """Each step attends over fewer than twice the keys it needs and the cache holds no more,
    though the cap would allow the whole context (4096)."""
    tokenizer = processor.load_tokenizer(tiny_untied)
    ids, _, _ = processor.encode_chat(tokenizer, user({"type": "text", "text": "Hi there"}))
    T, steps = ids.size(1), []
    assert T == 10

    def watch(attention, args):
        _, _, _, mask, cache = args
        if mask is not None:  # a decoding step (the prefill of one prompt needs no mask)
            steps.append((mask.size(-1), cache.capacity, cache.k.numel()))

    hook = model.layers[0].self_attn.register_forward_pre_hook(watch)
    try:
        for n, _ in enumerate(generate.generate(model, ids, max_new_tokens=10**6, stop_tokens=()),
                              start=1):
            if n == 100:
                break
    finally:
        hook.remove()
    assert len(steps) == 99  # step k writes the k-th new token: T + k keys
    c = model.config
    per_slot = c.num_layers * c.num_kv_heads * c.head_dim  # one row of the batch
    for k, (attended, capacity, numel) in enumerate(steps, start=1):
        assert T + k <= attended == capacity < 2 * (T + k)
        assert numel == per_slot * capacity
    assert sorted({capacity for _, capacity, _ in steps}) == [16, 32, 64, 128]


def test_compiled_batch_is_one_graph_for_every_step_and_capacity(model, batch, greedy):
    """torch.compile with symbolic sizes: one graph for batches of several rows (a batch of one
    is a size of its own), whatever the cache's capacity, giving the uncompiled tokens."""
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = ours(model, batch, max_new_tokens=N, num_samples=2, compile=True)
    finally:
        torch._dynamo.reset()
    assert compiled == [row for row in greedy for _ in range(2)]
