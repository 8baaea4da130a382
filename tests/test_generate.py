"""generate.py: greedy text equal to transformers' generate, seeded sampling, stop tokens, PVM.

The comparisons use the untied tiny checkpoint: with tied random weights greedy decoding falls
into repeating one token, which would hide a wrong position or a stale cache."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import fixtures as fx
import processor
import generate
import load_qwen
import pvm

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

REPO = Path(__file__).resolve().parent.parent
CAT = REPO / "cat.jpg"
NEW_TOKENS = 32


def start_cli(*args):
    """generate.py in a fresh process: offline, UTF-8 output, one thread (the scenarios run
    together)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "generate.py"), *map(str, args)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8")


CASES = ["one image", "two images", "system message"]


def scenario(case, second_image):
    """(images, prompt, system message) of each greedy comparison."""
    if case == "two images":
        return [CAT, second_image], "What differs between them?", None
    system = "You are a terse assistant." if case == "system message" else None
    return [CAT], "Describe this image.", system


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, photos, tiny_untied):
    """generate.py at temperature 0, every scenario at once; the references are computed
    meanwhile."""
    second_image = tmp_path_factory.mktemp("images") / "astronaut.png"
    photos["astronaut"].reduce(2).save(second_image)
    processes = {}
    for case in CASES:
        images, prompt, system = scenario(case, second_image)
        args = [a for image in images for a in ("--image", image)]
        args += ["--system", system] if system else []
        processes[case] = start_cli("--model", tiny_untied, "--prompt", prompt, "--temperature", 0,
                                    "--max-new-tokens", NEW_TOKENS, *args)
    yield second_image, processes
    for process in processes.values():  # any a deselected test left running
        process.kill()
        process.communicate()


@pytest.mark.parametrize("case", CASES)
def test_greedy_cli_equals_reference(case, cli_runs, tiny_untied, ref_processor, ours):
    second_image, processes = cli_runs
    images, prompt, system = scenario(case, second_image)
    # the reference: the official processor's inputs, transformers' greedy generate
    content = [{"type": "image", "image": Image.open(p)} for p in images]
    content.append({"type": "text", "text": prompt})
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    messages.append({"role": "user", "content": content})
    inputs = ref_processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                               return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = fx.reference_model(tiny_untied).generate(**inputs, do_sample=False,
                                                       max_new_tokens=NEW_TOKENS)
    new = out[0, inputs["input_ids"].size(1):].tolist()
    assert len(new) == NEW_TOKENS  # no early stop: all 32 tokens are compared
    tokenizer = processor.load_tokenizer(tiny_untied)
    prompt = processor.encode_chat(tokenizer, messages)
    assert list(generate.generate(ours[0], *prompt, max_new_tokens=NEW_TOKENS)) == new
    want = tokenizer.decode(new, skip_special_tokens=True)

    stdout, stderr = processes[case].communicate(timeout=300)
    assert processes[case].returncode == 0, stderr
    assert stdout == want + "\n"  # streamed pieces add up to the whole; the prompt is not echoed
    assert f"prompt {inputs['input_ids'].size(1)} tokens" in stderr
    assert "tokens/s" in stderr


@pytest.fixture(scope="module")
def ours(tiny_untied):
    model = load_qwen.load_model(tiny_untied)
    content = [{"type": "image", "image": CAT}, {"type": "text", "text": "Hi"}]
    messages = [{"role": "user", "content": content}]
    return model, processor.encode_chat(processor.load_tokenizer(tiny_untied), messages)


def run(model, prompt, **options):
    return list(generate.generate(model, *prompt, max_new_tokens=12, **options))


def test_seeded_sampling_is_reproducible(ours):
    model, prompt = ours
    options = dict(temperature=0.7, top_k=20, top_p=0.8)
    first = run(model, prompt, seed=1, **options)
    assert len(first) == 12
    assert run(model, prompt, seed=1, **options) == first
    assert run(model, prompt, seed=2, **options) != first


def test_top_k_1_is_greedy(ours):
    model, prompt = ours
    greedy = run(model, prompt, temperature=0.0)
    assert run(model, prompt, temperature=1.0, top_k=1, seed=3) == greedy


def test_stop_tokens_stop(ours, tiny_untied, tmp_path):
    """A stop token is yielded, then nothing more; by default the stop tokens are the model's
    eos_token_ids, which come from the checkpoint's generation_config.json."""
    model, prompt = ours
    greedy = run(model, prompt)
    stop = greedy[8]
    until_stop = greedy[:greedy.index(stop) + 1]
    assert run(model, prompt, stop_tokens=(stop,)) == until_stop
    official = json.loads((fx.OFFICIAL_DIR / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(model.config.eos_token_ids) == sorted(official)  # <|im_end|>, <|endoftext|>
    # the same checkpoint whose generation_config.json names that token: it stops there unasked
    for file in Path(tiny_untied).iterdir():
        if file.name != "generation_config.json":
            (tmp_path / file.name).symlink_to(file)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop]}))
    assert run(load_qwen.load_model(tmp_path), prompt) == until_stop


def test_sample_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    g = torch.Generator().manual_seed(0)

    def draws(**options):  # every token that 200 draws come up with
        return {int(generate.sample(logits, generator=g, **options)) for _ in range(200)}

    assert draws(temperature=1.0, top_k=2) == {1, 2}
    assert draws(temperature=1.0, top_p=0.3) == {1}  # the likeliest token alone holds more than 0.3
    assert draws(temperature=1.0) == {0, 1, 2, 3}
    assert int(generate.sample(logits)) == 1  # temperature 0: greedy


def test_draw_draws_each_index_with_its_probability(monkeypatch):
    """generate.draw against the law written out: 200,000 draws within 5 standard deviations of
    each probability, and an index of probability 0 (first, inner, last) never drawn, also at
    the uniform number's two ends, 0 and the largest below 1."""
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0]]).repeat(200_000, 1)
    counts = torch.bincount(generate.draw(probs, torch.Generator().manual_seed(0))[:, 0],
                            minlength=6).double()
    spread = 5 * (probs[0] * (1 - probs[0]) / len(probs)).sqrt()
    assert ((counts / len(probs) - probs[0]).abs() <= spread).all(), counts
    assert counts[[0, 2, 5]].sum() == 0
    for u in (0.0, 1 - 2**-24):  # torch.rand's range is [0, 1)
        monkeypatch.setattr(torch, "rand", lambda *shape, **_: torch.full(shape, u))
        assert generate.draw(probs[:1]).item() == (4 if u == 0.0 else 1)


def test_pvm_file_attaches(ours, tiny_untied, tmp_path):
    """A PVM file loads through load_model(pvm_file=...) and acts on every decoded token; at
    gate 0 the answer is the base model's."""
    model, prompt = ours
    base = run(model, prompt)
    with_pvm = pvm.attach_pvm(load_qwen.load_model(tiny_untied), [1, 3], 64)
    pvm.save_pvm(with_pvm, tmp_path / "pvm.safetensors")
    loaded = pvm.load_pvm(load_qwen.load_model(tiny_untied), tmp_path / "pvm.safetensors")
    assert run(loaded, prompt) == base
    for layer in (1, 3):
        loaded.layers[layer].pvm_block.gate_alpha.data.fill_(1.0)
    assert run(loaded, prompt) != base


def test_compiled_decoding_is_one_graph_with_the_same_tokens(ours, tiny_untied):
    """The decoding step has fixed shapes and keeps its state on the device, as a CUDA graph
    needs: torch.compile makes one whole graph of it (fullgraph), compiled once for every step,
    with and without PVM, and the tokens are the uncompiled ones."""
    model, prompt = ours
    with_pvm = pvm.attach_pvm(load_qwen.load_model(tiny_untied), [1, 3], 64)
    for layer in (1, 3):
        with_pvm.layers[layer].pvm_block.gate_alpha.data.fill_(1.0)
    for m in (model, with_pvm):
        torch._dynamo.reset()
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = run(m, prompt, compile=True)
        assert compiled == run(m, prompt)
    torch._dynamo.reset()
