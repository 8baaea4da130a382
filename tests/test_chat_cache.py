"""A chat keeps its KV cache across turns: each turn prefills only its own tokens (what the last
answer left out of the cache, the user turn with its images, the generation prompt), positions
continuing as the chat format lays them out. After three turns with two images, the logits at
every answer token and the greedy tokens equal one forward over the whole conversation at once,
ours and transformers'. With PVM, equal where every image comes in the first turn; where an image
comes later, PVM's bank holds the images of the turns so far (see docs/PVM.md), so the earlier
turns equal a whole encode of the conversation up to them."""
import copy
import re

import pytest
import torch

import fixtures as fx
import load_qwen
import pvm
from generate import decode
from model import KVCache
from processor import chat_text, encode_chat, load_tokenizer

IM_END, NEWLINE = fx.IM_END_ID, 198  # "\n" in the Qwen vocabulary


@pytest.fixture(scope="module")
def setup(tiny_untied, photos):
    model = load_qwen.load_model(tiny_untied)
    images = photos["chelsea"].reduce(3), photos["rocket"].reduce(3)
    return model, load_tokenizer(tiny_untied), images


def user_turn(tokenizer, text, images):
    """encode_chat of one user message and the generation prompt."""
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    return encode_chat(tokenizer, [{"role": "user", "content": content}])


def chat(model, tokenizer, turns, max_new_tokens=4):
    """Answer `turns` [(text, images)] greedily, one KV cache across them. Returns the
    conversation's tokens (1, N) with every answer in full, its images, the logits the model
    chose each answer token from (n, V), and the positions in the conversation they belong to."""
    cache = KVCache(model.config, 1, model.config.max_position_embeddings, "cpu", torch.float32,
                    capacity=1)
    logits = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: logits.append(out[0]))
    conversation, pixels, grids, chosen_at, answers, answer = [], [], [], [], [], []
    for text, images in turns:
        ids, pixel_values, grid = user_turn(tokenizer, text, images)
        if answer:  # the last answer's last token was yielded, never fed; its turn ends here
            ids = torch.cat([torch.tensor([answer[-1:]]), torch.tensor(
                [[IM_END, NEWLINE][answer[-1] == IM_END:]]), ids], 1)
        conversation += ids[0].tolist()
        answer = [t.item() for t in decode(model, ids, None, pixel_values, grid, cache=cache,
                                           max_new_tokens=max_new_tokens)]
        # the prompt's last position chooses the first token, each token fed back the next
        chosen_at += range(len(conversation) - 1, len(conversation) + len(answer) - 1)
        conversation += answer[:-1]
        answers.append(answer)
        pixels += [] if pixel_values is None else [pixel_values]
        grids += [] if grid is None else [grid]
    hook.remove()
    whole = torch.tensor([conversation + answer[-1:]])
    return whole, torch.cat(pixels), torch.cat(grids), torch.stack(logits), chosen_at, answers


def full_forward(model, ids, pixel_values, grid):
    with torch.no_grad():
        return model(ids, pixel_values, grid)[0]                                   # (N, V)


def check(got, want, tokens):
    """The cached chat's logits (n, V) against a whole forward's at the same positions."""
    delta = (got - want).abs().max().item()
    print(f"max |dlogit| chat vs whole conversation: {delta:.2e}")
    assert delta <= 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert torch.equal(got.argmax(-1), tokens)  # greedy: the tokens chosen are the argmaxes


def test_three_turns_two_images_equal_the_whole_conversation(setup, tiny_untied):
    model, tokenizer, (cat, rocket) = setup
    turns = [("What is this?", [cat]), ("And its colour?", []), ("Compare it to this:", [rocket])]
    whole, pixel_values, grid, got, chosen_at, answers = chat(model, tokenizer, turns)
    # the conversation's tokens spell the chat format's text, the answers as assistant turns
    messages = []
    for (text, images), answer in zip(turns, answers):
        content = [{"type": "image", "image": im} for im in images]
        messages += [{"role": "user", "content": content + [{"type": "text", "text": text}]},
                     {"role": "assistant", "content": tokenizer.decode(answer)}]
    want = chat_text(messages[:-1])[0] + tokenizer.decode(answers[-1], skip_special_tokens=False)
    got_text = tokenizer.decode(whole[0].tolist(), skip_special_tokens=False)
    assert re.sub("(<\\|image_pad\\|>)+", "<|image_pad|>", got_text) == want
    tokens = whole[0, [i + 1 for i in chosen_at]]
    check(got, full_forward(model, whole, pixel_values, grid)[chosen_at], tokens)
    reference = fx.reference_model(tiny_untied)
    with torch.no_grad():
        want = reference(input_ids=whole, pixel_values=pixel_values, image_grid_thw=grid,
                         attention_mask=torch.ones_like(whole),
                         mm_token_type_ids=(whole == fx.IMAGE_PAD_ID).long()).logits[0]
    check(got, want[chosen_at], tokens)


@pytest.fixture(scope="module")
def pvm_model(setup):
    model = pvm.attach_pvm(copy.deepcopy(setup[0]), [1, 3], 64)
    with torch.no_grad():  # open gates: the branch changes the logits
        for i in (1, 3):
            model.layers[i].pvm_block.gate_alpha.fill_(1.0)
    return model


def test_with_pvm_every_image_in_the_first_turn_equals_the_whole_conversation(setup, pvm_model):
    _, tokenizer, (cat, rocket) = setup
    turns = [("Two pictures:", [cat, rocket]), ("Which is larger?", []), ("Why?", [])]
    whole, pixel_values, grid, got, chosen_at, _ = chat(pvm_model, tokenizer, turns)
    check(got, full_forward(pvm_model, whole, pixel_values, grid)[chosen_at],
          whole[0, [i + 1 for i in chosen_at]])
    plain = full_forward(setup[0], whole, pixel_values, grid)[chosen_at]
    assert (got - plain).abs().max() > 1e-2  # the gates are open: PVM is in these logits


def test_with_pvm_a_later_image_joins_the_bank_from_its_turn_on(setup, pvm_model):
    """PVM's cross-attention has no causal mask: in a whole encode the first turns would read
    the later image too. The chat answered them before it existed, so they equal a whole encode
    of the conversation up to them; the turn that brings it reads both images."""
    _, tokenizer, (cat, rocket) = setup
    turns = [("What is this?", [cat]), ("And its colour?", []), ("And this?", [rocket])]
    whole, pixel_values, grid, got, chosen_at, _ = chat(pvm_model, tokenizer, turns)
    first = [i for i in chosen_at if whole[0, :i + 1].eq(fx.VISION_START_ID).sum() == 1]
    early = full_forward(pvm_model, whole[:, :first[-1] + 1], pixel_values[:len(
        pixel_values) - int(grid[1].prod())], grid[:1])
    check(got[:len(first)], early[first], whole[0, [i + 1 for i in first]])
    later = full_forward(pvm_model, whole, pixel_values, grid)[chosen_at]
    assert (got[:len(first)] - later[:len(first)]).abs().max() > 1e-4  # the missing causal mask
