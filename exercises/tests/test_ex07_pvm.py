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
from model import Config, Qwen3VL, tiny_config

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


def block_formula(block, a, bank, is_image):
    """The block of one sample written out in float32: a (T, D), bank (Nv, D) of real visual
    tokens only; the tiny backbone's g = 2 query heads per key-value head."""
    W = {name: w.float() for name, w in block.state_dict().items()}
    a, bank = a.float(), bank.float()
    t = rms(a @ W["text_reducer.weight"].T, W["input_norm.weight"])            # (T, d)
    v = bank @ W["vision_reducer.weight"].T
    attn = {k[len("cross_attn."):]: w for k, w in W.items() if k.startswith("cross_attn.")}
    heads = t.size(-1) // 32
    m = cross_attention_formula(attn, t, v, heads=heads, kv_heads=max(1, heads // 2))
    x = rms(m, W["post_attn_norm.weight"])
    m = m + (F.silu(x @ W["mlp.gate_proj.weight"].T) * (x @ W["mlp.up_proj.weight"].T)
             ) @ W["mlp.down_proj.weight"].T
    want = W["gate_alpha"] * rms(m @ W["output_expander.weight"].T)
    want[is_image] = 0  # the image's own positions
    return want


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
        want = block_formula(block, a[0], bank[0, :4], is_image[0])
    close(got[0], want, "PVMBlock of sample 0 (T, D)", atol=1e-5, rtol=1e-5)
    close(got[1], torch.zeros(4, 64), "PVMBlock of sample 1, which has no image", atol=0.0)
    with torch.no_grad():
        empty = block(a, bank[:, :0], bank_mask[:, :0], torch.zeros(2, 4, dtype=torch.bool))
    close(empty, torch.zeros(2, 4, 64), "PVMBlock with no visual token in the batch", atol=0.0)


@pytest.mark.parametrize("size, d, n_kv", [
    ("tiny", 32, 1), ("tiny", 64, 1), ("tiny", 96, 1), ("tiny", 128, 2), ("tiny", 192, 3),
    ("4b", 128, 1), ("4b", 384, 1), ("4b", 512, 1), ("4b", 768, 1), ("4b", 1024, 2)])
def test_key_value_heads_for_each_width(size, d, n_kv):
    """n_kv = max(1, (d // hd) // g), g the backbone's query heads per key-value head (tiny:
    hd 32, g 2; the 4B: hd 128, g 4): integer division, so 3 query heads share one key-value
    head at g = 2, and never fewer than one."""
    config = tiny_config() if size == "tiny" else Config()
    with torch.device("meta"):
        block = pvm.PVMBlock(config, d)
    shape = tuple(block.cross_attn.k_proj.weight.shape)
    assert shape == (n_kv * config.head_dim, d), (
        f"{size}, d = {d}: k_proj {shape}, expected {n_kv} key-value head(s): "
        f"{(n_kv * config.head_dim, d)}")


@pytest.mark.parametrize("d", [32, 96, 128])
def test_the_block_at_other_widths_against_the_formula(d):
    """Widths of 1, 3 and 4 query heads (1, 1 and 2 key-value heads)."""
    block = randomized(pvm.PVMBlock(tiny_config(), d), seed=7)
    torch.manual_seed(8)
    a, bank = torch.randn(2, 3, 64), torch.randn(2, 4, 64)
    bank_mask = torch.tensor([[True, True, False, True], [True] * 4])  # padding in the middle
    is_image = torch.zeros(2, 3, dtype=torch.bool)
    with torch.no_grad():
        block.gate_alpha.fill_(-0.4)
        got = block(a, bank, bank_mask, is_image)
        for b in range(2):
            want = block_formula(block, a[b], bank[b][bank_mask[b]], is_image[b])
            close(got[b], want, f"PVMBlock of sample {b} (T, D) at d = {d}", atol=1e-5, rtol=1e-5)


def batch_with_and_without_an_image(dtype=torch.float32, a_scale=1.0, bank_scale=1.0):
    torch.manual_seed(9)
    a = (torch.randn(3, 4, 64) * a_scale).to(dtype)
    bank = (torch.randn(3, 5, 64) * bank_scale).to(dtype)
    bank_mask = torch.tensor([[True, True, True, False, False], [False] * 5, [True] * 5])
    is_image = torch.tensor([[False, True, True, False], [False] * 4, [True, False, False, False]])
    return a, bank, bank_mask, is_image


def test_the_block_leaves_its_inputs_unchanged():
    """a is the residual stream and the bank is shared by every PVM layer: both are read, never
    written (not even the bank's padding)."""
    block = randomized(pvm.PVMBlock(tiny_config(), 64), seed=5)
    given = batch_with_and_without_an_image()
    before = [t.clone() for t in given]
    with torch.no_grad():
        block.gate_alpha.fill_(0.7)
        block(*given)
    for name, t, was in zip(["a", "bank", "bank_mask", "is_image"], given, before):
        assert torch.equal(t, was), f"PVMBlock changed its input {name}"


@pytest.mark.parametrize("a_scale, bank_scale", [(1e3, 1.0), (1e-3, 1.0), (1.0, 1e3),
                                                 (1.0, 1e-3)])
def test_the_block_far_from_unit_scale(a_scale, bank_scale):
    """The stream and the bank far from magnitude 1 (the 4B's stream reaches the hundreds):
    against the formula within 1e-4 relative. The expander's output is far below 1 (its
    weights are N(0, 0.02)), so the output norm's ε = config.rms_norm_eps weighs."""
    block = randomized(pvm.PVMBlock(tiny_config(), 64), seed=5)
    a, bank, bank_mask, is_image = batch_with_and_without_an_image(a_scale=a_scale,
                                                                   bank_scale=bank_scale)
    with torch.no_grad():
        block.gate_alpha.fill_(0.7)
        got = block(a, bank, bank_mask, is_image)
        for b in (0, 2):
            want = block_formula(block, a[b], bank[b][bank_mask[b]], is_image[b])
            close(got[b], want, f"PVMBlock of sample {b}, a * {a_scale:g}, bank * {bank_scale:g}",
                  atol=1e-6, rtol=1e-4)
    close(got[1], torch.zeros(4, 64), "PVMBlock of sample 1, which has no image", atol=0.0)


def test_the_block_in_bfloat16():
    """The block in bfloat16, as attach_pvm builds it beside a bfloat16 model: the scores go to
    float32 for the scale, the mask (finfo(float32).min, which bfloat16 cannot hold) and the
    softmax, whose weights come back to bfloat16. The result is bfloat16, within 0.05 of the
    float32 formula of the same weights, and exactly 0 for the sample without an image."""
    block = randomized(pvm.PVMBlock(tiny_config(), 64), seed=5).to(torch.bfloat16)
    a, bank, bank_mask, is_image = batch_with_and_without_an_image(torch.bfloat16)
    with torch.no_grad():
        block.gate_alpha.fill_(0.7)
        got = block(a, bank, bank_mask, is_image)
        assert got.dtype == torch.bfloat16, f"PVMBlock in bfloat16 returns {got.dtype}"
        for b in (0, 2):
            want = block_formula(block, a[b], bank[b][bank_mask[b]], is_image[b])
            close(got[b].float(), want, f"PVMBlock of sample {b} in bfloat16", atol=5e-2,
                  rtol=0.0)
    close(got[1], torch.zeros(4, 64, dtype=torch.bfloat16),
          "PVMBlock of sample 1 (no image) in bfloat16", atol=0.0)
