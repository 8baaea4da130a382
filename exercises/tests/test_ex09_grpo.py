"""Exercise 9: GRPO's group advantages and policy objective (grpo.group_advantages,
grpo.PolicyObjective.forward and weighted_logp): the advantages against (r - group mean) /
(group std + 1e-4) written out, the std with Bessel's correction, exactly 0 in an all-equal
group; the objective against sum A_row * log p(token) over the completion tokens, each row
scored alone and unpadded."""
import pytest
import torch

import grpo
from checks import close, equal, image_prompt

pytestmark = pytest.mark.ex09

IM_END = 151645


def advantages_formula(rewards, G):
    """Group by group, in float64: (r - mean) / (std + 1e-4), std = sqrt(sum (r - mean)^2 /
    (G - 1)); 0 where every reward of the group is the same."""
    out = []
    for start in range(0, len(rewards), G):
        group = [float(r) for r in rewards[start:start + G]]
        mean = sum(group) / G
        std = (sum((r - mean) ** 2 for r in group) / (G - 1)) ** 0.5
        same = all(r == group[0] for r in group)
        out += [0.0 if same else (r - mean) / (std + 1e-4) for r in group]
    return torch.tensor(out, dtype=torch.float64)


# 3 prompts of 4 completions: a spread group, an all-equal one, a group with a small std
REWARDS = torch.tensor([1.0, 0.0, 0.9, 0.1,  0.1, 0.1, 0.1, 0.1,  1.0, 0.9, 1.0, 1.0])


def test_the_advantages_are_the_formula_written_out():
    got, same = grpo.group_advantages(REWARDS.clone(), 4)
    want = advantages_formula(REWARDS, 4).float()
    close(got, want, "advantages of 3 groups of 4 (the 3rd with std 0.05)", atol=1e-5, rtol=1e-5)
    equal(same, torch.tensor([False, True, False]), "which groups are all equal")


def test_an_all_equal_group_has_advantages_exactly_0():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.3, 0.7, 0.0])
    got, same = grpo.group_advantages(rewards, 3)
    assert got.shape == (9,), f"advantages of shape {tuple(got.shape)}, expected (9,)"
    assert (got[:6] == 0).all(), f"the all-equal groups' advantages {got[:6].tolist()}, expected 0"
    equal(same, torch.tensor([True, True, False]), "which groups are all equal")
    close(got, advantages_formula(rewards, 3).float(), "advantages of 3 groups of 3", atol=1e-5,
          rtol=1e-5)


def test_the_groups_are_consecutive_rewards():
    """Two prompts of 2: [0, 1] and [5, 5]. Groups taken across prompts ([0, 5], [1, 5]) give
    no all-equal group."""
    got, same = grpo.group_advantages(torch.tensor([0.0, 1.0, 5.0, 5.0]), 2)
    want = advantages_formula(torch.tensor([0.0, 1.0, 5.0, 5.0]), 2).float()
    close(got, want, "advantages of the groups [0, 1] and [5, 5]", atol=1e-5, rtol=1e-5)
    equal(same, torch.tensor([False, True]), "which groups are all equal")


@pytest.mark.parametrize("reward, G", [(0.9, 8), (0.1, 8), (0.6, 16)])
def test_a_lone_all_equal_group_as_main_passes_it(reward, G):
    """grpo.main passes one prompt's G rewards at a time (P = 1). G equal float32 rewards whose
    mean is inexact (eight 0.9s: float32 mean 0.9 + 6e-8, std 6.4e-8, not 0) still make an
    all-equal group: advantages exactly 0, whatever the std comes out as."""
    rewards = torch.tensor([reward] * G)
    assert rewards.std() != 0  # the case this test is for: a std that rounding keeps above 0
    got, same = grpo.group_advantages(rewards, G)
    assert (got == 0).all(), f"advantages of {G} rewards of {reward}: {got.tolist()}, expected 0"
    equal(same, torch.tensor([True]), f"whether {G} rewards of {reward} are all equal")


def test_a_nearly_equal_group_is_not_all_equal():
    """All equal means exactly equal: three 0.5s and a 0.500004 (within torch.isclose's default
    tolerance) are a group with a spread; their advantages follow the formula, not 0."""
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.500004])
    got, same = grpo.group_advantages(rewards, 4)
    equal(same, torch.tensor([False]), "whether 0.5, 0.5, 0.5, 0.500004 are all equal")
    close(got, advantages_formula(rewards, 4).float(), "advantages of 0.5, 0.5, 0.5, 0.500004",
          atol=1e-3)  # float32's mean is off by up to 3e-8 of a spread of 4e-6


def test_the_advantages_leave_the_rewards_unchanged():
    rewards = REWARDS.clone()
    grpo.group_advantages(rewards, 4)
    equal(rewards, REWARDS, "the rewards after group_advantages")


def test_the_advantages_over_random_batches():
    """Random batches, seeded: 1 to 4 prompts of 2 to 8 completions, rewards drawn from
    {0, 0.5, 1} (so some groups are all equal) or uniform, scaled by 10^-3 to 10^3; against the
    formula in float64 within 1e-4 (+ 1e-4 relative)."""
    generator = torch.Generator().manual_seed(14)
    for case in range(16):
        P, G = int(torch.randint(1, 5, (1,), generator=generator)), int(
            torch.randint(2, 9, (1,), generator=generator))
        if case % 2:
            rewards = torch.randint(0, 3, (P * G,), generator=generator).float() / 2
        else:
            rewards = torch.rand(P * G, generator=generator)
        rewards = rewards * 10 ** float(torch.randint(-3, 4, (1,), generator=generator))
        got, same = grpo.group_advantages(rewards, G)
        want = advantages_formula(rewards, G).float()
        close(got, want, f"advantages of {P} groups of {G} (case {case})", atol=1e-4, rtol=1e-4)
        grouped = rewards.view(P, G)
        equal(same, (grouped == grouped[:, :1]).all(dim=1),
              f"which groups are all equal (case {case})")


COMPLETIONS = [[72, 13, IM_END], [73, IM_END], [74, 75, 76, 77], [78, 79, 80, IM_END]]
ADVANTAGES = torch.tensor([0.7, -1.3, 0.5, 0.9])  # made up: the 3rd row is truncated


def batch():
    """One prompt with an image and its 4 completions, right-padded by grpo.group_batch; the
    third ends without a stop token (truncated) and is out of the loss mask."""
    ids, grid = image_prompt([3838, 30, IM_END, 198, 151644, 77091, 198], (8, 8))
    torch.manual_seed(1)
    prompt = (ids, torch.randn(64, 1536), grid)
    return prompt, grpo.group_batch(prompt, COMPLETIONS, {IM_END}, 151655, ADVANTAGES.clone())


def objective_formula(model, prompt):
    """Each completion that ends with a stop token, alone and unpadded after its prompt: position
    T - 1 + j predicts completion token j; sum of A_row * log p(token) over those tokens."""
    ids, pixel_values, grid = prompt
    T, total, count = ids.size(1), 0.0, 0
    for completion, advantage in zip(COMPLETIONS, ADVANTAGES.tolist()):
        if completion[-1] != IM_END:
            continue  # truncated: out of the loss
        n = len(completion)
        logits = model(torch.cat([ids, torch.tensor([completion])], dim=1), pixel_values, grid)
        logp = logits[0, T - 1:T - 1 + n].float().log_softmax(dim=-1)        # (n, V)
        total = total + advantage * logp[torch.arange(n), completion].sum()
        count += n
    return total, count


def test_the_objective_is_the_formula_written_out(pvm_model):
    prompt, tensors = batch()
    with torch.no_grad():
        got = grpo.PolicyObjective(pvm_model)(*tensors)
        want, count = objective_formula(pvm_model, prompt)
    assert count == 3 + 2 + 4
    assert got.dim() == 0, f"the objective has shape {tuple(got.shape)}, expected a scalar"
    close(got.float(), want, "sum of A * log p over the 9 completion tokens of 3 rows", atol=1e-4,
          rtol=1e-5)


def test_the_objective_follows_the_advantages_row_by_row(pvm_model):
    """Only row 2's advantage nonzero: the sum over its 2 tokens; only the truncated row's: 0."""
    prompt, (*tensors, _) = batch()
    ids, pixel_values, grid = prompt
    with torch.no_grad():
        objective = grpo.PolicyObjective(pvm_model)
        second = objective(*tensors, torch.tensor([0.0, 2.0, 0.0, 0.0]))
        truncated = objective(*tensors, torch.tensor([0.0, 0.0, 2.0, 0.0]))
        T = ids.size(1)
        logits = pvm_model(torch.cat([ids, torch.tensor([COMPLETIONS[1]])], dim=1),
                           pixel_values, grid)
        logp = logits[0, T - 1:T + 1].float().log_softmax(dim=-1)
        want = 2.0 * logp[torch.arange(2), COMPLETIONS[1]].sum()
    close(second.float(), want, "row 2 alone (advantage 2, tokens 73 and <|im_end|>)", atol=1e-4,
          rtol=1e-5)
    assert truncated.item() == 0, (
        f"only the truncated row's advantage nonzero gives {truncated.item():.6g}, expected 0: "
        "its tokens are out of the loss mask")


def test_the_gradient_reaches_pvm(pvm_model):
    _, tensors = batch()
    grpo.PolicyObjective(pvm_model)(*tensors).backward()
    block = pvm_model.layers[1].pvm_block
    grads = {name: p.grad for name, p in block.named_parameters()}
    pvm_model.zero_grad(set_to_none=True)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().max() > 0, f"layer 1 PVM {name}: no gradient"


def test_the_objective_of_a_bfloat16_model_is_float32(pvm_model_bf16):
    """The model runs in bfloat16; log p is taken in float32: the objective is float32 and
    equals the sum, over the tokens loss_mask marks, of A_row * log_softmax of the bfloat16
    model's logits cast to float32 (the padded batch's own hidden states: in bfloat16 a row
    scored alone rounds differently). The batch's tensors, the advantages among them, are left
    unchanged."""
    _, tensors = batch()
    before = [t.clone() for t in tensors]
    input_ids, attention_mask, pixel_values, grid, loss_mask, advantages = tensors
    with torch.no_grad():
        got = grpo.PolicyObjective(pvm_model_bf16)(*tensors)
        hidden = pvm_model_bf16.hidden_states(input_ids, pixel_values, grid,
                                              attention_mask=attention_mask)
        want = 0.0
        for row, t in torch.nonzero(loss_mask).tolist():  # token t, predicted by position t - 1
            logp = pvm_model_bf16.lm_head(hidden[row, t - 1]).float().log_softmax(dim=-1)
            want = want + advantages[row] * logp[input_ids[row, t]]
    assert got.dtype == torch.float32, f"the objective of a bfloat16 model has dtype {got.dtype}"
    close(got, want, "sum of A * log p of the bfloat16 model", atol=1e-3, rtol=1e-5)
    names = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "loss_mask",
             "advantages"]
    for name, t, was in zip(names, tensors, before):
        assert torch.equal(t, was), f"PolicyObjective changed its input {name}"


def test_log_p_is_taken_at_the_sampling_temperature(pvm_model):
    """PolicyObjective(model, temperature=0.7): log p from logits / 0.7, the distribution the
    completions were sampled from, against the sum written out over the batch's own logits."""
    _, tensors = batch()
    input_ids, attention_mask, pixel_values, grid, loss_mask, advantages = tensors
    with torch.no_grad():
        got = grpo.PolicyObjective(pvm_model, temperature=0.7)(*tensors)
        hidden = pvm_model.hidden_states(input_ids, pixel_values, grid,
                                         attention_mask=attention_mask)
        want = 0.0
        for row, t in torch.nonzero(loss_mask).tolist():  # token t, predicted by position t - 1
            logp = (pvm_model.lm_head(hidden[row, t - 1]).float() / 0.7).log_softmax(dim=-1)
            want = want + advantages[row] * logp[input_ids[row, t]]
    close(got, want, "sum of A * log p at temperature 0.7", atol=1e-4, rtol=1e-5)


def test_chunks_of_positions_give_the_same_objective_and_gradient(pvm_model):
    """chunk=2: the head and log-softmax run 2 positions at a time (9 positions: 5 chunks); the
    objective and PVM's gradient equal those of one chunk."""
    _, tensors = batch()
    results = []
    for chunk in (4096, 2):
        objective = grpo.PolicyObjective(pvm_model, chunk=chunk)(*tensors)
        objective.backward()
        grad = pvm_model.layers[1].pvm_block.text_reducer.weight.grad.clone()
        pvm_model.zero_grad(set_to_none=True)
        results.append((objective.detach(), grad))
    (whole, whole_grad), (chunked, chunked_grad) = results
    close(chunked, whole, "the objective in chunks of 2 positions", atol=1e-5, rtol=1e-5)
    scale = whole_grad.abs().max().item()  # float32 sums in another order: rounding apart
    close(chunked_grad, whole_grad, "PVM's gradient in chunks of 2 positions", atol=1e-4 * scale,
          rtol=1e-4)
