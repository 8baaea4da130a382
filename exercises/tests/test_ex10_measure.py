"""Exercise 10: the analysis of generate.py --report's numbers (exercises/measure.py:
layer_groups, dilution, decay_exponent), against their definitions written out, on made-up
reports whose answer is known and on a report recorded from the tiny model."""
import json

import numpy as np
import pytest
import torch

import generate
import measure
import report
from checks import close, image_prompt, photo
from model import Qwen3VL, tiny_config

pytestmark = pytest.mark.ex10


def test_layer_groups_of_4_and_of_36_layers():
    """4 layers split as [0, 1], [2], [3]; 36 as 0-11, 12-23, 24-35 (torch.tensor_split)."""
    torch.manual_seed(0)
    share = torch.rand(5, 4, dtype=torch.float64)
    want = torch.stack([share[:, :2].mean(1), share[:, 2], share[:, 3]], dim=1)
    close(measure.layer_groups(share.tolist()), want, "layer_groups of 4 layers (N, 3)",
          atol=1e-12)
    share = torch.rand(7, 36, dtype=torch.float64)
    want = torch.stack([share[:, 12 * g:12 * (g + 1)].mean(1) for g in range(3)], dim=1)
    close(measure.layer_groups(share.tolist()), want, "layer_groups of 36 layers (N, 3)",
          atol=1e-12)


def test_dilution_scales_the_first_share_by_the_keys():
    """The k-th generated token's query attends to prompt + k - 1 keys."""
    got = measure.dilution(0.3, 100, 4)
    want = torch.tensor([0.3, 0.3 * 100 / 101, 0.3 * 100 / 102, 0.3 * 100 / 103],
                        dtype=torch.float64)
    close(torch.as_tensor(got, dtype=torch.float64), want, "dilution(0.3, 100 prompt tokens, 4)",
          atol=1e-12)


@pytest.mark.parametrize("exponent", [-1.0, -0.4, 0.0, -2.5])
def test_the_exponent_of_an_exact_power_law(exponent):
    keys = 80 + torch.arange(50, dtype=torch.float64)
    share = 0.3 * (keys / 80) ** exponent
    got = measure.decay_exponent(share.tolist(), 80)
    assert abs(got - exponent) < 1e-9, f"decay_exponent of 0.3 (keys/80)^{exponent} is {got}"


@pytest.mark.parametrize("share", [[], [0.3], [0.3, 0.0], [0.3, -0.1], [0.0, 0.2, 0.1]],
                         ids=["none", "one", "a zero", "a negative", "a zero first"])
def test_decay_exponent_refuses_too_few_or_non_positive_shares(share):
    """The fit needs two or more shares, each above 0 (its logarithm): ValueError otherwise."""
    with pytest.raises(ValueError):
        measure.decay_exponent(share, 80)


def test_decay_exponent_at_its_limits():
    """Exactly two shares (the slope through two points) and shares as small as 1e-300 are
    accepted; shares 1e-60 or 1e60 times a power law give its exponent, not float32's
    underflow or overflow."""
    got = measure.decay_exponent([0.3, 0.2], 80)
    want = np.log(0.2 / 0.3) / np.log(81 / 80)
    assert abs(got - want) < 1e-9, f"decay_exponent of two shares is {got}, expected {want}"
    got = measure.decay_exponent([1e-300, 1e-301], 80)
    want = np.log(0.1) / np.log(81 / 80)
    assert abs(got - want) < 1e-6, f"decay_exponent of 1e-300, 1e-301 is {got}, expected {want}"
    keys = 80 + torch.arange(50, dtype=torch.float64)
    for scale in (1e-60, 1e60):
        got = measure.decay_exponent((scale * (keys / 80) ** -0.7).tolist(), 80)
        assert abs(got + 0.7) < 1e-9, f"decay_exponent of {scale:g} (keys/80)^-0.7 is {got}"


def test_the_measures_leave_their_tensors_unchanged():
    """summary() hands over tensors, not lists: layer_groups, dilution and decay_exponent read
    them (float64 here, which torch.as_tensor passes through uncopied) and never write them."""
    torch.manual_seed(1)
    share = torch.rand(6, 5, dtype=torch.float64) + 0.1
    column = share[:, 0].clone()
    first = torch.tensor(0.3, dtype=torch.float64)
    given = {"image_share": share, "a group's shares": column, "first share": first}
    before = {name: t.clone() for name, t in given.items()}
    measure.layer_groups(share)
    measure.dilution(first, 100, 4)
    measure.decay_exponent(column, 100)
    for name, t in given.items():
        close(t, before[name], f"{name} after layer_groups, dilution and decay_exponent",
              atol=0.0)


def test_layer_groups_of_any_depth():
    """3 to 40 layers in 2 to 5 groups, seeded: group i holds L // groups layers, one more if
    i < L % groups, consecutive, in order."""
    generator = torch.Generator().manual_seed(2)
    for case in range(12):
        L = int(torch.randint(3, 41, (1,), generator=generator))
        groups = int(torch.randint(2, min(5, L) + 1, (1,), generator=generator))
        share = torch.rand(4, L, dtype=torch.float64, generator=generator)
        sizes = [L // groups + (i < L % groups) for i in range(groups)]
        starts = np.cumsum([0] + sizes)
        want = torch.stack([share[:, starts[i]:starts[i + 1]].mean(1) for i in range(groups)],
                           dim=1)
        close(measure.layer_groups(share.tolist(), groups), want,
              f"layer_groups of {L} layers in {groups} groups", atol=1e-12)


def test_a_report_of_the_tiny_model():
    """A report recorded while a tiny random model answers: each group's exponent equals the
    least-squares slope of log share against log keys (numpy's polyfit)."""
    import fixtures
    torch.manual_seed(0)
    model = Qwen3VL(tiny_config()).eval()
    image = photo("chelsea").resize((128, 96))
    inputs = fixtures.reference_image_processor()(images=[image], return_tensors="pt")
    ids, grid = image_prompt([9707, 11, 1879, 151645, 198, 151644, 77091, 198],
                             inputs["image_grid_thw"][0, 1:].tolist())
    with report.AttentionReport(model, ids) as watcher:
        tokens = list(generate.generate(model, ids, inputs["pixel_values"], grid,
                                        max_new_tokens=24, stop_tokens=()))
    numbers = json.loads(json.dumps(watcher.summary(tokens)))  # as report.json holds them
    share = np.array(numbers["image_share"])                               # (24, 4)
    groups = measure.layer_groups(numbers["image_share"])
    keys = ids.size(1) + np.arange(24)
    for g, layers in enumerate(([0, 1], [2], [3])):
        column = share[:, layers].mean(1)
        close(torch.as_tensor(groups)[:, g], torch.from_numpy(column), f"group {g}", atol=1e-12)
        want = np.polyfit(np.log(keys), np.log(column), 1)[0]
        got = measure.decay_exponent(column.tolist(), ids.size(1))
        assert abs(got - want) < 1e-6, f"group {g}: exponent {got:.6f}, polyfit gives {want:.6f}"


def test_the_command_prints_each_group(tmp_path, capsys):
    """A made-up report of pure dilution: every group's exponent is -1.00."""
    keys = 50 + np.arange(10)
    shares = (20 / keys)[:, None] * np.array([[1.0, 0.5, 0.8, 0.2]])
    numbers = {"prompt_tokens": 50, "image_tokens": 20, "tokens": list(range(10)),
               "image_share": shares.tolist(), "pvm_layers": [], "pvm_ratio": []}
    (tmp_path / "report.json").write_text(json.dumps(numbers))
    assert measure.main([str(tmp_path / "report.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split()[:1] in (["early"], ["middle"], ["late"])]
    assert [row[-1] for row in rows] == ["-1.00"] * 3, "\n".join(lines)
