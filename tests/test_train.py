"""train.py in-process on the tiny random model: what one step touches, the loss mask, learning,
resuming after a crash, what autograd records, gradient checkpointing, an official-layout checkpoint.
The command line (torchrun, bad input) is in test_train_cli.py."""
import hashlib
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import load_qwen
import train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py



def tiny_args(out, *extra):
    return train.parse_args(["--size", "tiny", "--synthetic-samples", "40", "--batch-size", "2",
                             "--eval-every", "0", "--out", str(out), *extra])


def digests(tensors):
    return {name: hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest() for name, t in tensors}


def test_one_step_changes_every_pvm_parameter_and_nothing_else(tmp_path, monkeypatch):
    args = tiny_args(tmp_path, "--max-steps", "2", "--save-every", "1")
    fresh = digests(train.build_model(args, None, "cpu", torch.float32).named_parameters())
    saved = []  # PVM weights after each step
    save = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda out, model, *rest: (
        saved.append(digests(train.pvm_state_dict(model).items())), save(out, model, *rest)))
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
        {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]}
    (tmp_path / "data.jsonl").write_text(json.dumps(llava) + "\n" + json.dumps(chat) + "\n")
    tokenizer = train.tiny_tokenizer()
    pads = "<|image_pad|>" * 64  # 64x64 is resized to 256x256: 8x8 merged tokens
    prompt = (f"<|im_start|>user\n<|vision_start|>{pads}<|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"
              "\n<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n\n")
    for sample in train.read_jsonl(tmp_path / "data.jsonl"):
        input_ids, _, _, mask = train.encode(sample, tokenizer, "cpu")
        decode = lambda ids: tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        assert decode(input_ids[mask]) == "A square.<|im_end|>Red.<|im_end|>"
        assert decode(input_ids[~mask]) == prompt


def test_the_built_in_task_is_learned(tmp_path):
    args = train.parse_args(["--size", "tiny", "--synthetic-samples", "200", "--max-steps", "15",
                             "--eval-every", "15", "--eval-samples", "20", "--out", str(tmp_path)])
    train.main(args)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    evals = [entry["eval_loss"] for entry in log if "eval_loss" in entry]
    assert evals[-1] <= 0.7 * evals[0]
    assert all(abs(g) > 1e-3 for g in log[-2]["gates"])


def test_resume_after_a_crash_gives_the_same_weights(tmp_path, monkeypatch):
    train.main(tiny_args(tmp_path / "straight", "--max-steps", "10", "--save-every", "5"))

    class Crash(Exception):
        pass
    get_lr = train.get_lr
    monkeypatch.setattr(train, "get_lr", lambda step, *a: get_lr(step, *a) if step < 7 else (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):  # dies during step 8, after the checkpoint of step 5
        train.main(tiny_args(tmp_path / "resumed", "--max-steps", "10", "--save-every", "5"))
    monkeypatch.setattr(train, "get_lr", get_lr)
    train.main(tiny_args(tmp_path / "resumed", "--max-steps", "10", "--save-every", "5", "--resume"))
    a, b = (load_file(tmp_path / run / "pvm.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model with its gates opened (as after some training), and one built-in sample."""
    args = tiny_args(tmp_path_factory.mktemp("tiny"))
    model, tokenizer = train.build_model(args, None, "cpu", torch.float32), train.tiny_tokenizer()
    with torch.no_grad():
        for i in model.config.pvm_layers:
            model.layers[i].pvm_block.gate_alpha.fill_(0.5)
    held_out, samples, _ = train.load_data(args, tokenizer)
    return model, train.encode(samples[0], tokenizer, "cpu")


def test_nothing_below_the_first_pvm_layer_is_in_the_graph(tiny):
    model, batch = tiny
    outputs = {}
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: outputs.__setitem__(name, out))
             for name, module in [("visual", model.visual), *((i, layer) for i, layer in enumerate(model.layers))]]
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
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    model.gradient_checkpointing = False
    (loss_a, a), (loss_b, b) = grads
    assert loss_a == loss_b and a.keys() == b.keys()
    assert all(torch.allclose(a[n], b[n], atol=1e-7) for n in a)


def test_an_official_layout_checkpoint_trains_and_its_pvm_file_loads(tiny_tied, tmp_path, monkeypatch):
    monkeypatch.setitem(train.SIZES, "4b", (str(tiny_tied), (1, 3), 64))  # the 4b path on a 4-layer model
    args = train.parse_args(["--size", "4b", "--synthetic-samples", "20", "--batch-size", "2", "--max-steps", "2",
                             "--eval-every", "0", "--out", str(tmp_path)])
    assert args.lr == 1e-4 and args.batch_size == 2
    model = train.main(args)
    assert model.gradient_checkpointing  # on by default for the released sizes
    loaded = load_qwen.load_model(tiny_tied, pvm=tmp_path / "pvm.safetensors")
    trained = train.pvm_state_dict(model)
    assert all(torch.equal(t, trained[name]) for name, t in train.pvm_state_dict(loaded).items())
    assert trained["model.language_model.layers.1.pvm_block.gate_alpha"].item() != 0
