"""PVM (pvm.py): sizes, the identity at initialisation, masking, caching, the formula, and files."""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import common
import load_qwen
import pvm
from model import KVCache, Qwen3VL
from vision import preprocess_image

OFFICIAL = Path(__file__).parent / "official"
IMAGE, VSTART, VEND = 151655, 151652, 151653


@pytest.mark.parametrize("size, total", [("4b", 22_728_963), ("8b", 27_922_179)])
def test_parameter_counts_match_the_paper(size, total):
    config = load_qwen.config_from_hf(json.loads((OFFICIAL / f"config-{size}.json").read_text()))
    with torch.device("meta"):
        model = pvm.attach_pvm(Qwen3VL(config), common.SIZES[size]["pvm_layers"], 512)
    layers = [model.layers[i] for i in common.SIZES[size]["pvm_layers"]]
    counts = [sum(p.numel() for p in layer.pvm_block.parameters()) for layer in layers]
    assert sum(counts) == total
    assert len(set(counts)) == 1


def prompt(photo, text_ids):
    """input_ids (1, T) holding one image, with its pixel_values and grid."""
    pixel_values, grid = preprocess_image(photo)
    n = int(grid.prod()) // 4
    image_ids = [VSTART] + [IMAGE] * n + [VEND]
    ids = [151644, 872, 198] + image_ids + text_ids + [151645, 198, 151644, 77091, 198]
    return torch.tensor([ids]), pixel_values, grid


@pytest.fixture(scope="module")
def pvm_base(tiny_untied):
    torch.manual_seed(0)
    return pvm.attach_pvm(load_qwen.load_model(tiny_untied), [1, 3], 64)


@pytest.fixture
def pvm_model(pvm_base):
    """A copy per test: a test opens the gates, and a failing one must not leave them open."""
    return copy.deepcopy(pvm_base)


def test_identity_at_init_and_the_gate_gets_a_gradient(tiny_untied, pvm_model, photos):
    base = load_qwen.load_model(tiny_untied)
    ids, pv, grid = prompt(photos["chelsea"], [9707, 11, 1879])
    logits = pvm_model(ids, pv, grid)
    assert torch.equal(logits, base(ids, pv, grid))  # gate 0: exactly the base model
    F.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    gates = [pvm_model.layers[i].pvm_block.gate_alpha for i in (1, 3)]
    assert all(g.grad is not None for g in gates)
    assert all(g.grad.abs().item() > 0 for g in gates)
    for p in pvm_model.parameters():
        p.grad = None


def test_branch_writes_only_at_text_positions_of_prompts_with_an_image(tiny_untied, pvm_model,
                                                                       photos):
    base = load_qwen.load_model(tiny_untied)
    block = pvm_model.layers[1].pvm_block
    outputs = []
    hook = block.register_forward_hook(lambda module, args, out: outputs.append(out))
    ids, pv, grid = prompt(photos["chelsea"], [9707, 11, 1879])
    text_only = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 151645, 198]])
    with torch.no_grad():
        block.gate_alpha.fill_(0.5)
        pvm_model(ids, pv, grid)
        text_logits = pvm_model(text_only)
        block.gate_alpha.zero_()
    hook.remove()
    with_image, without = outputs[0][0].abs().sum(-1), outputs[1][0].abs().sum(-1)  # (T,)
    is_image = ids[0] == IMAGE
    assert (with_image[is_image] == 0).all()
    assert (with_image[~is_image] > 0).all()
    assert (without == 0).all()
    assert torch.equal(text_logits, base(text_only))


def test_batch_with_padding_equals_each_prompt_alone(pvm_model, photos):
    a_ids, a_pv, a_grid = prompt(photos["chelsea"], [9707, 11, 1879, 0, 9707])
    b_ids, b_pv, b_grid = prompt(photos["astronaut"], [9707])
    T = max(a_ids.size(1), b_ids.size(1))
    ids = torch.full((2, T), 151643)
    mask = torch.zeros(2, T, dtype=torch.long)
    for row, x in enumerate((a_ids, b_ids)):  # left padding
        ids[row, T - x.size(1):], mask[row, T - x.size(1):] = x[0], 1
    with torch.no_grad():
        for block in (pvm_model.layers[i].pvm_block for i in (1, 3)):
            block.gate_alpha.fill_(1.0)
        batch = pvm_model(ids, torch.cat([a_pv, b_pv]), torch.cat([a_grid, b_grid]), mask)
        alone = [pvm_model(a_ids, a_pv, a_grid), pvm_model(b_ids, b_pv, b_grid)]
        for block in (pvm_model.layers[i].pvm_block for i in (1, 3)):
            block.gate_alpha.zero_()
    for row, x in enumerate(alone):
        assert (batch[row, T - x.size(1):] - x[0]).abs().max() <= 1e-4


def test_decoding_with_the_cache_equals_a_full_forward(pvm_model, photos):
    ids, pv, grid = prompt(photos["chelsea"], [9707, 11, 1879, 0, 9707, 11, 1879])
    calls = []
    hook = pvm_model.visual.register_forward_hook(lambda *args: calls.append(1))
    P = ids.size(1) - 6  # the last 6 tokens are decoded one at a time
    with torch.no_grad():
        for block in (pvm_model.layers[i].pvm_block for i in (1, 3)):
            block.gate_alpha.fill_(1.0)
        full = pvm_model(ids, pv, grid)
        cache = KVCache(pvm_model.config, 1, ids.size(1), "cpu", torch.float32)
        steps = [pvm_model(ids[:, :P], pv, grid, cache=cache)[:, -1]]
        steps += [pvm_model(ids[:, t:t + 1], cache=cache)[:, -1] for t in range(P, ids.size(1))]
        for block in (pvm_model.layers[i].pvm_block for i in (1, 3)):
            block.gate_alpha.zero_()
    hook.remove()
    assert len(calls) == 2  # once for the full forward, once for the whole cached generation
    assert (torch.stack(steps, 1) - full[:, P - 1:]).abs().max() <= 1e-4


def test_one_block_against_the_formula_written_out(pvm_model):
    torch.manual_seed(0)
    block = pvm_model.layers[1].pvm_block
    a, bank = torch.randn(1, 3, 64), torch.randn(1, 5, 64)
    bank_mask = torch.tensor([[True, True, True, True, False]])  # the 5th visual token is padding
    is_image = torch.tensor([[False, True, False]])
    with torch.no_grad():
        block.gate_alpha.fill_(0.7)
        got = block(a, bank, bank_mask, is_image)
        block.gate_alpha.zero_()

    def rms(x, w=1.0):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    W = {k: v for k, v in block.state_dict().items()}
    t = rms(a @ W["text_reducer.weight"].T, W["input_norm.weight"])[0]  # (3, d)
    v = (bank @ W["vision_reducer.weight"].T)[0, :4]                    # padding dropped
    k = rms(v @ W["cross_attn.k_proj.weight"].T, W["cross_attn.k_norm.weight"])
    val = v @ W["cross_attn.v_proj.weight"].T
    heads = []
    for h in range(2):  # two query heads of 32 sharing one key/value head
        q_proj = W["cross_attn.q_proj.weight"][32 * h:32 * h + 32]
        q = rms(t @ q_proj.T, W["cross_attn.q_norm.weight"])
        heads.append(torch.softmax(q @ k.T / 32**0.5, dim=-1) @ val)
    m = torch.cat(heads, -1) @ W["cross_attn.o_proj.weight"].T
    x = rms(m, W["post_attn_norm.weight"])
    hidden = F.silu(x @ W["mlp.gate_proj.weight"].T) * (x @ W["mlp.up_proj.weight"].T)
    m = m + hidden @ W["mlp.down_proj.weight"].T
    want = 0.7 * rms(m @ W["output_expander.weight"].T)
    want[1] = 0  # the visual query position is silenced
    assert (got[0] - want).abs().max() <= 1e-5


def test_save_load_round_trip_and_refusals(tiny_untied, pvm_model, tmp_path):
    with torch.no_grad():
        pvm_model.layers[3].pvm_block.gate_alpha.fill_(0.25)
    pvm.save_pvm(pvm_model, tmp_path / "pvm.safetensors")
    with torch.no_grad():
        pvm_model.layers[3].pvm_block.gate_alpha.zero_()
    loaded = pvm.load_pvm(load_qwen.load_model(tiny_untied), tmp_path / "pvm.safetensors")
    assert loaded.config.pvm_layers == (1, 3)
    assert loaded.config.pvm_dim == 64
    assert loaded.layers[3].pvm_block.gate_alpha.item() == 0.25
    for name, tensor in pvm.pvm_state_dict(loaded).items():
        if "gate_alpha" not in name:
            assert torch.equal(tensor, pvm.pvm_state_dict(pvm_model)[name])
    # torch's strict load_state_dict names what does not fit (the keys: layer.parameter)
    refusals = [([0, 2], 64, 'Unexpected key.*"0.text_reducer.weight"'),
                ([1, 3], 32, "size mismatch for 1.text_reducer.weight")]
    for layers, d, message in refusals:
        other = pvm.attach_pvm(load_qwen.load_model(tiny_untied), layers, d)
        pvm.save_pvm(other, tmp_path / "other.safetensors")
        model = pvm.load_pvm(load_qwen.load_model(tiny_untied), tmp_path / "pvm.safetensors")
        with pytest.raises(ValueError, match="other.safetensors does not fit the model's PVM "
                                             f"blocks: .*{message}"):
            pvm.load_pvm(model, tmp_path / "other.safetensors")
