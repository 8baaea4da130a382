"""Exercise 7: the PVM block (pvm.CrossAttention.forward, pvm.PVMBlock.__init__,
pvm.PVMBlock.forward): the paper's sizes and tensor names, the initialisation, the identity at
step 0 with a gradient for the gate, and the block against its formula written out."""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import load_qwen
import pvm
from checks import close, image_prompt
from model import Qwen3VL, tiny_config

pytestmark = pytest.mark.ex07

OFFICIAL = Path(__file__).resolve().parent.parent.parent / "tests" / "official"
NAMES = {  # the paper's tensor names under model.language_model.layers.{i}.pvm_block.
    "text_reducer.weight", "vision_reducer.weight", "input_norm.weight",
    "cross_attn.q_proj.weight", "cross_attn.k_proj.weight", "cross_attn.v_proj.weight",
    "cross_attn.o_proj.weight", "cross_attn.q_norm.weight", "cross_attn.k_norm.weight",
    "post_attn_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight", "output_expander.weight", "gate_alpha"}


@pytest.mark.parametrize("size, total", [("4b", 22_728_963), ("8b", 27_922_179)])
def test_sizes_and_names_match_the_paper(size, total):
    config = load_qwen.config_from_hf(json.loads((OFFICIAL / f"config-{size}.json").read_text()))
    with torch.device("meta"):  # no memory: shapes only
        block = pvm.PVMBlock(config, 512)
    names = set(block.state_dict())
    assert names == NAMES, f"missing {sorted(NAMES - names)}, unexpected {sorted(names - NAMES)}"
    count = sum(p.numel() for p in block.parameters())
    assert 3 * count == total, f"3 blocks of {count:,} parameters: {3 * count:,}, paper {total:,}"
    shapes = {name: tuple(t.shape) for name, t in block.state_dict().items()}
    assert shapes["cross_attn.k_proj.weight"] == (128, 512), (
        f"k_proj {shapes['cross_attn.k_proj.weight']}: one key-value head of 128 for 4 query "
        "heads, the backbone's 4 query heads per key-value head")


def test_initialisation():
    """The gate 0; every Linear weight N(0, 0.02); norm weights 1."""
    torch.manual_seed(0)
    block = pvm.PVMBlock(tiny_config(), 128)
    assert block.gate_alpha.shape == (1,) and block.gate_alpha.item() == 0.0, (
        f"gate_alpha {block.gate_alpha.tolist()}, expected [0.0]")
    for name, module in block.named_modules():
        if isinstance(module, torch.nn.Linear):
            std, mean = module.weight.std().item(), module.weight.mean().item()
            assert 0.018 < std < 0.022 and abs(mean) < 0.002, (
                f"{name}.weight has mean {mean:.4f} and std {std:.4f}, expected N(0, 0.02)")
            assert module.bias is None, f"{name} has a bias; the paper's layers have none"
        elif hasattr(module, "weight") and module.weight is not None:  # the RMSNorms
            close(module.weight.detach(), torch.ones_like(module.weight), f"{name}.weight",
                  atol=0.0)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(1)
    return Qwen3VL(tiny_config()).eval()


def test_identity_at_step_0_and_the_gate_gets_a_gradient(base):
    """Gate 0: exactly the base model. The loss must still give the gate a gradient, or the
    branch never opens; every other PVM parameter gets exactly 0 at step 0."""
    torch.manual_seed(2)
    model = pvm.attach_pvm(copy.deepcopy(base), [1, 3], 64)
    ids, grid = image_prompt([9707, 11, 1879, 0], (8, 8))
    pixel_values = torch.randn(64, 1536)
    with torch.no_grad():
        want = base.hidden_states(ids, pixel_values, grid)
    got = model.hidden_states(ids, pixel_values, grid)
    assert torch.equal(got, want), (
        f"hidden states differ from the base model by {(got - want).abs().max():.2e} at step 0")
    loss = F.cross_entropy(model.lm_head(got[0, :-1]), ids[0, 1:])
    loss.backward()
    for i in (1, 3):
        block = model.layers[i].pvm_block
        assert block.gate_alpha.grad is not None and block.gate_alpha.grad.abs().item() > 1e-8, (
            f"layer {i}: the gate's gradient at step 0 is {block.gate_alpha.grad}")
        for name, p in block.named_parameters():
            if name != "gate_alpha" and p.grad is not None:
                assert p.grad.abs().max() == 0, f"layer {i}: {name} has a gradient at gate 0"


def rms(x, weight=1.0):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def cross_attention_formula(W, t, bank, heads, kv_heads, hd=32):
    """Cross-attention of one sample written out, head by head: text t (T, d), bank (Nv, d) of
    real visual tokens only; query head h reads key-value head h // (heads / kv_heads)."""
    outs = []
    for h in range(heads):
        j = h // (heads // kv_heads)
        q = rms(t @ W["q_proj.weight"][hd * h:hd * (h + 1)].T, W["q_norm.weight"])
        k = rms(bank @ W["k_proj.weight"][hd * j:hd * (j + 1)].T, W["k_norm.weight"])
        v = bank @ W["v_proj.weight"][hd * j:hd * (j + 1)].T
        outs.append(torch.softmax(q @ k.T / hd**0.5, dim=-1) @ v)          # (T, hd)
    return torch.cat(outs, -1) @ W["o_proj.weight"].T


def randomized(block, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)  # not ones: a norm left out or moved must show
    return block


def test_cross_attention_against_the_formula():
    """Width 128: 4 query heads of 32 sharing 2 key-value heads. Sample 0's last two visual
    tokens are padding; the padding must get no weight."""
    block = randomized(pvm.PVMBlock(tiny_config(), 128), seed=3)
    attention = block.cross_attn
    torch.manual_seed(4)
    text, bank = torch.randn(2, 3, 128), torch.randn(2, 5, 128) * 2
    bank_mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    with torch.no_grad():
        got = attention(text, bank, bank_mask)
        W = attention.state_dict()
        for b in range(2):
            want = cross_attention_formula(W, text[b], bank[b][bank_mask[b]], heads=4, kv_heads=2)
            close(got[b], want, f"CrossAttention of sample {b} (T, d)", atol=1e-5, rtol=1e-5)


def test_the_block_against_the_formula():
    """h = gate * rms(expand(m + MLP(rms(m)))), m = cross-attention of rms(reduce(a)) over the
    reduced bank; nothing at the image's own positions nor for a sample without an image."""
    block = randomized(pvm.PVMBlock(tiny_config(), 64), seed=5)
    torch.manual_seed(6)
    a, bank = torch.randn(2, 4, 64), torch.randn(2, 5, 64)
    bank_mask = torch.tensor([[True, True, True, True, False], [False] * 5])  # 1: no image
    is_image = torch.tensor([[False, True, False, False], [False] * 4])
    with torch.no_grad():
        block.gate_alpha.fill_(0.7)
        got = block(a, bank, bank_mask, is_image)
        W = block.state_dict()
        t = rms(a[0] @ W["text_reducer.weight"].T, W["input_norm.weight"])      # (T, d)
        v = bank[0, :4] @ W["vision_reducer.weight"].T                          # real tokens
        attn = {k[len("cross_attn."):]: w for k, w in W.items() if k.startswith("cross_attn.")}
        m = cross_attention_formula(attn, t, v, heads=2, kv_heads=1)
        x = rms(m, W["post_attn_norm.weight"])
        m = m + (F.silu(x @ W["mlp.gate_proj.weight"].T) * (x @ W["mlp.up_proj.weight"].T)
                 ) @ W["mlp.down_proj.weight"].T
        want = 0.7 * rms(m @ W["output_expander.weight"].T)
        want[1] = 0  # an image position
    close(got[0], want, "PVMBlock of sample 0 (T, D)", atol=1e-5, rtol=1e-5)
    close(got[1], torch.zeros(4, 64), "PVMBlock of sample 1, which has no image", atol=0.0)
    with torch.no_grad():
        empty = block(a, bank[:, :0], bank_mask[:, :0], torch.zeros(2, 4, dtype=torch.bool))
    close(empty, torch.zeros(2, 4, 64), "PVMBlock with no visual token in the batch", atol=0.0)
