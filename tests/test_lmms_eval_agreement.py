"""eval.py reads a reply's letter as lmms-eval does. The oracle is lmms-eval 0.7.3's own
parsers: extract_mcq_answer (lmms_eval/tasks/_task_utils/mcq_extract.py, the shared one, MMStar's)
and parse_mmmu_multi_choice_response (lmms_eval/tasks/_task_utils/mmmu_mcq_utils.py, MMMU's).
The table holds what those two functions returned for each reply, run on lmms-eval 0.7.3, so
that it checks without lmms-eval too; where lmms-eval is installed beside the project
(requirements-eval.txt, as CI does) its two files are loaded by path and asked again, live.
The one deliberate difference: where the MMMU parser picks a random letter (no letter in the
reply), eval.py reads none, so the reply is wrong (None in the table: its random pick varied)."""
import importlib.util
import random
from pathlib import Path

import pytest

import grading

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["square", "circle", "triangle"]
CASES = [  # (reply, options, extract_mcq_answer's letter, parse_mmmu_multi_choice_response's)
    ("C", COLOURS, 'C', 'C'),
    ("C.", COLOURS, 'C', 'C'),
    ("(C)", COLOURS, 'C', 'C'),
    ("C) blue", COLOURS, 'C', None),
    ("C: blue", COLOURS, 'C', None),
    ("C. blue", COLOURS, 'C', 'C'),
    ("c", COLOURS, None, None),
    ("The answer is C.", COLOURS, 'C', 'C'),
    ("The answer is (C).", COLOURS, 'C', 'C'),
    ("Answer: C", COLOURS, 'C', 'C'),
    ("**Answer:** C", COLOURS, 'C', 'C'),
    ("The correct option is C.", COLOURS, 'C', 'C'),
    ("Option C", COLOURS, 'C', 'C'),
    ("C is correct", COLOURS, 'C', 'C'),
    ("None of A or B; it is C.", COLOURS, 'C', 'C'),
    ("I think C, not A", COLOURS, 'A', 'A'),
    ("The answer is (B), not C.", COLOURS, 'C', 'B'),
    ("blue", COLOURS, None, None),
    ("The shape is blue.", COLOURS, None, None),
    ("Looking at the image, the shape is clearly filled in blue. So the answer is C.", COLOURS,
     'C', 'C'),
    ("Option (A) is not right; the colour is (C).", COLOURS, 'C', 'C'),
    ("A", COLOURS, 'A', 'A'),
    ("E", COLOURS, None, None),
    ("I cannot tell from this image.", COLOURS, None, None),
    ("", COLOURS, None, None),
    ("B\n\nBecause the fill is green", COLOURS, 'B', 'B'),
    ("Between A and C, I choose C.", COLOURS, 'C', 'C'),
    ("My answer is C", COLOURS, 'C', 'C'),
    ("答案是 C", COLOURS, 'C', 'C'),
    ("\\boxed{C}", COLOURS, 'C', None),
    ("The final answer is $\\boxed{C}$.", COLOURS, 'C', None),
    ("C and D", COLOURS, 'C', 'D'),
    ("Both A and C are plausible, but C fits best.", COLOURS, 'C', 'C'),
    ("(C) blue", COLOURS, 'C', 'C'),
    ("[C]", COLOURS, 'C', None),
    ("Answer: (C) blue.", COLOURS, 'C', 'C'),
    ("The colour of the shape is blue, which is option C", COLOURS, 'C', 'C'),
    ("Clearly C", COLOURS, 'C', 'C'),
    ("It's C!", COLOURS, 'C', 'C'),
    ("A) red is wrong; C) blue is right", COLOURS, 'A', 'C'),
    ("The answer is C.\n\nA is wrong.", COLOURS, 'A', 'A'),
    ("The fill looks like a deep blue to me, nothing else", COLOURS, None, 'C'),
    ("the answer is c", COLOURS, None, None),
    ("D. yellow", COLOURS, 'D', 'D'),
    ("Red or blue? Blue, so C.", COLOURS, 'C', 'C'),
    ("CD", COLOURS, 'D', 'D'),
    ("Final answer: C", COLOURS, 'C', 'C'),
    ("A circle.", SHAPES, 'A', 'A'),
    ("A square.", SHAPES, 'A', 'A'),
    ("It is a triangle, clearly drawn in the middle of it", SHAPES, None, 'C'),
    ("B", SHAPES, 'B', 'B'),
]


def lmms_eval_parsers():
    """lmms-eval's two parser files, loaded by path where lmms-eval is installed, else None."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None:
        return None
    modules = []
    for name in ("mcq_extract", "mmmu_mcq_utils"):
        path = Path(spec.origin).parent / "tasks" / "_task_utils" / f"{name}.py"
        module_spec = importlib.util.spec_from_file_location(name, path)
        modules.append(importlib.util.module_from_spec(module_spec))
        module_spec.loader.exec_module(modules[-1])
    return modules


LIVE = lmms_eval_parsers()


def test_the_table_is_wide():
    assert len(CASES) >= 40 and {len(options) for _, options, _, _ in CASES} == {3, 4}


@pytest.mark.parametrize("reply, options, shared, mmmu", CASES)
def test_letters_agree_with_lmms_eval(reply, options, shared, mmmu):
    letters = grading.LETTERS[:len(options)]
    assert grading.extract_letter(reply, options, "mmstar") == shared
    assert grading.extract_letter(reply, options, "MMMU_val") == mmmu
    if LIVE:
        mcq_extract, mmmu_mcq_utils = LIVE
        assert (mcq_extract.extract_mcq_answer(reply, list(letters)) or None) == shared
        picks = {mmmu_mcq_utils.parse_mmmu_multi_choice_response(
            reply, list(letters), dict(zip(letters, options))) for _ in range(40)}
        assert picks == {mmmu} if mmmu else len(picks) > 1  # several: its random letter


def test_score_reads_after_think_and_answer_tags():
    """lmms-eval's Qwen3-VL model drops the <think> part before a task parses the reply;
    eval.py also reads the last <answer> span (the paper's GRPO format)."""
    sample = {"options": COLOURS, "answer": "C", "benchmark": "mmstar"}
    for reply, verdict in [("<think>Maybe A.</think>C", True),
                           ("<think>The answer is C.</think><answer>B</answer>", False),
                           ("<think>A? No, blue.</think>\n<answer>C</answer>", True),
                           ("the fill is blue</think>\n\nC", True),  # the prompt opened it
                           ("<think>It is blue, so C. Let me check the edges", False)]:
        assert grading.score(reply, sample) is verdict
