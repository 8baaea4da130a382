"""grpo.py on the tiny random model: the loss against the formula written out on a hand-made
batch, what receives gradients, resuming after a crash, two gloo processes (DDP, FSDP2) against
one, bad input."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import grading
import grpo
import processor
import train
from load_qwen import load_model
from pvm import load_pvm
from processor import encode_chat

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def built(args):
    """The model train.py and grpo.py build for these options, fresh."""
    return common.build_model(args.size, args.seed, None, "cpu", torch.float32, args.grad_ckpt)

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
IM_END, IMAGE_PAD = 151645, 151655
# grpo.main as two processes under torchrun, with prepare() below
RUNNER = """
import sys
import grpo
from test_grpo import prepare
prepare()
grpo.main(grpo.parse_args(sys.argv[1:]))
"""


def opened(model):
    """Every PVM gate opened, as after some training, so that a step gives every PVM parameter a
    gradient."""
    with torch.no_grad():
        for i in model.config.pvm_layers:
            model.layers[i].pvm_block.gate_alpha.fill_(0.5)
    return model


def even_stops(model):
    """Every even token id a stop token, so that random completions end, at random lengths, and
    some are cut at the limit (a random model never samples <|im_end|>)."""
    model.config.eos_token_ids = tuple(range(0, model.config.vocab_size, 2))
    return opened(model)


def multiple_of_3(text, ids, sample, kind, tokenizer):
    """A reward that random completions reach a third of the time: most groups differ."""
    return 0.0, float(ids[0] % 3 == 0)


def by_prompt(model, input_ids, attention_mask, pixel_values, image_grid_thw, seed, **options):
    """generate_batch one prompt at a time, each seeded by its own tokens: samples that depend on
    the prompt alone, not on which process draws them (grpo.py seeds a process's batch), so that
    two processes can be compared with one. One image per prompt (the built-in task)."""
    pixels = pixel_values.split(image_grid_thw.prod(dim=1).tolist())
    answers = []
    for ids, mask, pixel_values, grid in zip(input_ids, attention_mask, pixels, image_grid_thw):
        ids = ids[mask.bool()][None]
        answers += SAMPLE(model, ids, None, pixel_values, grid[None],
                          seed=hash(tuple(ids[0].tolist())) % 2**62, **options)
    return answers


SAMPLE = grpo.generate_batch


def prepare(setattr=setattr):
    """grpo.main with even_stops models, the multiple_of_3 reward and by_prompt's samples."""
    build = common.build_model
    setattr(common, "build_model", lambda *args: even_stops(build(*args)))
    setattr(grpo, "rewards", multiple_of_3)
    setattr(grpo, "generate_batch", by_prompt)


def tiny_args(out, *extra):
    return ["--size", "tiny", "--init", "none", "--synthetic-samples", "8", "--prompts", "2",
            "--samples", "4", "--max-new-tokens", "3", "--lr", "1e-2", "--out", str(out), *extra]


def digests(tensors):
    return {name: hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()
            for name, t in tensors}


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def prepared(monkeypatch):
    prepare(monkeypatch.setattr)


@pytest.fixture
def captured(monkeypatch):
    """The gradients a step is given, before clipping: one {id(parameter): gradient} a step."""
    steps = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: (
        steps.append({id(p): p.grad.clone() for p in params if p.grad is not None}),
        clip(params, max_norm))[1])
    return steps


# prompt 0: rewards 1, 0, 0.9 (truncated: no stop token within 3), 0.1; prompt 1: all equal, the
# last row with a sampled <|image_pad|> (out of the loss too)
COMPLETIONS = [[[65, IM_END], [66, 67, IM_END], [68, 69, 70], [71, IM_END]],
               [[72, IM_END], [73, 74, IM_END], [75, IM_END], [76, IMAGE_PAD, IM_END]]]
REWARDS = {65: (0.1, 0.9), 66: (0.0, 0.0), 68: (0.0, 0.9), 71: (0.1, 0.0),
           72: (0.1, 0.9), 73: (0.1, 0.9), 75: (0.1, 0.9), 76: (0.1, 0.9)}


def test_the_loss_is_the_formula_written_out(tmp_path, monkeypatch, captured):
    """-sum over rows i, tokens t of A_i * log p(t) / (completion tokens of the batch), A_i the
    reward's distance to its group's mean over the group's std (n - 1) + 1e-4; a truncated row
    (or one holding <|image_pad|>) out of the numerator but in the count (TRL v1.0-v1.8's "dapo"
    normaliser, the paper's); an all-equal group out of the gradient, not of the count. The
    update runs in passes of at most 12 tokens: one row each."""
    build = common.build_model
    monkeypatch.setattr(common, "build_model", lambda *args: opened(build(*args)))
    monkeypatch.setattr(grpo, "generate_batch", lambda *args, seed, **kwargs: COMPLETIONS[0] +
                        COMPLETIONS[1])
    monkeypatch.setattr(grpo, "rewards", lambda text, ids, *rest: REWARDS[ids[0]])
    args = grpo.parse_args(tiny_args(tmp_path, "--max-steps", "1", "--micro-batch-tokens", "12"))
    grpo.main(args)

    model = built(args)
    prompts, tokenizer = grpo.load_prompts(args), processor.tiny_tokenizer()
    rewards = [[1.0, 0.0, 0.9, 0.1], [1.0, 1.0, 1.0, 1.0]]
    total, count = 0.0, sum(len(c) for group in COMPLETIONS for c in group)  # every token
    for (sample, _), completions, group in zip(prompts, COMPLETIONS, rewards):
        mean = sum(group) / 4
        std = (sum((r - mean) ** 2 for r in group) / 3) ** 0.5
        for completion, reward in zip(completions, group):
            if completion[-1] != IM_END or IMAGE_PAD in completion:
                continue  # truncated, or an image's token in the completion
            advantage = 0.0 if std == 0 else (reward - mean) / (std + 1e-4)
            ids, pixel_values, grid = encode_chat(tokenizer, grading.think_answer_turn(sample))
            T, n = ids.size(1), len(completion)
            logits = model(torch.cat([ids, torch.tensor([completion])], dim=1), pixel_values,
                           grid)                                           # (1, T + n, V)
            logp = logits[0, T - 1:T - 1 + n].log_softmax(dim=-1)          # (n, V)
            total = total + advantage * logp[torch.arange(n), completion].sum()
    assert count == 2 + 3 + 3 + 2 + (2 + 3 + 2 + 3)
    loss = -total / count
    loss.backward()
    expected = {id(p): p.grad for p in model.parameters() if p.requires_grad}
    assert len(captured[0]) == len(expected) == 30
    for got, want in zip(captured[0].values(), expected.values()):
        # float32 rounding, row by row against padded rows, amplified by the advantages'
        # cancellation: measured within 7e-6 of a tensor's largest entry (1.5e-5 against float64)
        assert (got - want).abs().max() <= 5e-5 * want.abs().max()
    log = read_log(tmp_path)[0]
    assert log["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert log["reward"] == pytest.approx((2.0 + 4.0) / 8)
    assert log["format"] == pytest.approx(0.6 / 8)
    assert log["all_equal"] == 0.5
    assert log["truncated"] == 1 / 8
    assert log["length"] == 20 / 8


@pytest.mark.parametrize("trainable", ["pvm", "lm"])
def test_only_the_trainable_parameters_get_gradients_and_change(tmp_path, prepared, captured,
                                                                trainable):
    args = grpo.parse_args(tiny_args(tmp_path, "--max-steps", "1", "--trainable", trainable))
    fresh = digests(built(args).named_parameters())
    model = grpo.main(args)
    names = {id(p): name for name, p in model.named_parameters()}
    trainable_names = {name for name in fresh
                       if (".pvm_block." in name if trainable == "pvm" else "visual." not in name)}
    assert {names[i] for i in captured[0]} == trainable_names
    trained = digests(model.named_parameters())
    assert {name for name in fresh if fresh[name] != trained[name]} == trainable_names
    if trainable == "lm":  # the whole model as an official checkpoint, PVM in its own file
        loaded = load_pvm(load_model(tmp_path / "model"), tmp_path / "pvm.safetensors")
        assert digests(loaded.named_parameters()) == trained


def test_resume_after_a_crash_gives_the_same_weights(tmp_path, monkeypatch, prepared):
    """Bit for bit: the prompts are a function of the seed and the step, each prompt's samples
    of the seed and its place; nothing else draws random numbers."""
    grpo.main(grpo.parse_args(tiny_args(tmp_path / "straight", "--max-steps", "4",
                                        "--save-every", "2")))

    class Crash(Exception):
        pass
    sample, calls = grpo.generate_batch, []

    def crash_in_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # one call a step
            raise Crash()
        return sample(*args, **kwargs)
    monkeypatch.setattr(grpo, "generate_batch", crash_in_step_4)
    with pytest.raises(Crash):  # after the checkpoint of step 2
        grpo.main(grpo.parse_args(tiny_args(tmp_path / "resumed", "--max-steps", "4",
                                            "--save-every", "2")))
    monkeypatch.setattr(grpo, "generate_batch", sample)
    torch.manual_seed(1234)  # another global RNG state than the first run's
    grpo.main(grpo.parse_args(tiny_args(tmp_path / "resumed", "--max-steps", "4",
                                        "--save-every", "2", "--resume")))
    a, b = (load_file(tmp_path / run / "pvm.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.language_model.layers.1.pvm_block.gate_alpha"].item() != 0.5  # it learned
    rewards = [{e["step"]: e["reward"] for e in read_log(tmp_path / run)}  # the last of a step
               for run in ("straight", "resumed")]
    assert rewards[0] == rewards[1]


def run_two_and_one(tmp_path, *extra):
    """The same run as two gloo processes under torchrun and as this one process (prepared by
    the caller's fixture)."""
    (tmp_path / "runner.py").write_text(RUNNER)
    common = tiny_args(tmp_path, "--max-steps", "2", *extra)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", str(tmp_path / "runner.py"), *common,
                    "--out", str(tmp_path / "two")], cwd=REPO, env=ENV, check=True,
                   capture_output=True)
    grpo.main(grpo.parse_args([*common, "--out", str(tmp_path / "one")]))
    logs = [read_log(tmp_path / run) for run in ("two", "one")]
    for two, one in zip(*logs):
        assert two["reward"] == one["reward"] and two["all_equal"] == one["all_equal"]
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    return [torch.load(tmp_path / run / "state.pt", weights_only=True)["weights"]
            for run in ("two", "one")]


def test_two_ddp_processes_equal_one(tmp_path, prepared):
    two, one = run_two_and_one(tmp_path)
    assert two.keys() == one.keys()
    assert all((two[k] - one[k]).abs().max() <= 1e-6 for k in two)
    assert two["layers.1.pvm_block.gate_alpha"].item() != 0.5


def test_two_fsdp2_processes_equal_one_unsharded(tmp_path, prepared):
    """--trainable lm: each decoder layer and the rest sharded over two processes by FSDP2."""
    two, one = run_two_and_one(tmp_path, "--trainable", "lm")
    assert two.keys() == one.keys()
    assert len(two) == 30 + 4 * 11 + 3  # PVM; the decoder layers; embeddings, norm, head
    # measured within 2.6e-6: float32 rounding of the sharded reductions, which AdamW's steps of
    # up to lr = 1e-2 carry into the weights
    assert all((two[k] - one[k]).abs().max() <= 5e-6 for k in two)
    exported = [load_file(tmp_path / run / "model" / "model.safetensors") for run in ("two", "one")]
    assert all((exported[0][k] - exported[1][k]).abs().max() <= 5e-6 for k in exported[0])


def test_the_reward_is_the_papers():
    """0.1 when the paper's pattern matches from the start (re.match, DOTALL); 0.9 when the
    content of the FIRST <answer>...</answer>, stripped, is right by mathruler's grade_answer,
    a multiple-choice answer against its letter."""
    sample = {"question": "Which?", "options": ["red", "green", "blue"], "answer": "B"}
    cases = {  # completion -> (format, accuracy)
        "<think>It is green.</think><answer>B</answer>": (0.1, 0.9),
        "<think>\nIt is green.\n</think>\n<answer>\nB\n</answer>": (0.1, 0.9),
        "<think>It is red.</think><answer>A</answer>": (0.1, 0.0),
        # the four the paper's pattern passes: a newline or a space after </answer>, an <answer>
        # inside the think part (the first: A), a second opening <think>
        "<think>x</think><answer>B</answer>\n": (0.1, 0.9),
        "<think>x</think><answer>B</answer> ": (0.1, 0.9),
        "<think>not <answer>A</answer> yet</think><answer>B</answer>": (0.1, 0.0),
        "<think>a <think>b</think><answer>B</answer>": (0.1, 0.9),
        "<think>a <think>b</think></think><answer>B</answer>": (0.0, 0.9),  # closed twice
        "<think>x</think><answer>B</answer> Sure.": (0.0, 0.9),  # something after
        "<think>x</think><answer>B</answer><answer>C</answer>": (0.0, 0.9),  # the first counts
        "<think>x</think><answer>B. green</answer>": (0.1, 0.0),  # not the letter alone
        "<think>x</think><answer>green</answer>": (0.1, 0.0),
        "<think>x</think><answer>The answer is B</answer>": (0.1, 0.0),
        "<answer>B</answer>": (0.0, 0.9),
        "<think>x</think>B": (0.0, 0.0),  # no <answer>: nothing to score
        "B": (0.0, 0.0),
    }
    for text, parts in cases.items():
        assert grpo.rewards(text, [], sample, "think_answer", None) == parts, text
    fraction = {"question": "3 of 4?", "answer": "0.75"}  # an open answer: mathruler's equality
    assert grpo.rewards("<think>x</think><answer> \\frac{3}{4} </answer>", [], fraction,
                        "think_answer", None) == (0.1, 0.9)
    tokenizer = processor.tiny_tokenizer()  # --size tiny: the first token alone (one byte here)
    tiny = {"B": (0.0, 1.0), "Blue": (0.0, 1.0), "C": (0.0, 0.0), " B": (0.0, 0.0)}
    for text, parts in tiny.items():
        ids = tokenizer.encode(text).ids
        assert grpo.rewards(text, ids, sample, "first_token", tokenizer) == parts, text


def test_the_papers_reward_needs_mathruler(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grpo, "grade_answer", None)  # as eval.py sets it without mathruler
    assert grpo.cli(["--size", "4b", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("error: the paper's accuracy reward needs mathruler: pip "
                                       "install mathruler pylatexenc sympy\n")


def test_a_multiple_choice_prompt_has_no_letter_only_post_prompt():
    """The options lettered one a line after the question, and nothing after them: eval.py's
    "Answer with the option's letter ... directly" asks for what the paper's reward scores 0."""
    sample = {"question": "Which?", "options": ["red", "green"], "answer": "B", "images": []}
    assert grading.think_answer_turn(sample) == [{"role": "user", "content": [
        {"type": "text", "text": "Which?\nA. red\nB. green"}]}]


def hand_batch(temperature, chunk):
    """The tiny model (gates opened), a built-in prompt, two completions with made-up advantages;
    the objective, its gradient, and the formula's: sum A * log softmax(logits / T)[token]."""
    model = opened(common.build_model("tiny", 0, None, "cpu", torch.float32))
    args = grpo.parse_args(tiny_args("unused"))
    sample, _ = grpo.load_prompts(args)[0]
    prompt = encode_chat(processor.tiny_tokenizer(), grading.think_answer_turn(sample))
    completions, advantages = [[65, 66, 67, IM_END], [68, IM_END]], [0.5, -2.0]
    batch = grpo.group_batch(prompt, completions, {IM_END}, IMAGE_PAD, torch.tensor(advantages))
    got = grpo.PolicyObjective(model, temperature, chunk)(*batch)
    got.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    ids, pixel_values, grid = prompt
    want, T = 0.0, ids.size(1)
    for completion, advantage in zip(completions, advantages):
        n = len(completion)
        logits = model(torch.cat([ids, torch.tensor([completion])], dim=1), pixel_values, grid)
        logp = (logits[0, T - 1:T - 1 + n] / temperature).log_softmax(dim=-1)  # (n, V)
        want = want + advantage * logp[torch.arange(n), completion].sum()
    want.backward()
    return got, want, grads, [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("chunk", [4096, 2])
def test_the_log_probabilities_are_taken_at_the_temperature(chunk):
    """TRL's rule: log p from logits / T. With chunks of 2 positions (recomputed in the backward
    pass) the objective and its gradient are the same."""
    got, want, grads, wants = hand_batch(0.7, chunk)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert abs(got.item() - hand_batch(1.0, chunk)[1].item()) > 0.1  # T matters here
    # float32 rounding in another order, against the largest gradient entry: measured 2e-7
    # whole, 7e-6 in chunks of 2
    scale = max(w.abs().max() for w in wants)
    assert all((g - w).abs().max() <= 5e-5 * scale for g, w in zip(grads, wants))


@pytest.mark.parametrize("cap", [40, 160])
def test_the_updates_logits_stay_within_the_token_budget(tmp_path, monkeypatch, cap):
    """--micro-batch-tokens 16 and completions of up to `cap` tokens: no pass of the update
    computes logits for more than 16 positions at once, yet every completion token is scored."""
    rows, build = [], common.build_model

    def hooked(*args):
        model = opened(build(*args))
        model.lm_head.register_forward_hook(lambda module, x, y: rows.append(y.size(0)))
        return model
    monkeypatch.setattr(common, "build_model", hooked)
    completions = [[65] * (n - 1) + [IM_END] for n in (cap, cap - 1, 5, cap // 2)] * 2
    monkeypatch.setattr(grpo, "generate_batch", lambda *args, **kwargs: completions)
    monkeypatch.setattr(grpo, "rewards", lambda text, ids, *rest: (0.0, float(len(ids) % 2)))
    grpo.main(grpo.parse_args(tiny_args(tmp_path, "--max-steps", "1", "--max-new-tokens",
                                        str(cap), "--micro-batch-tokens", "16")))
    assert max(rows) <= 16
    assert sum(rows) >= sum(map(len, completions))  # with the recomputation in the backward


def test_an_image_whose_body_fails_to_decode_is_skipped_and_counted(tmp_path, prepared, capsys):
    """Headers read at the start, the body at the prompt's turn: that prompt gives way to the
    next of the order, every step of the run is done, the skips are in the log and the file is
    named once."""
    from PIL import Image
    lines = []
    for i, color in enumerate(["red", "green", "blue"]):
        noise = Image.effect_noise((64, 64), 64).convert("RGB")  # some bytes past the header
        Image.blend(noise, Image.new("RGB", (64, 64), color), 0.5).save(tmp_path / f"{i}.jpg")
        lines.append(json.dumps({"question": "Which colour?", "options": ["red", "green", "blue"],
                                 "answer": color, "images": [f"{i}.jpg"]}))
    whole = (tmp_path / "1.jpg").read_bytes()
    (tmp_path / "1.jpg").write_bytes(whole[:-len(whole) // 3])  # the header reads fine
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    args = grpo.parse_args(tiny_args(tmp_path / "out", "--data", str(tmp_path / "data.jsonl"),
                                     "--max-steps", "2"))
    order = [where for _, where in grpo.load_prompts(args)]
    cut = next(k for k, where in enumerate(order) if "data.jsonl:2" in where)
    grpo.main(args)
    log = read_log(tmp_path / "out")
    assert [entry["step"] for entry in log] == [1, 2]
    assert sum(entry["skipped"] for entry in log) == sum(i % 3 == cut for i in range(4))
    assert capsys.readouterr().err.count("skipped") == 1


def test_bad_input_names_the_problem(tmp_path):
    (tmp_path / "text.jsonl").write_text('{"question": "2 + 2?", "answer": "4"}\n')
    cases = {  # extra arguments -> the message
        ("--init", str(tmp_path / "gone.safetensors")): "train.py first, or pass --init none",
        ("--model", str(tmp_path)): "--model does not go with --size tiny",
        ("--data", str(tmp_path / "text.jsonl")): "no prompt with an image",
    }
    for extra, message in cases.items():
        with pytest.raises(ValueError, match=message):
            grpo.main(grpo.parse_args(tiny_args(tmp_path / "out", *extra)))
