"""Exercise 8: the SFT loss on the assistant's tokens and the schedule (train.AssistantLoss.forward,
train.get_lr): the loss against cross-entropy written out over the full logits, and the learning
rate against the schedule's definition at every step."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import train
from checks import close, image_prompt

pytestmark = pytest.mark.ex08


def sample():
    """A prompt with an image, then a reply of 3 tokens and <|im_end|>; a second user turn and a
    second reply of 2 tokens and <|im_end|>. The loss mask marks the replies' tokens."""
    reply_1, reply_2 = [32, 9707, 13, 151645], [40, 13, 151645]
    turn = [198, 151644, 872, 198, 3838, 30, 151645, 198, 151644, 77091, 198]
    ids, grid = image_prompt([3838, 30, 151645, 198, 151644, 77091, 198, *reply_1, *turn,
                              *reply_2, 198], (8, 8))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    start_1 = ids.size(1) - 1 - len(reply_2) - len(turn) - len(reply_1)
    mask[0, start_1:start_1 + len(reply_1)] = True
    mask[0, -1 - len(reply_2):-1] = True
    torch.manual_seed(1)
    return ids, torch.randn(64, 1536), grid, mask


def loss_formula(model, ids, pixel_values, grid, mask):
    """Logits at every position; position t predicts token t + 1; summed over the tokens the
    mask marks (each reply's tokens and its <|im_end|>)."""
    logits = model(ids, pixel_values, grid)[0]                               # (T, V)
    terms = [F.cross_entropy(logits[t - 1], ids[0, t]) for t in range(1, ids.size(1))
             if mask[0, t]]
    return torch.stack(terms).sum(), len(terms)


def test_the_loss_is_summed_cross_entropy_over_the_replies(pvm_model):
    ids, pixel_values, grid, mask = sample()
    with torch.no_grad():
        got = train.AssistantLoss(pvm_model)(ids, pixel_values, grid, mask)
        want, count = loss_formula(pvm_model, ids, pixel_values, grid, mask)
    assert count == 7
    assert got.dim() == 0, f"the loss has shape {tuple(got.shape)}, expected a scalar"
    close(got.float(), want, "summed loss over the 7 reply tokens", atol=1e-4, rtol=1e-5)


def test_the_loss_follows_the_mask(pvm_model):
    """With the mask moved one token later, other tokens are the targets: the loss follows the
    formula for that mask too, and differs (a loss that read the mask at the predicting
    position, or not at all, would not)."""
    ids, pixel_values, grid, mask = sample()
    shifted = torch.roll(mask, 1, dims=1)
    with torch.no_grad():
        loss = train.AssistantLoss(pvm_model)
        got, other = loss(ids, pixel_values, grid, mask), loss(ids, pixel_values, grid, shifted)
        want_other, _ = loss_formula(pvm_model, ids, pixel_values, grid, shifted)
    close(other.float(), want_other, "summed loss with the mask one token later", atol=1e-4,
          rtol=1e-5)
    assert abs(got.item() - other.item()) > 1e-3, "the loss does not depend on the mask"


def test_the_loss_at_the_ends_of_the_sample(pvm_model):
    """The mask on the first token (which no position predicts: it is ignored) and on the last
    (predicted by position T - 2); then an empty mask, whose loss is exactly 0 (a sum over no
    tokens, not a mean)."""
    ids, pixel_values, grid, _ = sample()
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 0] = mask[0, -1] = mask[0, 5] = True
    with torch.no_grad():
        loss = train.AssistantLoss(pvm_model)
        got = loss(ids, pixel_values, grid, mask)
        want, count = loss_formula(pvm_model, ids, pixel_values, grid, mask)
        empty = loss(ids, pixel_values, grid, torch.zeros_like(mask))
    assert count == 2
    close(got.float(), want, "summed loss over the last token and token 5 (the first token "
          "marked too, which nothing predicts)", atol=1e-4, rtol=1e-5)
    assert empty.dim() == 0 and empty.item() == 0.0, (
        f"the loss of a sample without marked tokens is {empty}, expected 0")


def test_the_loss_leaves_its_inputs_unchanged(pvm_model):
    """input_ids, pixel_values and the loss mask are read, never written (no -100 labels made
    in place: the caller still holds the sample)."""
    given = sample()
    before = [t.clone() for t in given]
    with torch.no_grad():
        train.AssistantLoss(pvm_model)(*given)
    for name, t, was in zip(["input_ids", "pixel_values", "image_grid_thw", "loss_mask"],
                            given, before):
        assert torch.equal(t, was), f"AssistantLoss changed its input {name}"


def test_the_loss_of_a_bfloat16_model_is_float32(pvm_model_bf16):
    """The model runs in bfloat16; the cross-entropy is taken in float32 (a bfloat16 sum of 7
    terms near 12 rounds by 0.25): the loss is float32 and equals the formula over the
    bfloat16 model's logits cast to float32, term by term."""
    ids, pixel_values, grid, mask = sample()
    with torch.no_grad():
        got = train.AssistantLoss(pvm_model_bf16)(ids, pixel_values, grid, mask)
        hidden = pvm_model_bf16.hidden_states(ids, pixel_values, grid)[0]
        want = sum(F.cross_entropy(pvm_model_bf16.lm_head(hidden[t - 1]).float(), ids[0, t])
                   for t in range(1, ids.size(1)) if mask[0, t])
    assert got.dtype == torch.float32, f"the loss of a bfloat16 model has dtype {got.dtype}"
    close(got, want, "summed loss of the bfloat16 model", atol=1e-3, rtol=1e-5)


def test_the_gradient_reaches_pvm(pvm_model):
    ids, pixel_values, grid, mask = sample()
    train.AssistantLoss(pvm_model)(ids, pixel_values, grid, mask).backward()
    block = pvm_model.layers[1].pvm_block
    grads = {name: p.grad for name, p in block.named_parameters()}
    pvm_model.zero_grad(set_to_none=True)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().max() > 0, f"layer 1 PVM {name}: no gradient"


def schedule(step, total, lr, warmup):
    """The definition: linear warmup over w = max(1, round(warmup * total)) steps, from lr / w
    at step 0 to lr at step w - 1; then half a cosine from lr at step w down towards 0."""
    w = max(1, round(warmup * total))
    if step < w:
        return lr * (step + 1) / w
    return lr / 2 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


@pytest.mark.parametrize("total, warmup", [(100, 0.1), (7, 0.1), (10, 0.5), (40, 0.0), (1, 0.1),
                                           (10, 0.25), (14, 0.25), (9, 0.3), (6, 1.0)])
def test_the_schedule_at_every_step(total, warmup):
    """Among them warmup * total = 2.5 and 3.5 (Python's round takes a half to the even number:
    2 and 4 warmup steps), 2.7 (3 steps, not 2) and a run that is all warmup."""
    args = SimpleNamespace(lr=3e-4, warmup=warmup)
    for step in range(total):
        got, want = train.get_lr(step, total, args), schedule(step, total, 3e-4, warmup)
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-15), (
            f"get_lr(step {step} of {total}, warmup {warmup}) = {got:.6g}, expected {want:.6g}")


def test_the_schedule_peaks_at_the_end_of_warmup_and_halves_midway():
    """111 steps, 11 of warmup: the rate reaches lr at steps 10 and 11, half of it at step 61,
    midway through the 100 steps of decay."""
    args = SimpleNamespace(lr=1e-3, warmup=0.1)
    rates = [train.get_lr(step, 111, args) for step in range(111)]
    assert math.isclose(rates[10], 1e-3) and math.isclose(rates[11], 1e-3), (
        f"steps 10 and 11: {rates[10]:.6g}, {rates[11]:.6g}, expected the peak lr 1e-3")
    assert max(rates) <= 1e-3 * (1 + 1e-12), f"the rate reaches {max(rates):.6g}, over the lr"
    assert math.isclose(rates[61], 5e-4), f"midway through the decay {rates[61]:.6g}, expected half"
    assert 0 < rates[-1] < 1e-5, f"the last step's rate is {rates[-1]:.3g}"
