"""
From replies to scores, as lmms-eval makes them: the prompts eval.py asks with, the letter or the
answer read from a reply and its verdict (`score`: eval.py's accuracies), the paper's GRPO reward,
then the figures of a run: accuracies per benchmark, their macro average and their paired
bootstrap, by response length too, and the table that prints them.
"""
import re
from decimal import Decimal

import torch

from processor import user_turn

try:  # the grader of the paper's rewards: sympy decides whether LaTeX and numbers are equal
    from mathruler.grader import grade_answer
    GRADER = "mathruler.grade_answer"
except ImportError:  # mathruler, or the pylatexenc it imports, is not installed
    grade_answer, GRADER = None, "normalised exact match (pip install mathruler pylatexenc)"

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_POST_PROMPT = "Answer with the option's letter from the given choices directly."
MATHVISION_MC = "Answer the question with the option's letter from the given choices directly."

# -----------------------------------------------------------------------------
# prompts

def question_text(sample, post_prompt):
    """The text of a question as lmms-eval 0.7.3's task writes it for the sample's benchmark:
    MMMU and MMStar as their Qwen3-VL tasks (mmmu_val_qwen: mmmu_doc_to_text_qwen3vl;
    mmstar_qwen: mmstar_doc_to_text, whose post-prompt follows the options without a space, as
    there), MathVision as mathvision_testmini (a \\boxed{} answer); any other benchmark as
    lmms-eval's default multiple-choice template, and an open answer with `post_prompt` if any."""
    question, options = sample["question"], sample["options"]
    benchmark = sample.get("benchmark", "")
    lettered = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options or []))
    if benchmark.lower().startswith("mmmu"):
        post = "Answer with the option letter only." if options else (
            "Please answer the question directly.")
        return f"Question: {question}\nOptions:\n{lettered}\n{post}"
    if benchmark.lower().startswith("mmstar") and options:
        listed = ", ".join(f"{letter}: {option}" for letter, option in zip(LETTERS, options))
        return f"Question: {question}\nOptions: {listed}Answer with the option letter only."
    if benchmark.lower().startswith("mathvision"):
        text = 'Please solve the problem step by step and put your answer in one "\\boxed{}".'
        return text + question + (f"\nChoices: {lettered}\n{MATHVISION_MC}" if options else "")
    post = MC_POST_PROMPT if options else post_prompt
    return question + (f"\n{lettered}" if options else "") + (f"\n{post}" if post else "")


def prompt_messages(sample, post_prompt):
    """The user turn as lmms-eval builds it: the images first, then question_text."""
    if "messages" in sample:
        return sample["messages"]
    return user_turn(sample["images"], question_text(sample, post_prompt))

# -----------------------------------------------------------------------------
# scoring

def answer_letter(answer, options):
    """The letter of a multiple-choice answer given as a letter or as the option's text."""
    answer = answer.strip()
    if len(answer) == 1 and answer in LETTERS[:len(options)]:
        return answer
    return next((letter for letter, option in zip(LETTERS, options)
                 if option.strip().casefold() == answer.casefold()), None)


def final_part(response):
    """The reply without its <think>...</think> (unclosed: to the end; opened by the prompt: all
    before </think>), and of that the last <answer>...</answer> span if there is one."""
    response = re.sub(r"<think>.*?(?:</think>|$)", "", response, flags=re.S)
    response = response.rsplit("</think>", 1)[-1]
    spans = re.findall(r"<answer>(.*?)</answer>", response, flags=re.S)
    return (spans[-1] if spans else response).strip()


# extract_mcq_answer's phrases, in its order ("the answer is A", "答案是 A")
PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is",
           "the best answer is", "best answer is", "the correct option is", "correct option is",
           "the best option is", "best option is", "the choice is", "choice is",
           "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
           "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选",
           "答えは")
FORMS = ((6, "({})"), (5, "{}."), (4, "{}:"), (3, "{})"), (2, "{} "))  # (priority, form)


def mcq_letter(text, letters):
    """lmms-eval's shared parser (0.7.3, tasks/_task_utils/mcq_extract.py: extract_mcq_answer,
    MMStar's): every letter found in every form, ranked: the reply's first character (10), its
    last (9), after an answer phrase (7), "(B)" (6), "B." (5), "B:" (4), "B)" (3), "B " (2), and
    only if none of those, anywhere (0); the highest rank wins, then the latest place."""
    text = text.strip()
    for char in ",.!?;:'\"":
        text = text.strip(char)
    text = f" {text} "
    lower, stripped, found = text.lower(), text.strip(), []  # (rank, place, letter)
    for letter in letters:
        found += [(rank, text.rfind(form.format(letter)), letter) for rank, form in FORMS
                  if form.format(letter) in text]
        for phrase in PHRASES:  # the first occurrence of the phrase, the letter's first after it
            at = lower.find(phrase)
            if at >= 0 and (place := text.find(letter, at + len(phrase))) >= 0:
                found.append((7, place, letter))
        if stripped.startswith(letter) and (len(stripped) == 1 or not stripped[1].isalpha()):
            found.append((10, 0, letter))
        if stripped.endswith(letter) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            found.append((9, len(text) - 1, letter))
    found = found or [(0, text.rfind(letter), letter) for letter in letters if letter in text]
    return max(found)[2] if found else None


def mmmu_letter(text, letters, options):
    """lmms-eval's MMMU parser (0.7.3, tasks/_task_utils/mmmu_mcq_utils.py:
    parse_mmmu_multi_choice_response): the letters in "(B)", else in "B ", else in "B.", the
    last one written; in a reply of over 5 words without one, the option whose text it names
    last. None where lmms-eval picks a random letter (a reply it cannot read is wrong here)."""
    for char in ",.!?;:'":
        text = text.strip(char)
    text = f" {text} "
    for form, place in (("({})", "({})"), ("{} ", " {} "), ("{}.", " {} ")):
        if found := [letter for letter in letters if form.format(letter) in text]:
            return max(found, key=lambda letter: text.rfind(place.format(letter)))
    named = [letter for letter, option in zip(letters, options) if option.lower() in text.lower()]
    if named and len(text.split()) > 5:
        return max(named, key=lambda letter: text.lower().rfind(options[LETTERS.index(letter)]
                                                               .lower()))
    return None


def extract_letter(text, options, benchmark=""):
    """The chosen option's letter as lmms-eval reads it for the benchmark: MMMU's parser for
    MMMU, the shared one for any other; only the sample's letters count."""
    letters = LETTERS[:len(options)]
    if benchmark.lower().startswith("mmmu"):
        return mmmu_letter(text, letters, options)
    return mcq_letter(text, letters)


ANSWER_FLAGS = ("the final answer is", "the answer is", "the correct answer is",
                "the answer should be")


def extract_open(text):
    """The content of the last \\boxed{...}; else, as lmms-eval's mathvision_process_results,
    what follows the last "the answer is" (and its kin) to the end of its line or sentence."""
    start, depth = text.rfind("\\boxed{"), 0
    if start < 0:
        for flag in ANSWER_FLAGS:
            for flag in (flag, flag.replace("the", "The")):
                if flag in text:
                    text = text.split(flag)[-1].strip().split("\n")[0].split(". ")[0]
                    text = text.rstrip(".")
        return text
    for end in range(start + 6, len(text)):  # to the brace that closes the one at start + 6
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return text[start + 7:end].strip()
    return text


NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:e[-+]?\d+)?")


def number(text):
    """The exact value of a plain number ("1,000" with thousands commas, "-2.5", "1e400"), else
    None: "1,5" is no number, and Decimal keeps 1e400 apart from 1e401 (floats: both inf)."""
    if not NUMBER.fullmatch(text) or not any(c.isdigit() for c in text):
        return None
    return Decimal(text.replace(",", ""))


def plain_grade(given, truth):
    """Equal after casefolding, dropping $ signs, spaces and a final period; numbers by value
    (a NaN or inf is no number here: its text is compared, so "NaN" answers "nan")."""
    given, truth = (" ".join(t.casefold().replace("$", "").split()).rstrip(".")
                    for t in (given, truth))
    values = number(given), number(truth)
    return values[0] == values[1] if None not in values else given == truth


def extract(response, sample):
    """The answer read from a reply: a letter (or None) with options, else a string."""
    text, options = final_part(response), sample.get("options")
    return (extract_letter(text, options, sample.get("benchmark", "")) if options
            else extract_open(text))


def score(response, sample):
    """Whether a reply answers a sample ({"answer", "options" (optional)}) correctly."""
    given, options = extract(response, sample), sample.get("options")
    if options:
        return given is not None and given == answer_letter(str(sample["answer"]), options)
    return bool(given) and bool((grade_answer or plain_grade)(given, str(sample["answer"])))

# -----------------------------------------------------------------------------
# the paper's GRPO reward and prompt (grpo.py)

# DeepSeek-R1's template, which the R1-style GRPO recipes for vision-language models reuse
SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a "
    "question, and the Assistant solves it. The assistant first thinks "
    "about the reasoning process in the mind and then provides the "
    "user with the answer. The reasoning process and answer are "
    "enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here "
    "</think><answer> answer here </answer>")
# the paper's format pattern, verbatim, read with re.match: a trailing space, an <answer> inside
# the think part or a second <think> still pass
FORMAT = re.compile(r"^<think>(?:(?!</think>).)*?</think>\s*<answer>(?:(?!</answer>).)*?</answer>"
                    r"\s*$", re.S)


def paper_reward(text, sample):
    """(format part, accuracy part) of a completion's reward as the paper's script gives it: 0.1
    when FORMAT matches, 0.9 when the FIRST <answer>...</answer>, stripped, is right by
    mathruler's grade_answer (a multiple-choice answer against its letter: `B. green` is not
    `B`). Stricter than score, which reads a reply as lmms-eval does."""
    first, solution = re.search(r"<answer>(.*?)</answer>", text, re.S), str(sample["answer"])
    if sample.get("options"):
        solution = answer_letter(solution, sample["options"])
    right = first is not None and grade_answer(first.group(1).strip(), solution)
    return 0.1 * bool(FORMAT.match(text)), 0.9 * bool(right)


def think_answer_turn(sample):
    """prompt_messages without the multiple-choice post-prompt ("Answer with the option's
    letter ... directly"): under SYSTEM_PROMPT a bare letter scores 0."""
    options = "".join(f"\n{letter}. {option}" for letter, option in
                      zip(LETTERS, sample.get("options") or []))
    return prompt_messages({**sample, "question": sample["question"] + options, "options": None},
                           None)

# -----------------------------------------------------------------------------
# figures

def accuracy(runs):
    """The accuracies of the K runs (K,) -> their mean, standard deviation (n - 1) and values."""
    std = runs.std().item() if len(runs) > 1 else 0.0
    return {"mean": runs.mean().item(), "std": std, "runs": runs.tolist()}


def interval(draws):
    return torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=draws.dtype)).tolist()


def weights(samples, rows):
    """Each row's share of its benchmark's accuracy: 1/n; with categories ("category"), the mean
    of the category means, as MMStar's score (lmms-eval's mmstar_aggregate_results)."""
    categories = [samples[i].get("category") for i in rows]
    sizes = {c: categories.count(c) for c in categories}
    return torch.tensor([1 / (len(sizes) * sizes[c]) for c in categories], dtype=torch.float64)


def figures(rows, correct, generator, share=None, draws=1000):
    """Each model's accuracy on the samples `rows` (each weighted by `share`, default 1/n); with
    two models the difference and its paired bootstrap: the samples drawn with replacement, one
    draw for both models. -> (figures, the bootstrapped differences (draws,) or None)."""
    share = torch.full((len(rows),), 1 / len(rows), dtype=torch.float64) if share is None else share
    entry = {"n": len(rows), **{name: accuracy(share @ v[rows]) for name, v in correct.items()}}
    if len(correct) < 2:
        return entry, None
    base, with_pvm = correct.values()  # (N, K) verdicts, 0 or 1
    differences = (with_pvm[rows] - base[rows]).mean(1)  # (n,): per sample, mean over the runs
    drawn = torch.randint(len(rows), (draws, len(rows)), generator=generator)
    resampled = (share[drawn] * differences[drawn]).sum(1) / share[drawn].sum(1)
    entry["difference"], entry["ci95"] = (share @ differences).item(), interval(resampled)
    return entry, resampled


def macro_average(figured, correct):
    """The macro average of several (figures, bootstrapped differences): run k's accuracy is the
    mean of their run k, its interval draws within each."""
    entries = [entry for entry, _ in figured]
    macro = {"n": sum(entry["n"] for entry in entries)}
    for name in correct:
        macro[name] = accuracy(torch.tensor([e[name]["runs"] for e in entries]).mean(0))
    if len(correct) == 2:
        macro["difference"] = sum(e["difference"] for e in entries) / len(entries)
        macro["ci95"] = interval(torch.stack([draws for _, draws in figured]).mean(0))
    return macro


def summarise(samples, correct, lengths):
    """Figures per benchmark and their macro average; then by quarter of response length, the
    quartiles cut within each benchmark (pooled, the long quarter would be mostly the benchmark
    of long answers: length confounded with benchmark), and each quarter's macro average. A
    sample's length is the mean over its replies (all runs, both models), so a quarter holds
    the same samples in both columns: a paired difference."""
    generator = torch.Generator().manual_seed(0)  # the same intervals on every call
    labels = [sample["benchmark"] for sample in samples]
    groups = {b: [i for i, label in enumerate(labels) if label == b] for b in dict.fromkeys(labels)}
    figured = {b: figures(rows, correct, generator, weights(samples, rows))
               for b, rows in groups.items()}
    quarters, by_benchmark, cuts = [[] for _ in range(4)], {}, {}
    for benchmark, rows in groups.items():
        mine = lengths[rows]
        cuts[benchmark] = torch.quantile(mine, torch.tensor([0.25, 0.5, 0.75]).double())
        quarter = torch.bucketize(mine, cuts[benchmark])  # 0: to the first cut (inclusive) ...
        by_benchmark[benchmark] = []
        for q in range(4):
            chosen = [row for row, k in zip(rows, quarter.tolist()) if k == q]
            if chosen:  # ties can leave a quarter empty
                quarters[q].append(figures(chosen, correct, generator))
                by_benchmark[benchmark].append({"quarter": q + 1, "tokens": [
                    lengths[chosen].min().item(), lengths[chosen].max().item()],
                    **quarters[q][-1][0]})
    return {"benchmarks": {b: entry for b, (entry, _) in figured.items()},
            "macro": macro_average(list(figured.values()), correct),
            "length_cuts": {b: c.tolist() for b, c in cuts.items()},
            "by_length": [{"quarter": q + 1, **macro_average(figured_q, correct)}
                          for q, figured_q in enumerate(quarters) if figured_q],
            "by_length_per_benchmark": by_benchmark}


def print_table(summary, names, K):
    """The table: benchmarks, their macro average, then by response length each benchmark's
    quarters (tokens: the range within) and each quarter's macro average over the benchmarks."""
    rows = [*summary["benchmarks"].items(), ("macro average", summary["macro"]), None]
    rows += [(f"{b} {e['tokens'][0]:.4g}-{e['tokens'][1]:.4g} tok", e)
             for b, quarters in summary["by_length_per_benchmark"].items() for e in quarters]
    rows += [(f"macro, quarter {e['quarter']}", e) for e in summary["by_length"]]
    print(f"{'benchmark':<32}{'n':>6}" + "".join(f"{name:>16}" for name in names)
          + (f"{'difference':>12}  95% CI (paired bootstrap)" if len(names) == 2 else ""))
    for row in rows:
        if row is None:
            print("by response length (generated tokens per sample, mean of its replies), "
                  "quartiles within each benchmark")
            continue
        label, entry = row
        line = f"{label:<32}{entry['n']:>6}"
        for name in names:
            std = f" ± {100 * entry[name]['std']:.1f}" if K > 1 else ""
            line += f"{100 * entry[name]['mean']:.1f}{std}".rjust(16)
        if len(names) == 2:
            low, high = (100 * x for x in entry["ci95"])
            line += f"{100 * entry['difference']:>+12.1f}  [{low:+.1f}, {high:+.1f}]"
        print(line)
