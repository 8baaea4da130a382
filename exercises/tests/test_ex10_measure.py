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
