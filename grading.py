"""
From replies to scores, as lmms-eval makes them: the prompts eval.py asks with, the letter or the
answer read from a reply and its verdict (`score`: eval.py's accuracies and grpo.py's rewards),
then the figures of a run: accuracies per benchmark, their macro average and their paired
bootstrap, by response length too, and the table that prints them.
"""
import re
from decimal import Decimal

import torch

try:  # the grader of the paper's rewards: sympy decides whether LaTeX and numbers are equal
    from mathruler.grader import grade_answer
    GRADER = "mathruler.grade_answer"
except ImportError:  # mathruler, or the pylatexenc it imports, is not installed
    grade_answer, GRADER = None, "normalised exact match (pip install mathruler pylatexenc)"

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_POST_PROMPT = "Answer with the option's letter from the given choices directly."

# -----------------------------------------------------------------------------
# prompts

def prompt_messages(sample, post_prompt):
    """The user turn as lmms-eval builds it: the images, the question, then the options lettered
    one a line and its multiple-choice post-prompt, or for an open answer `post_prompt` if any."""
    if "messages" in sample:
        return sample["messages"]
    options = zip(LETTERS, sample["options"] or [])
    post = MC_POST_PROMPT if sample["options"] else post_prompt
    text = sample["question"] + "".join(f"\n{letter}. {option}" for letter, option in options)
    text += f"\n{post}" if post else ""
    content = [{"type": "image", "image": image} for image in sample["images"]]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]

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


def extract_letter(text, options):
    """The chosen option's letter by the rules of lmms-eval's parsers, strongest first: the last
    explicit "answer is X" / "answer: (X)" / "correct option is X", the last "(X)", a leading
    letter that stands alone ("B", "B.", "Option B", "B: ..."; not "A circle"), else the option
    whose text the reply names last. None if nothing fits."""
    valid, text = LETTERS[:len(options)], text.replace("*", "")  # no markdown bold
    explicit = re.findall(rf"(?i:answer|option|choice)\s*(?:is|:)[\s:]*(?i:option\s+)?"
                          rf"\(?([{valid}])\)?(?![A-Za-z])", text)
    bracketed = re.findall(rf"\(([{valid}])\)", text)
    if explicit or bracketed:
        return (explicit or bracketed)[-1]
    lone = (re.match(rf"(?i:option\s+)?([{valid}])(?:[.:,)\]]|\s*$|\s*\n)", text)
            or re.fullmatch(rf"\W*([{valid.lower()}])\W*", text))
    if lone:
        return lone.group(1).upper()
    named = [((match.end(), len(option)), letter) for letter, option in zip(valid, options)
             for match in re.finditer(rf"(?<!\w){re.escape(option.strip())}(?!\w)", text, re.I)]
    # the last named; of two ending there the longer ("dark red" over "red"); max keeps the first
    # of equal keys, the earlier letter
    return max(named, key=lambda pair: pair[0])[1] if named else None


def extract_open(text):
    """The content of the last \\boxed{...}, else the text."""
    start, depth = text.rfind("\\boxed{"), 0
    if start < 0:
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
    text = final_part(response)
    return extract_letter(text, sample["options"]) if sample.get("options") else extract_open(text)


def score(response, sample):
    """Whether a reply answers a sample ({"answer", "options" (optional)}) correctly."""
    given, options = extract(response, sample), sample.get("options")
    if options:
        return given is not None and given == answer_letter(str(sample["answer"]), options)
    return bool(given) and bool((grade_answer or plain_grade)(given, str(sample["answer"])))

# -----------------------------------------------------------------------------
# figures

def accuracy(runs):
    """The accuracies of the K runs (K,) -> their mean, standard deviation (n - 1) and values."""
    std = runs.std().item() if len(runs) > 1 else 0.0
    return {"mean": runs.mean().item(), "std": std, "runs": runs.tolist()}


def interval(draws):
    return torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=draws.dtype)).tolist()


def figures(rows, correct, generator, draws=1000):
    """Each model's accuracy on the samples `rows`; with two models the difference and its paired
    bootstrap: the samples drawn with replacement, one draw for both models. -> (figures, the
    bootstrapped differences (draws,) or None)."""
    entry = {"n": len(rows), **{name: accuracy(v[rows].mean(0)) for name, v in correct.items()}}
    if len(correct) < 2:
        return entry, None
    base, with_pvm = correct.values()  # (N, K) verdicts, 0 or 1
    differences = (with_pvm[rows] - base[rows]).mean(1)  # (n,): per sample, mean over the runs
    resampled = differences[torch.randint(len(rows), (draws, len(rows)), generator=generator)]
    entry["difference"], entry["ci95"] = differences.mean().item(), interval(resampled.mean(1))
    return entry, resampled.mean(1)


def summarise(samples, correct, lengths):
    """Figures per benchmark, their macro average (its interval draws within each benchmark) and
    by quarter of response length. A sample's length is the mean over its replies (all runs,
    both models), so a quarter holds the same samples in both columns: a paired difference."""
    generator = torch.Generator().manual_seed(0)  # the same intervals on every call
    labels = [sample["benchmark"] for sample in samples]
    groups = {b: [i for i, label in enumerate(labels) if label == b] for b in dict.fromkeys(labels)}
    figured = {benchmark: figures(rows, correct, generator) for benchmark, rows in groups.items()}
    benchmarks = {benchmark: entry for benchmark, (entry, _) in figured.items()}
    macro = {"n": len(samples)}
    for name in correct:  # run k's macro average: the mean of the benchmarks' run k
        macro[name] = accuracy(torch.tensor([b[name]["runs"] for b in benchmarks.values()]).mean(0))
    if len(correct) == 2:
        macro["difference"] = sum(b["difference"] for b in benchmarks.values()) / len(benchmarks)
        macro["ci95"] = interval(torch.stack([draws for _, draws in figured.values()]).mean(0))
    cuts = torch.quantile(lengths, torch.tensor([0.25, 0.5, 0.75], dtype=lengths.dtype))
    quarter = torch.bucketize(lengths, cuts)  # 0: up to the first cut (inclusive) ... 3: above
    quarters = [(quarter == q).nonzero().flatten().tolist() for q in range(4)]
    by_length = [{"tokens": [lengths[rows].min().item(), lengths[rows].max().item()],
                  **figures(rows, correct, generator)[0]}
                 for rows in quarters if rows]  # ties can leave a quarter empty
    return {"benchmarks": benchmarks, "macro": macro, "length_cuts": cuts.tolist(),
            "by_length": by_length}


def print_table(summary, names, K):
    rows = [*summary["benchmarks"].items(), ("macro average", summary["macro"])]
    rows += [(f"{e['tokens'][0]:.4g}-{e['tokens'][1]:.4g} tokens", e) for e in summary["by_length"]]
    print(f"{'benchmark':<24}{'n':>6}" + "".join(f"{name:>16}" for name in names)
          + (f"{'difference':>12}  95% CI (paired bootstrap)" if len(names) == 2 else ""))
    for k, (label, entry) in enumerate(rows):
        if k == len(summary["benchmarks"]) + 1:
            print("by response length (generated tokens per sample, mean of its replies)")
        line = f"{label:<24}{entry['n']:>6}"
        for name in names:
            std = f" ± {100 * entry[name]['std']:.1f}" if K > 1 else ""
            line += f"{100 * entry[name]['mean']:.1f}{std}".rjust(16)
        if len(names) == 2:
            low, high = (100 * x for x in entry["ci95"])
            line += f"{100 * entry['difference']:>+12.1f}  [{low:+.1f}, {high:+.1f}]"
        print(line)
