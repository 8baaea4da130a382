"""train.py in-process on the tiny random model: what one step touches, the loss mask, the loss
weighting, the held-out split, learning, resuming after a crash, what autograd records, gradient
checkpointing, an official-layout checkpoint, the tiny run's backbone read by generate.py.
The command line (torchrun, bad input) is in test_train_cli.py."""
import copy
import hashlib
import json
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import processor
import common
import data
import generate
import load_qwen
import pvm
import train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def built(args):
    """The model train.py and grpo.py build for these options, fresh."""
    return common.build_model(args.size, args.seed, None, "cpu", torch.float32, args.grad_ckpt)


def READ(record, root, where):
    """data.read_jsonl's reading of a training record, as data.load_data's."""
    return data.to_messages(record, root), where


def tiny_args(out, *extra):
    return train.parse_args(["--size", "tiny", "--synthetic-samples", "40", "--batch-size", "2",
                             "--eval-every", "0", "--out", str(out), *extra])


def digests(tensors):
    return {name: hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()
            for name, t in tensors}


def write_replies(directory, n):
    """A chat-format data file of n samples whose replies differ in length (1 to 20 words), so
    that a mean of per-sample means differs from the mean over all reply tokens."""
    lines = []
    for i in range(n):
        Image.new("RGB", (32, 32), (40 * i % 256, 90, 160)).save(directory / f"{i}.png")
        reply = " ".join(["red"] * (1 + 19 * (i % 2)) + [str(i)])
        lines.append(json.dumps({"images": [f"{i}.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": reply}]}))
    (directory / "replies.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "replies.jsonl"


def open_gates(monkeypatch):
    """Makes train.build_model open every PVM gate (as after some training), so that one step
    gives every PVM parameter a gradient, not the gates alone."""
    build = common.build_model

    def build_open(*args):
        model = build(*args)
        with torch.no_grad():
            for i in model.config.pvm_layers:
                model.layers[i].pvm_block.gate_alpha.fill_(0.5)
        return model
    monkeypatch.setattr(common, "build_model", build_open)


def test_one_step_changes_every_pvm_parameter_and_nothing_else(tmp_path, monkeypatch):
    args = tiny_args(tmp_path, "--max-steps", "2", "--save-every", "1")
    fresh = digests(built(args).named_parameters())
    saved = []  # PVM weights after each step
    save = common.save_checkpoint
    monkeypatch.setattr(common, "save_checkpoint", lambda out, model, *rest: (
        saved.append(digests(pvm.pvm_state_dict(model).items())), save(out, model, *rest)))
    model = train.main(args)
    trained = digests(model.named_parameters())
    pvm_names = {name for name in fresh if ".pvm_block." in name}
    assert {name for name in fresh if fresh[name] != trained[name]} == pvm_names
    # at initialisation the gate is 0, so only the gate gets a gradient; the second step moves all
    assert all(saved[0][name] != saved[1][name] for name in saved[0])


def test_loss_mask_is_exactly_the_replies_in_both_formats(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    llava = {"image": "red.png", "conversations": [
        {"from": "human", "value": "<image>What is it?"}, {"from": "gpt", "value": "A square."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]}
    chat = {"images": ["red.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]}
    (tmp_path / "data.jsonl").write_text(json.dumps(llava) + "\n" + json.dumps(chat) + "\n")
    tokenizer = processor.tiny_tokenizer()
    pads = "<|image_pad|>" * 64  # 64x64 is resized to 256x256: 8x8 merged tokens
    prompt = (f"<|im_start|>user\n<|vision_start|>{pads}<|vision_end|>What is it?<|im_end|>\n"
              "<|im_start|>assistant\n\n<|im_start|>user\nColour?<|im_end|>\n"
              "<|im_start|>assistant\n\n")
    for sample in data.read_jsonl(tmp_path / "data.jsonl", READ):
        input_ids, _, _, mask = processor.encode_chat_for_training(tokenizer, sample[0])
        decode = lambda ids: tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        assert decode(input_ids[mask]) == "A square.<|im_end|>Red.<|im_end|>"
        assert decode(input_ids[~mask]) == prompt


def test_a_llava_record_becomes_a_chat_record():
    record = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                  {"from": "gpt", "value": "A cat."}]}
    user = [{"type": "image"}, {"type": "text", "text": "\nWhat?"}]
    assistant = [{"type": "text", "text": "A cat."}]
    assert data.llava_to_chat(record) == {"images": "a.png", "messages": [
        {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def test_data_errors_name_file_and_line(tmp_path):
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
             {"role": "assistant", "content": "Red."}]
    cases = {  # the message -> a record that gives it
        "message content must be a string or a list of parts": {
            "images": ["a.png"], "messages": [{"role": "user", "content": 5}]},
        "unknown role 'robot'": {"images": ["a.png"],
                                 "messages": [{"role": "robot", "content": "?"}]},
        "more image placeholders than images": {"messages": turns},
        "1 image(s) more than image placeholders": {"images": ["a", "b"], "messages": turns},
        'expected a list of turns under "conversations"': {"image": "a.png", "conversations": "?"},
        "images must be a path or a list of paths": {"images": [3], "messages": turns},
    }
    for message, record in cases.items():
        (tmp_path / "d.jsonl").write_text("\n" + json.dumps(record) + "\n")  # line 1 is empty
        with pytest.raises(ValueError) as error:
            data.read_jsonl(tmp_path / "d.jsonl", READ)
        assert str(error.value) == f"{tmp_path / 'd.jsonl'}:2: {message}"


def test_an_accumulated_step_takes_the_mean_over_all_reply_tokens(tmp_path, monkeypatch):
    """As TRL's SFTTrainer: the batch's loss is the mean over all its reply tokens, not the mean
    of per-sample means; the gradient of two accumulated samples is that of this one mean."""
    path = write_replies(tmp_path, 2)
    args = train.parse_args(["--size", "tiny", "--data", str(path), "--batch-size", "2",
                             "--max-steps", "1", "--eval-every", "0", "--out", str(tmp_path)])
    open_gates(monkeypatch)
    grads = []  # what the step is given, before clipping
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: (
        grads.append([p.grad.clone() for p in params]), clip(params, max_norm))[1])
    train.main(args)

    model, tokenizer = built(args), processor.tiny_tokenizer()
    losses = []  # per token, of both samples
    for sample in data.read_jsonl(path, READ):
        input_ids, pixel_values, grid, mask = processor.encode_chat_for_training(tokenizer,
                                                                                 sample[0])
        logits = model.train()(input_ids, pixel_values, grid)  # (1, T, V)
        predicts = mask[:, 1:]  # position t predicts token t + 1
        target = input_ids[:, 1:][predicts]
        losses.append(F.cross_entropy(logits[:, :-1][predicts], target, reduction="none"))
    assert len(losses[0]) != len(losses[1])  # else both ways of averaging agree
    torch.cat(losses).mean().backward()
    expected = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads[0]) == len(expected)
    assert all(torch.allclose(g, e, rtol=1e-5, atol=1e-9) for g, e in zip(grads[0], expected))
    logged = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert logged["loss"] == pytest.approx(torch.cat(losses).mean().item(), rel=1e-6)


def test_the_held_out_split_does_not_depend_on_eval_every(tmp_path):
    runs = {}
    for every in ("0", "1"):
        train.main(tiny_args(tmp_path / every, "--max-steps", "1", "--eval-every", every))
        state = torch.load(tmp_path / every / "state.pt", weights_only=True)
        runs[every] = state["run"], load_file(tmp_path / every / "pvm.safetensors")
    (run_a, pvm_a), (run_b, pvm_b) = runs.values()
    assert run_a["held_out"] == run_b["held_out"] == 4
    assert run_a["train"] == run_b["train"] == 36
    assert all(torch.equal(pvm_a[k], pvm_b[k]) for k in pvm_a)  # the same step on the same samples


def test_the_built_in_task_is_learned(tmp_path):
    args = train.parse_args(["--size", "tiny", "--synthetic-samples", "200", "--max-steps", "15",
                             "--eval-every", "15", "--eval-samples", "20", "--out", str(tmp_path)])
    train.main(args)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    evals = [entry["eval_loss"] for entry in log if "eval_loss" in entry]
    assert evals[-1] <= 0.7 * evals[0]
    assert all(abs(g) > 1e-3 for g in log[-2]["gates"])


def test_resume_after_a_crash_gives_the_same_weights(tmp_path, monkeypatch):
    """Bit for bit, with no RNG state in the checkpoint: the sample order is a function of the
    seed and the step, and nothing else in the loop draws random numbers."""
    train.main(tiny_args(tmp_path / "straight", "--max-steps", "10", "--save-every", "5"))

    class Crash(Exception):
        pass
    get_lr = train.get_lr

    def crash_at_step_8(step, *rest):
        if step >= 7:
            raise Crash()
        return get_lr(step, *rest)
    monkeypatch.setattr(train, "get_lr", crash_at_step_8)
    with pytest.raises(Crash):  # dies during step 8, after the checkpoint of step 5
        train.main(tiny_args(tmp_path / "resumed", "--max-steps", "10", "--save-every", "5"))
    monkeypatch.setattr(train, "get_lr", get_lr)
    torch.manual_seed(1234)  # another global RNG state than the first run's
    train.main(tiny_args(tmp_path / "resumed", "--max-steps", "10", "--save-every", "5",
                         "--resume"))
    a, b = (load_file(tmp_path / run / "pvm.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """The tiny model with its gates opened (as after some training), and one built-in sample."""
    args = tiny_args(tmp_path_factory.mktemp("tiny"))
    model, tokenizer = built(args), processor.tiny_tokenizer()
    with torch.no_grad():
        for i in model.config.pvm_layers:
            model.layers[i].pvm_block.gate_alpha.fill_(0.5)
    held_out, samples, _ = data.load_data(None, tokenizer, args.max_len, args.seed,
                                          args.eval_samples, args.synthetic_samples)
    return model, processor.encode_chat_for_training(tokenizer, samples[0][0])


@pytest.fixture
def tiny(tiny_base):
    """A copy per test: tests switch modes and leave gradients, which must not reach the next."""
    model, batch = tiny_base
    return copy.deepcopy(model), batch


def test_nothing_below_the_first_pvm_layer_is_in_the_graph(tiny):
    model, batch = tiny
    outputs = {}
    modules = [("visual", model.visual), *enumerate(model.layers)]
    hooks = [module.register_forward_hook(
        lambda m, args, out, name=name: outputs.__setitem__(name, out)) for name, module in modules]
    train.AssistantLoss(model.train())(*batch).backward()
    image_embeds, deepstack = outputs["visual"]
    assert not image_embeds.requires_grad and not any(d.requires_grad for d in deepstack)
    first = model.config.pvm_layers[0]
    assert [outputs[i].requires_grad for i in range(4)] == [i >= first for i in range(4)]
    for name, p in model.named_parameters():  # gradients for PVM only, none for the frozen weights
        assert (p.grad is not None) == (".pvm_block." in name), name
        p.grad = None
    for hook in hooks:
        hook.remove()


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    model, batch = tiny
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        loss = train.AssistantLoss(model.train())(*batch)
        loss.backward()
        named = model.named_parameters()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in named if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    model.gradient_checkpointing = False
    (loss_a, a), (loss_b, b) = grads
    assert loss_a == loss_b
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[n], b[n], atol=1e-7) for n in a)


def test_an_official_layout_checkpoint_trains_and_its_pvm_file_loads(tiny_tied, tmp_path,
                                                                     monkeypatch):
    # the 4b path on a 4-layer model
    small = {"checkpoint": str(tiny_tied), "pvm_layers": (1, 3), "pvm_dim": 64}
    monkeypatch.setitem(common.SIZES, "4b", common.SIZES["4b"] | small)
    args = train.parse_args(["--size", "4b", "--synthetic-samples", "20", "--batch-size", "2",
                             "--max-steps", "2", "--eval-every", "0", "--out", str(tmp_path)])
    assert args.lr == 1e-4 and args.batch_size == 2
    model = train.main(args)
    assert model.gradient_checkpointing  # on by default for the released sizes
    loaded = pvm.load_pvm(load_qwen.load_model(tiny_tied), tmp_path / "pvm.safetensors")
    trained = pvm.pvm_state_dict(model)
    assert all(torch.equal(t, trained[name]) for name, t in pvm.pvm_state_dict(loaded).items())
    assert trained["model.language_model.layers.1.pvm_block.gate_alpha"].item() != 0
    assert not (tmp_path / "backbone").exists()  # only the tiny random backbone is written out


def test_the_tiny_run_writes_a_backbone_that_generate_reads(tmp_path):
    out = tmp_path / "out"
    model = train.main(tiny_args(out, "--max-steps", "2"))
    assert model.layers[1].pvm_block.gate_alpha.item() != 0
    loaded = pvm.load_pvm(load_qwen.load_model(out / "backbone"), out / "pvm.safetensors")
    sample = data.synthetic_sample(random.Random(7))
    batch = processor.encode_chat_for_training(processor.tiny_tokenizer(), sample)[:3]
    with torch.no_grad():
        assert torch.equal(loaded(*batch), model(*batch))
    Image.new("RGB", (48, 40), "blue").save(tmp_path / "blue.png")
    argv = ["--model", str(out / "backbone"), "--pvm", str(out / "pvm.safetensors"),
            "--image", str(tmp_path / "blue.png"), "--prompt", "Colour?", "--max-new-tokens", "4",
            "--device", "cpu", "--report", str(tmp_path / "report.png")]
    assert generate.cli(argv) == 0
    assert (tmp_path / "report.png").exists()
