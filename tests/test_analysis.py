"""eval.py --analysis: the pooling of answers by position on hand-made records, the tiny model end
to end (the files, the same replies as without it, nothing hooked without it), the base and the
PVM model side by side, the figure's plain position ticks, and the options it refuses."""
import json
import sys

import pytest
import torch

import eval as ev
import report
from test_eval import write_pvm
from test_report import plain_ticks

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

GROUPS = ["early: layer 0", "middle: layer 1", "late: layer 2"]


def test_buckets_of_hand_made_records():
    """Two answers: 3 tokens after a prompt of 10 with an image, 2 after a prompt of 6 without.
    Positions 1 and 2-3 are the buckets; the answer without an image counts for the convergence
    layer alone, and a token without a convergence layer for the shares alone."""
    with_image = {"prompt_tokens": 10, "image_tokens": 4, "first_share": 0.5,
                  "image_share": [[0.6, 0.5, 0.4], [0.4, 0.3, 0.2], [0.2, 0.1, 0.0]],
                  "convergence_layer": [2, None, 0]}
    text_only = {"prompt_tokens": 6, "image_tokens": 0, "first_share": 0.0,
                 "image_share": [[0.0] * 3] * 2, "convergence_layer": [1, 1]}
    first, second = report.analysis_buckets([with_image, text_only], GROUPS)
    assert first["positions"] == [1, 1]
    assert first["tokens"] == 2
    assert first["mean_position"] == 1
    assert first["image_share"] == pytest.approx(dict(zip(GROUPS, [0.6, 0.5, 0.4])))
    assert first["dilution"] == pytest.approx(0.5)  # the first token: no thinning yet
    assert first["tokens_with_image"] == 1
    assert first["convergence_layer"] == pytest.approx(1.5)
    assert first["converged"] == 2
    assert second["positions"] == [2, 3]
    assert second["tokens"] == 3
    assert second["mean_position"] == pytest.approx(7 / 3)
    assert second["image_share"] == pytest.approx(dict(zip(GROUPS, [0.3, 0.2, 0.1])))
    assert second["dilution"] == pytest.approx((0.5 * 10 / 11 + 0.5 * 10 / 12) / 2)
    assert second["tokens_with_image"] == 2
    assert second["convergence_layer"] == pytest.approx(0.5)  # 0 and 1; None left out
    assert second["converged"] == 2


def test_a_bucket_without_such_tokens_is_null():
    text_only = {"prompt_tokens": 6, "image_tokens": 0, "first_share": 0.0,
                 "image_share": [[0.0] * 3], "convergence_layer": [None]}
    (bucket,) = report.analysis_buckets([text_only], GROUPS)
    assert bucket["image_share"] == dict.fromkeys(GROUPS)
    assert bucket["dilution"] is None
    assert bucket["convergence_layer"] is None
    assert bucket["converged"] == 0
    json.dumps(bucket, allow_nan=False)  # null, not NaN: every JSON reader takes it


def run(out, *args):
    assert ev.cli(["--size", "tiny", "--limit", "4", "--max-new-tokens", "6", "--out", str(out),
                   *args]) == 0
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_tiny_end_to_end(tmp_path, capsys, hook_counts):
    plain = run(tmp_path / "plain")
    assert hook_counts == {"hooks": 0, "lens": 0}  # without --analysis nothing is hooked
    assert not (tmp_path / "plain" / "analysis.json").exists()
    analysed = run(tmp_path / "analysed", "--analysis")
    # one report per reply: the attention and the output of each of the 4 layers, one lens
    assert hook_counts == {"hooks": 4 * 8, "lens": 4}
    assert analysed == plain  # greedy: the replies one at a time are those of the batches
    assert "analysis.json and" in capsys.readouterr().err

    out = tmp_path / "analysed"
    analysis = json.loads((out / "analysis.json").read_text())
    assert (out / "analysis.png").read_bytes().startswith(b"\x89PNG")
    assert analysis["layers"] == 4
    assert analysis["pvm_layers"] == []
    assert analysis["groups"] == {"early: layers 0-1": [0, 1], "middle: layer 2": [2],
                                  "late: layer 3": [3]}
    assert list(analysis["models"]) == ["base"]
    base, answers = analysis["models"]["base"], analysis["answers"]
    assert [a["id"] for a in answers] == [p["id"] for p in plain]
    assert base["answers"] == 4
    assert base["with_image"] == 4  # every built-in question shows a shape
    for answer, prediction in zip(answers, plain):
        N = len(answer["convergence_layer"])
        assert N - prediction["tokens"] in (0, 1)  # the stop token has no text but a query
        assert torch.tensor(answer["image_share"]).shape == (N, 3)
        assert all(layer is None or 0 <= layer < 4 for layer in answer["convergence_layer"])
    buckets = base["buckets"]
    assert sum(b["tokens"] for b in buckets) == sum(len(a["convergence_layer"]) for a in answers)
    assert [b["positions"][0] for b in buckets] == [1, 2, 4][:len(buckets)]
    # the first bucket by hand: each answer's first token
    first_share = [a["image_share"][0] for a in answers]                   # 4 x (3,)
    want = torch.tensor(first_share).mean(0).tolist()
    assert list(buckets[0]["image_share"].values()) == pytest.approx(want)
    assert buckets[0]["dilution"] == pytest.approx(sum(a["first_share"] for a in answers) / 4)
    figure = report.analysis_figure(analysis)
    assert len(figure.axes) == 2  # one model: the shares above the convergence layer
    assert [text.get_text() for text in figure.axes[1].texts] == [str(b["tokens"]) for b in buckets]


def test_base_and_pvm_side_by_side(tmp_path):
    """Gates of 0: the PVM model is the base model, its analyses too; PVM's column marks its
    layers, the base's does not."""
    file = write_pvm(tmp_path / "zero.safetensors", 0.0)
    run(tmp_path, "--analysis", "--pvm", str(file), "--compare")
    analysis = json.loads((tmp_path / "analysis.json").read_text())
    assert list(analysis["models"]) == ["base", "pvm"]
    assert analysis["pvm_layers"] == [1, 3]
    base, with_pvm = analysis["models"].values()
    assert base == with_pvm
    answers = {name: [{k: v for k, v in a.items() if k != "model"}
                      for a in analysis["answers"] if a["model"] == name]
               for name in ("base", "pvm")}
    assert answers["base"] == answers["pvm"]
    figure = report.analysis_figure(analysis)
    share_base, share_pvm, lens_base, lens_pvm = figure.axes  # row by row
    assert share_pvm.get_title() == "pvm: 4 answers, 4 with an image"
    marks = [[line.get_label() for line in axes.get_lines() if line.get_label().startswith("PVM")]
             for axes in (lens_base, lens_pvm)]
    assert marks == [[], ["PVM at layer 1", "PVM at layer 3"]]


def two_models(base_share, pvm_share):
    """eval.py --analysis's numbers of a base and a PVM model: two buckets, positions 1 and 2-3."""
    def result(share):
        bucket = {"mean_position": 1.0, "tokens": 1, "image_share": dict.fromkeys(GROUPS, share),
                  "dilution": share, "convergence_layer": 2.0}
        buckets = [bucket, {**bucket, "mean_position": 2.5}]
        return {"answers": 1, "with_image": 1, "buckets": buckets}
    return {"layers": 3, "pvm_layers": [1], "groups": dict(zip(GROUPS, [[0], [1], [2]])),
            "models": {"base": result(base_share), "pvm": result(pvm_share)}}


def test_figure_fits_both_models_shares():
    """The PVM model's shares are ten times the base's: the row's y range holds both columns."""
    share_base, share_pvm, _, _ = report.analysis_figure(two_models(0.05, 0.5)).axes
    for axes in (share_base, share_pvm):
        bottom, top = axes.get_ylim()
        assert bottom == 0
        for line in share_base.get_lines() + share_pvm.get_lines():
            assert max(line.get_ydata()) <= top


def test_figure_positions_read_as_plain_numbers():
    """Mean positions 1 and 2.5 on a log scale: ticked 1 and 2, not 10^0 and 2x10^0."""
    *shares, lens_base, lens_pvm = report.analysis_figure(two_models(0.05, 0.5)).axes
    assert [axes.get_xscale() for axes in shares] == ["log", "log"]
    for axes in (lens_base, lens_pvm):  # the bottom row: the labelled axes
        assert [label for label in plain_ticks(axes) if label] == ["1", "2"]


REFUSED = {
    "batch size": (["--batch-size", "2"], "--analysis generates one prompt at a time"),
    "no matplotlib": ([], "--analysis needs matplotlib (pip install matplotlib)"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_before_any_work(case, tmp_path, capsys, monkeypatch):
    def no_loading(*args):
        raise AssertionError("the samples were read before the options were checked")
    monkeypatch.setattr(ev, "load_samples", no_loading)
    if case == "no matplotlib":
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    args, message = REFUSED[case]
    assert ev.cli(["--size", "tiny", "--analysis", "--out", str(tmp_path), *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: {message}" + (": leave out --batch-size\n" if args else "\n")
