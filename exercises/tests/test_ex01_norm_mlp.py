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
