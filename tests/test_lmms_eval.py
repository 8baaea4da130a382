"""eval.py --lmms-eval (lmms.py): a task of lmms-eval's own, run by lmms-eval's evaluator on the
tiny model end to end. The task is local, written here: a YAML file, its code, JSON lines and
PNG images; its score must equal the one computed from the replies lmms-eval logged. A second
run answers from a fake generate_batch, so that the replies, and the score, are known: they
must reach the right documents, cut at the task's stop string. The tests that need lmms-eval
are skipped where it is not installed (CI installs it: requirements-eval.txt); the bad options
are checked without it."""
import importlib.util
import json
import re
import sys

import pytest
from PIL import Image, ImageFile

import eval as ev
import lmms
import processor
from test_eval import write_pvm  # a tiny PVM file with every gate at a value

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
needs_lmms_eval = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                                     reason="lmms-eval is not installed (requirements-eval.txt)")

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 60, 220),
           "yellow": (230, 210, 40)}
# the task's code, as a task of lmms-eval's writes it: the image, the prompt, the verdict
UTILS = '''
from pathlib import Path
from PIL import Image

def doc_to_visual(doc):
    return [Image.open(Path(__file__).parent / doc["image"]).convert("RGB")]

def doc_to_text(doc):
    options = "\\n".join(f"{letter}. {o}" for letter, o in zip("ABCD", doc["options"]))
    return f"{doc['question']}\\n{options}\\nAnswer with the letter."

def process_results(doc, results):
    return {"acc": float(results[0].strip()[:1] == doc["answer"])}
'''
# the task's settings: its own token limit and stop string
YAML = '''task: tiny_colours
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder}/test.jsonl
    dev: {folder}/dev.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  until: ["\\n"]
process_results: !function utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
'''
# the dev split's replies, written into each question for the fake generate_batch to give, and
# their verdicts: "B\nC" is read as B (the stop string cuts it), "\nD" as nothing
REPLIES = [("A", "A", 1), ("B", "B\nC", 1), ("C", "D", 0), ("D", "\nD", 0),
           ("A", "A. red", 1)]


@pytest.fixture(autouse=True)
def truncated_images_fail():
    """Importing lmms-eval sets PIL's LOAD_TRUNCATED_IMAGES (lmms_eval/api/task.py), for the
    whole process: the tests after these expect a truncated image to fail, so it is put back."""
    setting = ImageFile.LOAD_TRUNCATED_IMAGES
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = setting


def rule(reply, answer):
    """The task's verdict (UTILS' process_results), recomputed here from a logged reply."""
    return float(reply.strip()[:1] == answer)


@pytest.fixture
def task(tmp_path, monkeypatch):
    """The local task's folder; lmms-eval's datasets cache inside tmp_path, offline."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "utils.py").write_text(UTILS)
    (folder / "tiny_colours.yaml").write_text(YAML.format(folder=folder))
    names = list(COLOURS)
    for k, name in enumerate(names):
        Image.new("RGB", (24 + 8 * k, 32), COLOURS[name]).save(folder / f"{name}.png")
    test = [{"image": f"{name}.png", "question": "Which colour fills the picture?" + " Look." * k,
             "options": names, "answer": "ABCD"[k]} for k, name in enumerate(names)]
    dev = [{"image": f"{names[k % 4]}.png", "options": names, "answer": answer,
            "question": f"Which colour? [[{reply}]]" + " Look." * k}
           for k, (answer, reply, _) in enumerate(REPLIES)]
    for split, docs in (("test", test), ("dev", dev)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))
    return folder


def run(task, out, *args, tasks="tiny_colours"):
    assert ev.cli(["--size", "tiny", "--lmms-eval", tasks, "--include-path", str(task),
                   "--out", str(out), *args]) == 0
    results = json.loads((out / "lmms_eval.json").read_text())
    lines = (out / "predictions.jsonl").read_text().splitlines()
    return results, [json.loads(line) for line in lines]


@needs_lmms_eval
def test_a_local_task_end_to_end(task, tmp_path, capsys, monkeypatch):
    """The tiny model, base and PVM (a gate of 3), in batches of 3: lmms-eval's score is the
    mean of the verdicts on the replies it logged; every reply keeps to the task's token limit;
    every image reaches the model resized into lmms-eval's Qwen3-VL pixel bounds."""
    calls, generate_batch = [], lmms.generate.generate_batch

    def recording(model, input_ids, attention_mask, pixel_values, grid, **options):
        calls.append((grid, options, generate_batch(model, input_ids, attention_mask,
                                                    pixel_values, grid, **options)))
        return calls[-1][-1]

    monkeypatch.setattr(lmms.generate, "generate_batch", recording)
    file = write_pvm(tmp_path / "pvm.safetensors", 3.0)
    out = tmp_path / "out"
    results, predictions = run(task, out, "--pvm", str(file), "--compare", "--batch-size", "3")
    assert results["models"] == ["base", "pvm"]
    for name in ("base", "pvm"):
        mine = [p for p in predictions if p["model"] == name]
        assert sorted(p["doc_id"] for p in mine) == [0, 1, 2, 3]
        for p in mine:
            assert p["acc"] == rule(p["filtered_resps"][0], p["target"])
            assert p["token_counts"][0]["output_tokens"] <= 8
        score = sum(rule(p["filtered_resps"][0], p["target"]) for p in mine) / len(mine)
        assert results["summary"][name]["tiny_colours acc"]["mean"] == pytest.approx(score)
        assert results["runs"][name][0]["results"]["tiny_colours"]["acc,none"] == \
            pytest.approx(score)
    assert [len(rows) for _, _, rows in calls] == [3, 1, 3, 1]
    assert calls[0][-1] != calls[2][-1]  # a gate of 3 changes what the model says
    for grid, options, _ in calls:
        assert options["max_new_tokens"] == 8 and options["temperature"] == 0
        pixels = grid[:, 1] * grid[:, 2] * 16 * 16
        assert bool(((pixels >= lmms.MIN_PIXELS) & (pixels <= lmms.MAX_PIXELS)).all())
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["task", "and", "metric", "base", "pvm", "difference"]
    assert table[1].startswith("tiny_colours acc")
    # an earlier run is kept: a second one into the same folder is refused
    assert ev.cli(["--size", "tiny", "--lmms-eval", "tiny_colours", "--include-path", str(task),
                   "--out", str(out)]) == 2
    assert "holds an earlier run" in capsys.readouterr().err


@needs_lmms_eval
def test_scores_are_the_replies_verdicts(task, tmp_path, monkeypatch):
    """Replies known in advance (the fake generate_batch gives the one each question holds):
    each reaches its own document although the batches are sorted by length, cut at the task's
    stop string; the split asked for (NAME@SPLIT) is the one evaluated; --temperature replaces
    the task's, each run draws with its own seeds, and the score is the mean of the runs'."""
    tokenizer, calls = processor.tiny_tokenizer(), []

    def fake(model, input_ids, attention_mask, pixel_values, grid, **options):
        calls.append(options)
        prompts = [tokenizer.decode(ids[mask.bool()].tolist())
                   for ids, mask in zip(input_ids, attention_mask)]
        replies = [re.search(r"\[\[(.*?)\]\]", p, re.DOTALL).group(1) for p in prompts]
        return [tokenizer.encode(r).ids + [model.config.eos_token_ids[0]] for r in replies]

    monkeypatch.setattr(lmms.generate, "generate_batch", fake)
    results, predictions = run(task, tmp_path / "out", "--samples", "2", "--temperature", "0.5",
                               "--batch-size", "2", tasks="tiny_colours@dev")
    assert len(predictions) == 2 * len(REPLIES)
    for p in predictions:
        answer, reply, verdict = REPLIES[p["doc_id"]]
        assert p["target"] == answer and p["filtered_resps"][0] == reply.split("\n")[0]
        assert p["acc"] == verdict
    entry = results["summary"]["base"]["tiny_colours acc"]
    assert entry["runs"] == [0.6, 0.6] and entry["mean"] == pytest.approx(0.6)
    assert all(c["temperature"] == 0.5 and c["max_new_tokens"] == 8 and c["top_k"] is None
               for c in calls)
    assert len({c["seed"] for c in calls}) == len(calls) == 6  # 3 batches a run, 2 runs


@pytest.mark.parametrize("args, message", [
    (["--include-path", "."], "--include-path goes with --lmms-eval"),
    (["--lmms-eval", "mmstar_qwen", "--data", "x.jsonl"], "--data does not go with --lmms-eval"),
    (["--lmms-eval", "mmstar_qwen", "--analysis"], "--analysis does not go with --lmms-eval"),
    (["--lmms-eval", "mmstar_qwen", "--resume"], "--resume does not go with --lmms-eval"),
    (["--lmms-eval", "mmstar_qwen", "--include-path", "nowhere"], "is not a folder"),
])
def test_bad_options(args, message, tmp_path, capsys):
    assert ev.cli(["--size", "tiny", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_without_lmms_eval_one_line_names_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # its import fails, as uninstalled
    assert ev.cli(["--size", "tiny", "--lmms-eval", "mmstar_qwen",
                   "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --lmms-eval needs lmms-eval") and lmms.INSTALL in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


@needs_lmms_eval
@pytest.mark.parametrize("tasks, message", [
    ("no_such_task", "lmms-eval has no task 'no_such_task'"),
    ("tiny_colours@no_split", "lmms-eval cannot load tiny_colours@no_split: KeyError: 'no_split'"),
])
def test_tasks_that_cannot_run(tasks, message, task, tmp_path, capsys):
    """Refused before the model loads and before --out is made: a task lmms-eval does not know,
    a split the task lacks."""
    assert ev.cli(["--size", "tiny", "--lmms-eval", tasks, "--include-path", str(task),
                   "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err  # after the datasets library's progress lines
    assert err.endswith("\n") and err.count("error: ") == 1 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: ") and message in err.splitlines()[-1]
    assert not (tmp_path / "out").exists()
