"""eval.py: scoring on real reply shapes, prompts, the figures, the tiny model end to end
(with and without PVM, one run and sampled runs), and every bad input."""
import json

import pytest
import torch
from PIL import Image

import processor
import common
import data
import eval as ev
import grading
import pvm
import train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

COLOURS = {"options": ["red", "green", "blue", "yellow"], "answer": "C"}
SHAPES = {"options": ["square", "circle", "triangle"], "answer": "A"}
SHADES = {"options": ["red", "dark red", "pink"], "answer": "dark red"}  # given as the text
MC_CASES = [  # (reply, sample, verdict); the letters read: test_lmms_eval_agreement.py
    ("C", COLOURS, True),
    ("The answer is (C).", COLOURS, True),
    ("C is correct", COLOURS, True),
    ("I think C, not A", COLOURS, False),  # lmms-eval reads A: the reply's last letter
    ("blue", COLOURS, False),  # no letter: lmms-eval's shared parser reads none
    ("The answer is E.", COLOURS, False),  # no such option
    ("", COLOURS, False),
    ("B", SHADES, True),  # the answer given as the option's text is its letter
    ("B", {**SHADES, "benchmark": "MMMU_val"}, True),
    # MMMU's parser, no letter in a reply of over 5 words: the option named last, "red" here
    ("I think it is the one drawn in dark red here.", {**SHADES, "benchmark": "MMMU_val"}, False),
]


@pytest.mark.parametrize("reply, sample, verdict", MC_CASES)
def test_multiple_choice_replies(reply, sample, verdict):
    assert ev.score(reply, sample) is verdict


OPEN_CASES = [  # (reply, answer, verdict with mathruler, verdict with the plain comparison)
    ("1/2", "1/2", True, True),
    ("\\frac{1}{2}", "1/2", True, False),
    ("0.5", "\\frac{1}{2}", True, False),
    ("\\dfrac{3}{4}", "0.75", True, False),
    ("So the ratio is \\boxed{\\frac{1}{2}}.", "1/2", True, False),
    ("<think>Half of 8 is 4.</think><answer>4</answer>", "4", True, True),
    ("<answer>$4.0$</answer>", "4", True, True),
    ("1,000", "1000", True, True),
    ("Paris", "paris", True, True),
    ("Paris.", "paris", False, True),  # mathruler keeps the period
    ("2/1", "1/2", False, False),  # the right digits, the wrong number
    ("12", "1/2", False, False),
    ("1/3", "1/2", False, False),
    ("The answer is 4, I think, or maybe 5.", "4", False, False),  # no answer span: not graded
    ("<think>It is 4.</think><answer>5</answer>", "4", False, False),
    ("<answer></answer>", "4", False, False),
    # lmms-eval's split on "the answer is" (mathvision_process_results): to the line's end or ". "
    ("The answer is 12.", "12", True, True),
    ("Three rows of four.\nThe answer is 12\nsince 3 * 4 = 12", "12", True, True),
    ("so the answer should be 7. That is all.", "7", True, True),
    ("the final answer is 2/1, not 1/2", "1/2", False, False),
]


@pytest.mark.parametrize("reply, answer, with_mathruler, plain", OPEN_CASES)
def test_open_replies(reply, answer, with_mathruler, plain, monkeypatch):
    sample = {"answer": answer}
    installed = grading.grade_answer is not None
    assert ev.score(reply, sample) is (with_mathruler if installed else plain)
    monkeypatch.setattr(grading, "grade_answer", None)  # the fallback, whatever is installed
    assert ev.score(reply, sample) is plain


def test_extracted_answers():
    assert ev.extract("The answer is (C).", COLOURS) == "C"
    assert ev.extract("No idea.", COLOURS) is None
    assert ev.extract("x \\boxed{\\frac{1}{2}} y", {"answer": "1/2"}) == "\\frac{1}{2}"
    assert ev.extract("<think>a</think> <answer> 7 </answer>", {"answer": "7"}) == "7"


def test_prompts_are_lmms_eval_s():
    mc = {"question": "What colour?", "options": ["red", "blue"], "images": ["a.png"]}
    content = ev.prompt_messages(mc, post_prompt="ignored for options")[0]["content"]
    assert content[0] == {"type": "image", "image": "a.png"}
    expected = ("What colour?\nA. red\nB. blue\n"
                "Answer with the option's letter from the given choices directly.")
    assert content[1] == {"type": "text", "text": expected}
    open_question = {"question": "How many?", "options": None, "images": []}
    text = ev.prompt_messages(open_question, None)[0]["content"][-1]["text"]
    assert text == "How many?"
    text = ev.prompt_messages(open_question, "Put the answer in \\boxed{}.")[0]["content"][-1]
    assert text["text"] == "How many?\nPut the answer in \\boxed{}."


PER_BENCHMARK = {  # benchmark -> the text of lmms-eval 0.7.3's prompt, written out from its task
    # mmmu_val_qwen.yaml's kwargs through mmmu_doc_to_text_qwen3vl
    "MMMU_val": "Question: What colour?\nOptions:\nA. red\nB. blue\n"
                "Answer with the option letter only.",
    # mmstar_qwen.yaml's kwargs through mmstar_doc_to_text (MMStar's questions hold their
    # options as "Options: A: ..., B: ..."; the post-prompt follows them without a space)
    "MMStar": "Question: What colour?\nOptions: A: red, B: blueAnswer with the option letter only.",
    # mathvision_testmini.yaml's mc_prompt through mathvision_doc_to_text
    "MathVision": 'Please solve the problem step by step and put your answer in one "\\boxed{}".'
                  "What colour?\nChoices: A. red\nB. blue\nAnswer the question with the "
                  "option's letter from the given choices directly.",
}


@pytest.mark.parametrize("benchmark", PER_BENCHMARK)
def test_prompts_of_benchmarks_lmms_eval_has(benchmark):
    sample = {"question": "What colour?", "options": ["red", "blue"], "images": ["a.png"],
              "benchmark": benchmark}
    assert ev.prompt_messages(sample, None)[0]["content"][1]["text"] == PER_BENCHMARK[benchmark]
    open_mmmu = {**sample, "options": None, "benchmark": "MMMU_val"}
    assert ev.prompt_messages(open_mmmu, None)[0]["content"][1]["text"] == (
        "Question: What colour?\nOptions:\n\nPlease answer the question directly.")


def test_builtin_samples_keep_their_prompt():
    messages = data.synthetic_sample(__import__("random").Random(3))
    sample = ev.builtin_sample(messages, "built-in sample 0")
    assert ev.prompt_messages(sample, None) == messages[:1]
    assert sample["options"] in (list(data.COLORS), list(data.SHAPES))
    assert ev.score(messages[1]["content"], sample)


def test_figures_by_benchmark_length_and_bootstrap():
    samples = [{"benchmark": "a"}] * 4 + [{"benchmark": "b"}] * 4
    base = torch.tensor([[0, 0], [0, 1], [1, 1], [0, 0], [1, 1], [1, 1], [0, 0], [1, 0]]).double()
    with_pvm = torch.ones(8, 2, dtype=torch.float64)
    lengths = torch.arange(1, 9).double()
    summary = ev.summarise(samples, {"base": base, "pvm": with_pvm}, lengths)
    a, b = summary["benchmarks"]["a"], summary["benchmarks"]["b"]
    assert a["base"]["runs"] == [0.25, 0.5] and a["base"]["mean"] == 0.375
    assert a["base"]["std"] == pytest.approx(0.1767767, abs=1e-6)  # n - 1 in the denominator
    assert b["base"]["runs"] == [0.75, 0.5] and b["pvm"]["runs"] == [1.0, 1.0]
    macro = summary["macro"]
    assert macro["base"]["runs"] == [0.5, 0.5] and macro["base"]["std"] == 0.0
    assert macro["difference"] == pytest.approx((0.625 + 0.375) / 2)
    for entry in (a, b, macro):
        low, high = entry["ci95"]
        assert low <= entry["difference"] <= high and high <= 1.0
    # quartiles within each benchmark: a's lengths are 1-4, b's 5-8, a quarter one of each
    per_benchmark = summary["by_length_per_benchmark"]
    assert [e["tokens"] for e in per_benchmark["a"]] == [[1, 1], [2, 2], [3, 3], [4, 4]]
    assert [e["tokens"] for e in per_benchmark["b"]] == [[5, 5], [6, 6], [7, 7], [8, 8]]
    assert summary["length_cuts"]["a"] == [1.75, 2.5, 3.25]
    assert [e["n"] for e in summary["by_length"]] == [2, 2, 2, 2]
    # quarter 1's macro average: sample 0 (a difference of 1) and sample 4 (0), one per benchmark
    assert summary["by_length"][0]["difference"] == pytest.approx(0.5)
    assert per_benchmark["a"][0]["difference"] == 1 and per_benchmark["b"][0]["difference"] == 0
    assert ev.summarise(samples, {"base": base, "pvm": with_pvm}, lengths) == summary  # seeded
    same = ev.summarise(samples, {"base": base, "pvm": base.clone()}, lengths)
    assert same["macro"]["difference"] == 0 and same["macro"]["ci95"] == [0, 0]


def test_a_benchmark_with_categories_scores_the_mean_of_their_means():
    """MMStar's score (lmms-eval's mmstar_aggregate_results): categories x (2 right of 2) and
    y (0 of 1) give (1 + 0) / 2, not 2 / 3; the interval resamples with the same weights."""
    samples = [{"benchmark": "mmstar", "category": c} for c in "xxy"]
    base = torch.tensor([[1.0], [1.0], [0.0]], dtype=torch.float64)
    with_pvm = torch.ones(3, 1, dtype=torch.float64)
    summary = ev.summarise(samples, {"base": base, "pvm": with_pvm}, torch.ones(3).double())
    entry = summary["benchmarks"]["mmstar"]
    assert entry["base"]["mean"] == 0.5 and entry["pvm"]["mean"] == 1.0
    assert entry["difference"] == 0.5 and entry["ci95"][0] <= 0.5 <= entry["ci95"][1]
    plain = ev.summarise([{"benchmark": "b"}] * 3, {"base": base}, torch.ones(3).double())
    assert plain["benchmarks"]["b"]["base"]["mean"] == pytest.approx(2 / 3)


def test_bootstrap_interval_has_the_width_of_the_normal_approximation():
    generator = torch.Generator().manual_seed(1)
    base = torch.zeros(400, 1, dtype=torch.float64)
    with_pvm = torch.bernoulli(torch.full((400, 1), 0.3), generator=generator).double()
    entry, _ = grading.figures(list(range(400)), {"base": base, "pvm": with_pvm},
                                torch.Generator().manual_seed(0))
    p = with_pvm.mean().item()
    width = 2 * 1.96 * (p * (1 - p) / 400) ** 0.5
    assert entry["ci95"][1] - entry["ci95"][0] == pytest.approx(width, rel=0.15)

# -----------------------------------------------------------------------------
# the command on the tiny model

def run(tmp_path, name, *args):
    out = tmp_path / name
    assert ev.cli(["--size", "tiny", "--max-new-tokens", "4", "--out", str(out), *args]) == 0
    results = json.loads((out / "results.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().split("\n")
                   if line]
    return results, predictions


def check_consistent(results, predictions, runs):
    """Every figure of results.json recomputed from the predictions."""
    assert len(predictions) == results["macro"]["n"] * runs * len(results["models"])
    for name in results["models"]:
        mine = [p for p in predictions if p["model"] == name]
        for benchmark, entry in results["benchmarks"].items():
            rows = [p for p in mine if p["benchmark"] == benchmark]
            for run in range(runs):
                verdicts = [p["correct"] for p in rows if p["run"] == run]
                assert len(verdicts) == entry["n"]
                assert entry[name]["runs"][run] == pytest.approx(sum(verdicts) / len(verdicts))
            assert entry[name]["mean"] == pytest.approx(sum(p["correct"] for p in rows) / len(rows))
        assert all(0 <= p["tokens"] <= results["max_new_tokens"] for p in mine)
    assert sum(e["n"] for e in results["by_length"]) == results["macro"]["n"]


def test_tiny_end_to_end(tmp_path, capsys):
    results, predictions = run(tmp_path, "base", "--limit", "8")
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["benchmark", "n", "base"]
    assert "built-in" in table and "macro average" in table and "by response length" in table
    assert results["models"] == ["base"] and results["macro"]["n"] == 8
    # the held-out split of `train.py --size tiny`, in its order
    args = train.parse_args(["--size", "tiny"])
    held_out, _, _ = data.load_data(None, processor.tiny_tokenizer(), args.max_len, args.seed,
                                    args.eval_samples, args.synthetic_samples)
    assert [p["id"] for p in predictions] == [where for _, where in held_out[:8]]
    assert [p["answer"] for p in predictions] == [m[1]["content"] for m, _ in held_out[:8]]
    check_consistent(results, predictions, runs=1)
    assert all(p["correct"] == (p["extracted"] == p["answer"]) for p in predictions)


def write_pvm(path, gate):
    model = pvm.attach_pvm(common.tiny_model(0), common.SIZES["tiny"]["pvm_layers"], 64)
    for i in model.config.pvm_layers:
        model.layers[i].pvm_block.gate_alpha.data.fill_(gate)
    pvm.save_pvm(model, path)
    return path


def test_compare_with_a_gate_of_zero_gives_the_base_model(tmp_path):
    """A PVM whose gates are 0 is the base model exactly: the same replies, a difference of 0."""
    file = write_pvm(tmp_path / "zero.safetensors", 0.0)
    results, predictions = run(tmp_path, "zero", "--limit", "6", "--pvm", str(file), "--compare")
    base, _ = run(tmp_path, "base", "--limit", "6")
    assert results["models"] == ["base", "pvm"]
    assert results["macro"]["difference"] == 0 and results["macro"]["ci95"] == [0, 0]
    replies = {name: [(p["id"], p["response"], p["tokens"]) for p in predictions
                      if p["model"] == name] for name in ("base", "pvm")}
    assert replies["base"] == replies["pvm"]
    assert results["macro"]["base"] == base["macro"]["base"]


@pytest.fixture
def generated(monkeypatch):
    """The token rows of every generate_batch call (the tiny random model's tokens mostly lie
    outside the byte-level tokenizer's vocabulary: its text is empty)."""
    calls, generate_batch = [], ev.generate.generate_batch

    def recording(*args, **kwargs):
        calls.append(generate_batch(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(ev.generate, "generate_batch", recording)
    return calls


def test_compare_sampled_runs(tmp_path, capsys, generated):
    file = write_pvm(tmp_path / "pvm.safetensors", 3.0)
    args = ["--limit", "6", "--pvm", str(file), "--samples", "2", "--temperature", "1.0",
            "--top-k", "20", "--batch-size", "4"]  # top-k: no sort of the whole vocabulary
    results, predictions = run(tmp_path, "sampled", *args, "--compare")
    assert capsys.readouterr().out.splitlines()[0].split()[2:5] == ["base", "pvm", "difference"]
    check_consistent(results, predictions, runs=2)
    assert [len(rows) for rows in generated] == [8, 4, 8, 4]  # 4 + 2 prompts, 2 replies each
    assert generated[:2] != generated[2:]  # a gate of 3 changes what the model says
    for entry in (*results["benchmarks"].values(), results["macro"], *results["by_length"]):
        assert entry["difference"] == pytest.approx(entry["pvm"]["mean"] - entry["base"]["mean"])
        assert entry["ci95"][0] - 1e-9 <= entry["difference"] <= entry["ci95"][1] + 1e-9
    again, _ = run(tmp_path, "again", *args, "--compare")
    assert again == results and generated[4:] == generated[:4]  # seeded: the same draws
    alone, _ = run(tmp_path, "alone", *args)  # the PVM model alone: the gates were put back
    assert alone["models"] == ["pvm"] and generated[8:] == generated[2:4]
    assert alone["macro"]["pvm"] == results["macro"]["pvm"]

def test_a_checkpoint_in_batches(tiny_untied, tmp_path, generated):
    """A checkpoint directory (the official layout and tokenizer): the same greedy replies one
    prompt at a time and in one left-padded batch of prompts of different lengths."""
    lines = []
    for k, size in enumerate([(64, 64), (96, 64), (32, 128)]):
        Image.new("RGB", size, (40 * k, 90, 200)).save(tmp_path / f"{k}.png")
        lines.append({"images": [f"{k}.png"], "question": "Which colour?" + " Look." * k,
                      "options": ["red", "blue"] if k < 2 else None, "answer": "B" if k < 2 else 2})
    file = tmp_path / "bench.jsonl"
    file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = ["--model", str(tiny_untied), "--data", str(file), "--max-new-tokens", "6"]
    for batch_size in ("1", "3"):
        out = str(tmp_path / batch_size)
        assert ev.cli([*common, "--batch-size", batch_size, "--out", out]) == 0
    one, three = ((tmp_path / b / "predictions.jsonl").read_text() for b in ("1", "3"))
    assert one == three
    assert [len(rows) for rows in generated] == [1, 1, 1, 3]
    assert sorted(rows[0] for rows in generated[:3]) == sorted(generated[3])
    assert all(len(row) <= 6 for row in generated[3])

# -----------------------------------------------------------------------------
# bad input

def test_a_data_file_with_benchmarks(tmp_path):
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "blue.png")
    lines = [{"id": "q1", "images": ["blue.png"], "question": "Colour?", "options": ["red", "blue"],
              "answer": "B", "benchmark": "colours"},
             {"id": "q2", "images": ["blue.png"], "question": "Colour?", "options": ["red", "blue"],
              "answer": "blue", "benchmark": "colours"},
             {"id": "q3", "images": ["blue.png"], "question": "How many shapes?", "answer": 1}]
    file = tmp_path / "bench.jsonl"
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    results, predictions = run(tmp_path, "out", "--data", str(file))
    assert set(results["benchmarks"]) == {"colours", "bench"}  # the file's name by default
    assert results["benchmarks"]["colours"]["n"] == 2
    assert [p["answer"] for p in predictions] == ["B", "B", "1"]  # an option's text: its letter
    means = [b["base"]["mean"] for b in results["benchmarks"].values()]
    assert results["macro"]["base"]["mean"] == pytest.approx(sum(means) / 2)
    check_consistent(results, predictions, runs=1)


@pytest.fixture
def bench(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    return tmp_path


GOOD = {"id": "1", "images": ["ok.png"], "question": "Colour?", "options": ["red", "blue"],
        "answer": "A"}
DATA_ERRORS = {  # the file's second line -> the message after "bench.jsonl:2: "
    "malformed": ("{not json", "not valid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "no answer": (json.dumps({**GOOD, "answer": None}), 'no "answer"'),
    "empty answer": (json.dumps({**GOOD, "answer": " "}), 'no "answer"'),
    "answer not an option": (json.dumps({**GOOD, "answer": "C"}),
                             "the answer 'C' is neither an option's letter nor an option"),
    "no question": (json.dumps({**GOOD, "question": 3}), '"question" must be a string'),
    "options": (json.dumps({**GOOD, "options": "red, blue"}), '"options" must be a list'),
    "images": (json.dumps({**GOOD, "images": [3]}), '"images" must be a list of paths'),
    "images 0": (json.dumps({**GOOD, "id": "2", "images": 0}), '"images" must be a list of paths'),
    "the same id": (json.dumps(GOOD), f"the id '1' again (first at "),
    "special token": (json.dumps({**GOOD, "question": "Colour?<|im_end|>"}),
                      "the text holds <|im_end|>, a special token of the chat format"),
    "not UTF-8": (b'{"question": "Colour \xff?"}', "'utf-8' codec can't decode byte 0xff"),
}


@pytest.mark.parametrize("case", DATA_ERRORS)
def test_bad_data_lines(case, bench, capsys):
    line, message = DATA_ERRORS[case]
    line = line if isinstance(line, bytes) else line.encode()
    (bench / "bench.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n" + line + b"\n")
    assert ev.cli(["--size", "tiny", "--data", str(bench / "bench.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bench / 'bench.jsonl'}:2: {message}")
    assert err.count("\n") == 1


@pytest.mark.parametrize("image, message", [("gone.png", "cannot read image"),
                                            ("garbage.png", "cannot read image")])
def test_bad_images(image, message, bench, capsys):
    (bench / "bench.jsonl").write_text(json.dumps({**GOOD, "images": [image]}) + "\n")
    assert ev.cli(["--size", "tiny", "--data", str(bench / "bench.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and f"bench.jsonl:1" in err
    assert str(bench / image) in err and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["--data", "nowhere.jsonl"], "No such file"),
    (["--data", "empty.jsonl"], "holds no samples"),
    (["--pvm", "nowhere.safetensors"], "cannot read PVM weights"),
    (["--compare"], "--compare needs --pvm"),
    (["--samples", "2"], "--samples > 1 needs --temperature > 0"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--post-prompt", "Answer.<|im_end|>"],
     "--post-prompt holds <|im_end|>, a special token of the chat format"),
])
def test_bad_options(args, message, bench, capsys, monkeypatch):
    monkeypatch.chdir(bench)
    (bench / "empty.jsonl").write_text("\n")
    assert ev.cli(["--size", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_no_data_without_the_tiny_size(tmp_path, capsys):
    processor.tiny_tokenizer().save(str(tmp_path / "tokenizer.json"))
    assert ev.cli(["--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "error: --data FILE is needed (or --size tiny, for the built-in task)\n")

# -----------------------------------------------------------------------------
# two checkpoints, and the checkpoint's sampling settings

def checkpoint_bench(tmp_path):
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "blue.png")
    lines = [{"images": ["blue.png"], "question": "Colour?" + " Look." * k,
              "options": ["red", "blue"], "answer": "B"} for k in range(3)]
    file = tmp_path / "bench.jsonl"
    file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return file


def test_base_compares_two_checkpoints(tiny_untied, tmp_path, generated):
    """--base CHECKPOINT: the base column from another checkpoint, paired as --compare's. The
    same checkpoint twice (the second with PVM's gates at 0) is the same model: a difference of 0
    and the same replies, base run last (the model of --model loads first: a bad --pvm fails at
    once)."""
    file, zero = checkpoint_bench(tmp_path), write_pvm(tmp_path / "zero.safetensors", 0.0)
    out = tmp_path / "run"
    assert ev.cli(["--model", str(tiny_untied), "--base", str(tiny_untied), "--data", str(file),
                   "--max-new-tokens", "4", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["models"] == ["base", "model"] and results["base"] == str(tiny_untied)
    assert results["macro"]["difference"] == 0 and results["macro"]["ci95"] == [0, 0]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().split("\n")
                   if line]
    replies = {name: [p["response"] for p in predictions if p["model"] == name]
               for name in ("base", "model")}
    assert replies["base"] == replies["model"] and len(generated) == 6
    pvm_args = ["--pvm", str(tmp_path / "nowhere.safetensors"), "--out", str(tmp_path / "bad")]
    assert ev.cli(["--model", str(tiny_untied), "--base", str(tiny_untied), "--data", str(file),
                   *pvm_args]) == 2
    assert len(generated) == 6  # refused before the base model generated anything


@pytest.mark.parametrize("options, top_k, top_p", [([], 20, 0.8), (["--top-k", "5"], 5, None)])
def test_sampling_takes_the_checkpoint_s_settings(options, top_k, top_p, tiny_untied, tmp_path,
                                                   monkeypatch):
    """With --temperature > 0 and neither --top-k nor --top-p, the checkpoint's
    generation_config.json applies (the released models: top-k 20, top-p 0.8), as lmms-eval's
    Qwen3-VL model leaves it; results.json says what ran."""
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for f in tiny_untied.iterdir():  # its own generation_config.json: a link's would write
        if f.name != "generation_config.json":  # through to the session's checkpoint
            (checkpoint / f.name).symlink_to(f)
    (checkpoint / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8}))
    seen, generate_batch = [], ev.generate.generate_batch

    def recording(*args, **kwargs):
        seen.append((kwargs["top_k"], kwargs["top_p"], kwargs["temperature"]))
        return generate_batch(*args, **kwargs)

    monkeypatch.setattr(ev.generate, "generate_batch", recording)
    out = tmp_path / "run"
    assert ev.cli(["--model", str(checkpoint), "--data", str(checkpoint_bench(tmp_path)),
                   "--temperature", "0.7", "--max-new-tokens", "2", "--out", str(out),
                   *options]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["top_k"], results["top_p"], results["temperature"]) == (top_k, top_p, 0.7)
    assert set(seen) == {(top_k, top_p, 0.7)}
