"""report.py, behind generate.py --report: the recorded attention shares equal transformers'
attention weights and the logit lens its hidden states, recording changes no token and without
--report nothing is hooked, the PVM ratio is non-zero exactly where PVM writes, a report that
cannot be written is refused before the model loads and a report writes over no file, the
convergence layer and the position buckets on hand-made numbers, and the figure shows every PVM
layer, says when the prompt holds no image and reads its positions in plain numbers."""
import json
import os
import sys
from functools import partial
from math import nan
from pathlib import Path

import pytest
import torch

import fixtures as fx
import processor
import generate
import load_qwen
import pvm
import report

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

CAT = Path(__file__).resolve().parent.parent / "cat.jpg"
IMAGE = 151655
N = 24  # generated tokens


def encode(checkpoint, image=True):
    content = [{"type": "image", "image": CAT}] * image
    content.append({"type": "text", "text": "Describe this image."})
    messages = [{"role": "user", "content": content}]
    return processor.encode_chat(processor.load_tokenizer(checkpoint), messages)


def recorded(model, prompt, **options):
    """The generated tokens and the report that watched them."""
    with report.AttentionReport(model, prompt[0]) as watcher:
        tokens = list(generate.generate(model, *prompt, max_new_tokens=N, **options))
    return tokens, watcher


@pytest.fixture(scope="module")
def greedy(tiny_untied):
    """A greedy answer to the photo, the report that watched it, and the oracle: transformers'
    eager attention weights and hidden states of one forward over prompt and answer."""
    model, prompt = load_qwen.load_model(tiny_untied), encode(tiny_untied)
    tokens, watcher = recorded(model, prompt)
    ids = torch.cat([prompt[0], torch.tensor([tokens])], dim=1)
    reference = fx.reference_model(tiny_untied)
    with torch.no_grad():
        out = reference(input_ids=ids, pixel_values=prompt[1], image_grid_thw=prompt[2],
                        mm_token_type_ids=(ids == IMAGE).int(), output_attentions=True,
                        output_hidden_states=True)
    return model, prompt, tokens, watcher, reference, out


def test_shares_are_the_reference_attention_weights(greedy):
    model, prompt, tokens, watcher, _, out = greedy
    assert len(tokens) == N
    assert all(not layer.self_attn._forward_hooks for layer in model.layers)  # hooks gone
    assert all(not layer._forward_hooks for layer in model.layers)
    mass = torch.stack([torch.stack(steps) for steps in watcher.mass], dim=1)  # (N, layers, nh, 2)
    assert mass.shape == (N, 4, 4, 2)
    assert ((mass >= 0) & (mass <= 1)).all()
    assert (mass.sum(-1) - 1).abs().max() <= 1e-6  # image + text, per head

    ids, T = torch.cat([prompt[0], torch.tensor([tokens])], dim=1), prompt[0].size(1)
    queries = torch.arange(T - 1, T - 1 + N)  # the query that chose each generated token
    # each layer's weights (1, nh, S, S): rows of those queries, summed over the image's columns
    want = torch.stack([a[0][:, queries][..., ids[0] == IMAGE].sum(-1).T  # (N, nh)
                        for a in out.attentions], dim=1)                    # (N, layers, nh)
    assert (mass[..., 0] - want).abs().max() <= 1e-5
    summary = watcher.summary(tokens)
    share = torch.tensor(summary["image_share"])                            # (N, layers)
    assert (share - want.mean(-1)).abs().max() <= 1e-5  # mean over heads
    assert summary["prompt_tokens"] == T
    assert summary["image_tokens"] == int((prompt[0] == IMAGE).sum())


def test_lens_is_the_reference_hidden_states_through_norm_and_head(greedy):
    """transformers' hidden_states are the embeddings, then each layer's output (before DeepStack
    adds to it), the last one replaced by the final norm's output: the norm applies to all but
    that one."""
    _, prompt, tokens, watcher, reference, out = greedy
    T = prompt[0].size(1)
    queries = torch.arange(T - 1, T - 1 + N)
    hidden = out.hidden_states
    assert len(hidden) == 4 + 1
    with torch.no_grad():
        normed = [reference.model.language_model.norm(h[0, queries]) for h in hidden[1:-1]]
        logits = reference.lm_head(torch.stack(normed + [hidden[-1][0, queries]], dim=1))
    chosen = torch.tensor(tokens)[:, None, None]                             # (N, 1, 1)
    want_prob = logits.softmax(-1).gather(-1, chosen.expand(-1, 4, 1))[..., 0]  # (N, layers)
    want_rank = (logits > logits.gather(-1, chosen.expand(-1, 4, 1))).sum(-1) + 1
    summary = watcher.summary(tokens)
    prob, rank = torch.tensor(summary["lens_prob"]), torch.tensor(summary["lens_rank"])
    assert prob.shape == (N, 4)
    assert (prob - want_prob).abs().max() <= 1e-5
    assert (rank == want_rank).all()
    top1 = logits.argmax(-1).tolist()                                       # (N, layers)
    want_layers = [report.convergence_layer(t, c) for t, c in zip(top1, tokens)]
    assert summary["convergence_layer"] == want_layers
    assert (rank[:, -1] == 1).all()  # greedy: the last layer's lens is the choice itself
    assert None not in summary["convergence_layer"]
    assert len(set(summary["convergence_layer"])) > 1  # a test that can tell layers apart


def test_report_changes_no_token_and_nothing_is_hooked_without_it(tiny_untied, tmp_path, capsys,
                                                                   hook_counts):
    args = ["--model", tiny_untied, "--image", CAT, "--max-new-tokens", N, "--seed", 3]  # sampled
    counts = hook_counts
    assert generate.cli(list(map(str, args))) == 0
    assert counts == {"hooks": 0, "lens": 0}
    plain = capsys.readouterr().out
    assert generate.cli(list(map(str, args + ["--report", tmp_path / "report.png"]))) == 0
    assert counts == {"hooks": 4 + 4, "lens": 1}  # attention and output of each layer; one lens
    assert capsys.readouterr().out == plain
    numbers = json.loads((tmp_path / "report.json").read_text())
    assert len(numbers["tokens"]) == len(numbers["image_share"])
    assert len(numbers["image_share"][0]) == 4
    assert numbers["pvm_layers"] == []
    assert numbers["pvm_ratio"] == []
    assert torch.tensor(numbers["lens_prob"]).shape == (len(numbers["tokens"]), 4)
    assert torch.tensor(numbers["lens_rank"]).shape == (len(numbers["tokens"]), 4)
    # sampled: a token that the last layer did not rank first has no convergence layer
    for layer, ranks in zip(numbers["convergence_layer"], numbers["lens_rank"], strict=True):
        assert (layer is None) == (ranks[-1] != 1)
    model = load_qwen.load_model(tiny_untied)
    options = dict(temperature=0.7, top_k=20, top_p=0.8, seed=3)  # generation_config.json's
    assert numbers["tokens"] == list(generate.generate(model, *encode(tiny_untied),
                                                                max_new_tokens=N, **options))
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")


def test_pvm_ratio_is_nonzero_exactly_at_text_after_an_image(tiny_untied):
    torch.manual_seed(0)
    model = pvm.attach_pvm(load_qwen.load_model(tiny_untied), [1, 3], 64)

    def ratios(image, gate):
        for i in (1, 3):
            model.layers[i].pvm_block.gate_alpha.data.fill_(gate)
        prompt = encode(tiny_untied, image)
        tokens, watcher = recorded(model, prompt)
        assert list(watcher.pvm) == [1, 3]
        return prompt, tokens, torch.stack([torch.stack(r) for r in watcher.pvm.values()])  # (2, N)

    prompt, tokens, with_image = ratios(image=True, gate=0.5)
    assert with_image.shape == (2, N)
    assert (with_image > 0).all()  # every generated token is text
    # the same ratio from one forward over prompt and answer, at the queries that chose the tokens
    sizes, T = {}, prompt[0].size(1)  # (layer, "ffn" / "pvm") -> (S,): the output's norm
    modules = {(i, name): getattr(model.layers[i], attr)
               for i in (1, 3) for name, attr in (("ffn", "mlp"), ("pvm", "pvm_block"))}

    def keep_size(key, module, args, out):
        sizes[key] = out[0].norm(dim=-1)

    hooks = [m.register_forward_hook(partial(keep_size, key)) for key, m in modules.items()]
    with torch.no_grad():
        model(torch.cat([prompt[0], torch.tensor([tokens[:-1]])], dim=1), *prompt[1:])
    for hook in hooks:
        hook.remove()
    want = torch.stack([sizes[i, "pvm"][T - 1:] / sizes[i, "ffn"][T - 1:]
                        for i in (1, 3)])                                   # (2, N)
    assert ((with_image - want).abs() / want).max() <= 1e-4
    assert (ratios(image=False, gate=0.5)[2] == 0).all()
    assert (ratios(image=True, gate=0.0)[2] == 0).all()


REFUSED = {
    "no matplotlib": (["--report", "{tmp}/r.png"],
                      "--report needs matplotlib (pip install matplotlib)"),
    "json suffix": (["--report", "{tmp}/r.json"], "a figure suffix such as .png"),
    "no directory": (["--report", "{tmp}/missing/r.png"], "needs an existing directory"),
    "compile": (["--report", "{tmp}/r.png", "--compile"],
                "--report and --compile do not go together"),
}


def no_loading(*args):
    raise AssertionError("the model was looked up before the report was checked")


@pytest.mark.parametrize("case", REFUSED)
def test_unwritable_report_refused_before_loading(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generate, "resolve_checkpoint", no_loading)
    if case == "no matplotlib":
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
        monkeypatch.setitem(sys.modules, "matplotlib.backend_bases", None)
    args, message = REFUSED[case]
    assert generate.cli(["--image", str(CAT)] + [a.format(tmp=tmp_path) for a in args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("error: ")
    assert message in err
    if case == "no matplotlib":
        assert err == f"error: {message}\n"


def test_report_writes_over_no_file(tmp_path, capsys, monkeypatch):
    """--report DIR/config.png would put its numbers in DIR/config.json, the checkpoint's config;
    --report cat.jpg would replace the photo; a second report under one name the first; a
    dangling symlink would be followed. Each is refused before loading, and nothing is touched."""
    monkeypatch.setattr(generate, "resolve_checkpoint", no_loading)
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_vl"}\n')
    (tmp_path / "cat.jpg").write_bytes(CAT.read_bytes())
    (tmp_path / "earlier.json").write_text("{}\n")  # an earlier report's numbers, its figure gone
    (tmp_path / "link.png").symlink_to(tmp_path / "nowhere.png")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.exists()}
    for figure, existing in [("config.png", "config.json"), ("cat.jpg", "cat.jpg"),
                             ("earlier.svg", "earlier.json"), ("link.png", "link.png")]:
        args = ["--image", str(CAT), "--report", str(tmp_path / figure)]
        assert generate.cli(args) == 2
        assert capsys.readouterr() == ("", f"error: --report {tmp_path / figure}: "
                                           f"{tmp_path / existing} exists, and a report writes "
                                           f"only new files\n")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.exists()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "link.png"])


def unwritable_folder(tmp_path):
    """A folder this process cannot create files in: its permissions say so, or, for root, whom
    permissions do not stop, /proc (Linux), where nobody creates files."""
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o555)
    return folder if not os.access(folder, os.W_OK) else Path("/proc")


def test_report_in_a_folder_closed_to_writing_refused_before_loading(tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setattr(generate, "resolve_checkpoint", no_loading)
    figure = unwritable_folder(tmp_path) / "report.png"
    assert generate.cli(["--image", str(CAT), "--report", str(figure)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"error: --report {figure}: cannot write in its folder: ")
    assert err.count("\n") == 1


CONVERGENCE = [3, 2, None, 1, 1]  # 5 tokens: position buckets 1, 2-3, 4-5


def numbers(image_tokens, pvm_ratio=(), pvm_layers=()):
    """report.json's numbers for 5 tokens after a prompt of 40, from a 4-layer decoder."""
    share = [[image_tokens / (40 + n)] * 4 for n in range(5)]  # (N, layers)
    return {"prompt_tokens": 40, "image_tokens": image_tokens, "tokens": list(range(5)),
            "image_share": share, "pvm_layers": list(pvm_layers), "pvm_ratio": list(pvm_ratio),
            "convergence_layer": CONVERGENCE}


def test_figure_shows_every_pvm_layer():
    """The second PVM layer's ratio is ten times the first's: the panel's y range holds both.
    The lens panel marks the PVM layers too."""
    ratio = [[0.1 * n, 1.0 * n] for n in range(1, 6)]  # (N, P)
    figure = report.report_figure(numbers(16, ratio, pvm_layers=[1, 3]))
    share_panel, pvm_panel, lens_panel = figure.axes
    assert len(share_panel.texts) == 0  # an image: nothing to explain
    lines = pvm_panel.get_lines()
    assert [line.get_label() for line in lines] == ["PVM at layer 1", "PVM at layer 3"]
    bottom, top = pvm_panel.get_ylim()
    for line in lines:
        assert bottom <= min(line.get_ydata())
        assert max(line.get_ydata()) <= top
    marks = [line for line in lens_panel.get_lines() if line.get_label().startswith("PVM")]
    assert [line.get_label() for line in marks] == ["PVM at layer 1", "PVM at layer 3"]
    assert [list(line.get_ydata()) for line in marks] == [[1, 1], [3, 3]]


def test_lens_panel_draws_each_token_and_the_mean_of_each_bucket():
    figure = report.report_figure(numbers(16))
    assert len(figure.axes) == 2  # no PVM panel
    tokens, means = figure.axes[1].get_lines()
    assert tokens.get_label() == "each token"
    assert list(tokens.get_xdata()) == [1, 2, 3, 4, 5]
    y = torch.as_tensor(tokens.get_ydata())
    assert y.nan_to_num(-1).tolist() == [3, 2, -1, 1, 1]  # None in the JSON: NaN, no point
    assert list(means.get_xdata()) == [1, 2.5, 4.5]  # the mean position of each bucket
    assert list(means.get_ydata()) == [3, 2, 1]  # the token without a layer left out
    assert "(no layer for 1 of 5: sampled below" in figure.axes[1].get_title()
    assert figure.axes[1].get_ylim() == (-0.5, 3.5)  # the 4 layers


def test_convergence_layer_of_hand_made_predictions():
    chosen = 7
    assert report.convergence_layer([7, 7, 7, 7], chosen) == 0
    assert report.convergence_layer([1, 2, 7, 7], chosen) == 2
    assert report.convergence_layer([7, 7, 1, 7], chosen) == 3  # lost at layer 2: from 3 on
    assert report.convergence_layer([7, 1, 7, 7], chosen) == 2
    assert report.convergence_layer([1, 7, 7, 1], chosen) is None  # sampled below the top-1
    assert report.convergence_layer(torch.tensor([3, 7]).tolist(), chosen) == 1
    assert report.convergence_layer([7], chosen) == 0


def test_bucket_means_of_hand_made_values():
    position = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 3])
    values = torch.tensor([[1.0, 0], [2, 0], [4, nan], [1, 0], [2, 0], [3, 0], [nan, nan],
                           [5, 1], [6, 0]], dtype=torch.float64)              # (9, 2)
    span, centre, tokens, mean, count = report.bucket_means(position, values)
    assert span.tolist() == [[1, 1], [2, 3], [4, 7], [8, 8]]
    assert centre.tolist() == [1, 8 / 3, 5.5, 8]
    assert tokens.tolist() == [1, 3, 4, 1]
    assert mean.tolist() == [[1, 0], [4, 0], [2, 0], [5, 1]]  # NaN left out
    assert count.tolist() == [[1, 1], [3, 2], [3, 3], [1, 1]]


def test_figure_says_when_the_prompt_has_no_image(tmp_path):
    share_panel = report.report_figure(numbers(0)).axes[0]
    assert len(share_panel.get_lines()) == 0  # shares of 0 would say nothing
    assert [text.get_text() for text in share_panel.texts] == ["no image in the prompt"]
    assert "no image in the prompt" in share_panel.get_title()
    report.write_report(numbers(0), tmp_path / "report.png")  # and it still saves
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")


def plain_ticks(axes):
    """The labels of the x axis's ticks inside its limits, minor ones too, once drawn."""
    axes.figure.draw_without_rendering()
    low, high = axes.get_xlim()
    return [tick.get_text() for tick in axes.get_xticklabels() + axes.get_xticklabels(minor=True)
            if low <= tick.get_position()[0] <= high]


def test_positions_read_as_plain_numbers():
    """Log-scaled positions 1 to 5 within one decade: ticks 1, 2, 4, not 2x10^0 or 10^0."""
    figure = report.report_figure(numbers(16, [[0.1]] * 5, pvm_layers=[1]))
    for axes in figure.axes:
        assert axes.get_xscale() == "log"
    assert [label for label in plain_ticks(figure.axes[-1]) if label] == ["1", "2", "4"]
