"""Exercise 1: RMSNorm and SwiGLU (model.RMSNorm.forward, model.MLP.forward), against
transformers' Qwen3VLTextRMSNorm and Qwen3VLTextMLP holding the same random weights."""
import pytest
import torch
from transformers.models.qwen3_vl import modeling_qwen3_vl as reference

from checks import close, copy_weights, hf_config, randomize
from model import MLP, RMSNorm

pytestmark = pytest.mark.ex01


def norms(dim, seed=0):
    """(ours, transformers') RMSNorm over `dim` with the same weight, not all ones."""
    ours = randomize(RMSNorm(dim, eps=1e-6), seed)
    return ours, copy_weights(reference.Qwen3VLTextRMSNorm(dim, eps=1e-6), ours)


def test_rmsnorm_equals_the_reference():
    ours, ref = norms(64)
    torch.manual_seed(1)
    x = torch.randn(2, 5, 64) * 3 + 1  # a mean away from 0: subtracting it would show
    with torch.no_grad():
        close(ours(x), ref(x), "RMSNorm(x) of x (2, 5, 64)", atol=1e-5, rtol=1e-5)


def test_rmsnorm_normalises_each_vector_alone():
    """Scaling one position's vector by c > 0 must not change that position's output, nor any
    other position's: the mean of squares runs over the last axis alone."""
    ours, _ = norms(64)
    torch.manual_seed(2)
    x = torch.randn(3, 4, 64)
    scale = torch.ones(3, 4, 1)
    scale[1, 2] = 50.0
    with torch.no_grad():
        close(ours(x * scale), ours(x), "RMSNorm(x) with x[1, 2] scaled by 50 against RMSNorm(x)",
              atol=1e-5, rtol=1e-5)


def test_rmsnorm_of_a_zero_vector_is_zero():
    """The epsilon inside the square root: a vector of zeros gives zeros, not 0 / 0."""
    ours, _ = norms(64)
    x = torch.zeros(1, 2, 64)
    x[0, 1] = torch.linspace(-1, 1, 64)
    with torch.no_grad():
        got = ours(x)
    close(got[0, 0], torch.zeros(64), "RMSNorm of a vector of zeros", atol=0.0)


def test_rmsnorm_returns_the_input_dtype():
    """In bfloat16 the sum of squares is taken in float32, the normalised x comes back in
    bfloat16 and only then meets the weight. Multiplying by the weight before the cast rounds once
    instead of twice: about a quarter of the values then differ from the reference by one
    bfloat16 step, where a right answer differs in almost none (0 of 12,800 with this seed)."""
    ours, ref = norms(64)
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    torch.manual_seed(3)
    x = (torch.randn(4, 50, 64) * 3).to(torch.bfloat16)
    with torch.no_grad():
        got, want = ours(x), ref(x)
    close(got, want, "RMSNorm(x) in bfloat16", atol=2e-2, rtol=2e-2)
    differ = (got != want).float().mean().item()
    assert differ <= 0.01, (f"RMSNorm(x) in bfloat16: {differ:.1%} of the values differ from the "
                            f"reference by a rounding step (at most 1% may); is the weight "
                            f"multiplied after the cast back to bfloat16?")


def test_swiglu_equals_the_reference():
    config = hf_config().text_config
    ref = randomize(reference.Qwen3VLTextMLP(config), seed=4)
    ours = copy_weights(MLP(config.hidden_size, config.intermediate_size), ref)
    torch.manual_seed(5)
    x = torch.randn(2, 7, config.hidden_size) * 4  # large enough that SiLU is not near-linear
    with torch.no_grad():
        close(ours(x), ref(x), "MLP(x) of x (2, 7, 64)", atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("rms", [1e-5, 1e-3, 1e3, 1e5])
def test_rmsnorm_far_from_unit_scale(rms, dtype):
    """Vectors of root-mean-square 1e-5 and 1e-3 (where ε = 1e-6 under the square root weighs:
    at 1e-3 the output is x / sqrt(2e-6), not x / 1e-3) and 1e3, 1e5, against transformers in
    float32 and bfloat16. Within 1e-5 relative in float32, 2^-6 (two to four bfloat16 steps) in
    bfloat16."""
    ours, ref = norms(64)
    ours, ref = ours.to(dtype), ref.to(dtype)
    torch.manual_seed(6)
    x = torch.randn(3, 4, 64)
    x = (x / x.pow(2).mean(-1, keepdim=True).sqrt() * rms).to(dtype)
    with torch.no_grad():
        want = ref(x)
        got = ours(x)
    rtol = 1e-5 if dtype == torch.float32 else 2 ** -6
    close(got, want, f"RMSNorm(x) of x with root-mean-square {rms:g}, {dtype}", atol=1e-9,
          rtol=rtol)


def test_rmsnorm_over_random_shapes_and_scales():
    """x of 1 to 4 axes, random sizes, each vector of its own scale (10^-4 to 10^4), normalised
    over the last axis alone, whatever the axes before it (q_norm takes (B, T, heads, hd))."""
    generator = torch.Generator().manual_seed(7)
    for case in range(12):
        dim = [8, 32, 64][case % 3]
        ours, ref = norms(dim, seed=case)
        lead = torch.randint(1, 5, (case % 4,), generator=generator).tolist()
        x = torch.randn(*lead, dim, generator=generator)
        x = x * 10 ** (torch.rand(*lead, 1, generator=generator) * 8 - 4)
        with torch.no_grad():
            want = ref(x)
            close(ours(x), want, f"RMSNorm(x) of x {tuple(x.shape)} (case {case})", atol=1e-9,
                  rtol=1e-5)


def test_rmsnorm_and_swiglu_leave_their_input_unchanged():
    """Both read x and return a new tensor: x is the residual stream, which the layer adds back
    (h = a + MLP(RMSNorm(a))), so an in-place operation on it changes the model."""
    config = hf_config().text_config
    ours, _ = norms(64)
    mlp = randomize(MLP(config.hidden_size, config.intermediate_size), seed=8)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(9)
        x = (torch.randn(2, 5, 64) * 3).to(dtype)
        before = x.clone()
        with torch.no_grad():
            ours.to(dtype)(x)
            assert torch.equal(x, before), f"RMSNorm changed its input x ({dtype})"
            mlp.to(dtype)(x)
            assert torch.equal(x, before), f"MLP changed its input x ({dtype})"


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_swiglu_over_any_leading_axes_and_scale(scale):
    """x (N, D), (B, T, D) and (2, 3, 4, D), of magnitude 1e-3, 1 and 1e3 (gate values near
    ±100 there: silu must not overflow), against transformers in float32 and in bfloat16
    (within 1% of the output's largest value: each bfloat16 rounding of a hidden unit moves a
    sum of 128 of them)."""
    config = hf_config().text_config
    ref = randomize(reference.Qwen3VLTextMLP(config), seed=4)
    ours = copy_weights(MLP(config.hidden_size, config.intermediate_size), ref)
    torch.manual_seed(10)
    for shape in [(5, 64), (2, 7, 64), (2, 3, 4, 64)]:
        x = torch.randn(shape) * scale
        with torch.no_grad():
            close(ours(x), ref(x), f"MLP(x) of x {shape} * {scale:g}", atol=1e-9 * scale,
                  rtol=1e-5)
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    x = (torch.randn(2, 7, 64) * scale).to(torch.bfloat16)
    with torch.no_grad():
        want = ref(x)
        close(ours(x), want, f"MLP(x) in bfloat16 of x (2, 7, 64) * {scale:g}",
              atol=1e-2 * want.abs().max().item(), rtol=2 ** -6)
