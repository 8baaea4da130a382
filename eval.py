"""
Measure what PVM is for: accuracy on a benchmark, the base and the PVM model on the same samples,
and how the difference changes with the length of the answer (the paper's claim: it grows).

    python eval.py --model Qwen/Qwen3-VL-4B-Instruct --data mmstar.jsonl
    python eval.py --data mmstar.jsonl --pvm out/pvm.safetensors --compare \\
        --samples 4 --temperature 0.7                 # the paper's protocol: 4 sampled runs
    python eval.py --size tiny [--pvm out/pvm.safetensors --compare]   # CPU, no download
    python eval.py --size tiny --analysis     # also the paper's two analyses, over every reply

--data: JSON lines {"id", "images": [paths relative to the file], "question", "options": [...]
(optional), "answer" (with options: a letter or an option's text), "benchmark" (optional)}.
Prompts as lmms-eval writes them, verdicts by `score`. The table goes to stdout, every figure to
--out/results.json, every reply to --out/predictions.jsonl; with --analysis, the image's share of
attention and the logit lens's convergence layer at every generated token (report.py) to
--out/analysis.json and --out/analysis.png. Left out on purpose: downloading and
converting benchmarks, LLM judges, lmms-eval's random letter for a reply it cannot parse (wrong
here), images placed inside the question (MMMU's <image 1>: all images come first), several GPUs.
"""
import argparse
import json
import re
import sys
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

import common
import data
import generate
import report
from load_qwen import load_model, resolve_checkpoint
from processor import encode_chat, framing_token, left_pad, load_tokenizer, tiny_tokenizer
from pvm import load_pvm

try:  # the grader of the paper's rewards: sympy decides whether LaTeX and numbers are equal
    from mathruler.grader import grade_answer
    GRADER = "mathruler.grade_answer"
except ImportError:  # mathruler, or the pylatexenc it imports, is not installed
    grade_answer, GRADER = None, "normalised exact match (pip install mathruler pylatexenc)"

PAD_ID = 151643  # <|endoftext|>, the official tokenizer's pad token (never read: masked)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_POST_PROMPT = "Answer with the option's letter from the given choices directly."

# -----------------------------------------------------------------------------
# samples and prompts

def read_samples(path):
    """The samples of a JSON-lines benchmark file; an error names file and line."""
    return data.read_jsonl(path, partial(check_sample, benchmark=Path(path).stem))


def check_sample(record, root, where, benchmark):
    """A benchmark record as a sample, its image paths relative to the file's folder `root`; its
    benchmark, if the record names none, the file's name."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    question, options, answer = record.get("question"), record.get("options"), record.get("answer")
    images = record.get("images") or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(question, str):
        raise ValueError('"question" must be a string')
    if answer is None or isinstance(answer, (dict, list, bool)) or not str(answer).strip():
        raise ValueError('no "answer"')
    if options is not None and not (isinstance(options, list) and 0 < len(options) <= 26
                                    and all(isinstance(o, str) and o.strip() for o in options)):
        raise ValueError('"options" must be a list of 1 to 26 non-empty strings')
    if token := framing_token(question + "".join(options or [])):
        raise ValueError(f"the text holds {token}, a special token of the chat format")
    letter = options and answer_letter(str(answer), options)
    if options and letter is None:
        raise ValueError(f"the answer {answer!r} is neither an option's letter nor an option")
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise ValueError('"images" must be a list of paths')
    return {"id": str(record.get("id", where)),
            "benchmark": str(record.get("benchmark", benchmark)),
            "images": [str(root / image) for image in images],  # absolute ones stay so
            "question": question, "options": options, "answer": letter or str(answer),
            "where": where}


def builtin_sample(messages, where):
    """A sample of data.py's built-in task. It keeps the prompt train.py trains on ("... A. red
    B. green ... Answer with the letter."): a tiny model trained for a minute knows no other.
    Its options are read back from that text, for scoring."""
    image, text = messages[0]["content"][0]["image"], messages[0]["content"][1]["text"]
    return {"id": where, "benchmark": "built-in", "images": [image], "question": text,
            "options": re.findall(r"\b[A-F]\. (\w+)", text), "answer": messages[1]["content"],
            "where": where, "messages": messages[:1]}


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
    explicit = re.findall(rf"(?i:answer|option|choice)\s*(?:is|:)\s*:?\s*(?i:option\s+)?"
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


def plain_grade(given, truth):
    """Equal after casefolding, dropping $ signs, spaces and a final period; numbers by value."""
    given, truth = (" ".join(t.casefold().replace("$", "").split()).rstrip(".")
                    for t in (given, truth))
    try:
        return float(given.replace(",", "")) == float(truth.replace(",", ""))
    except ValueError:
        return given == truth


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
# generation

def sampling(args, seed):
    """generate's options from the command line, with this seed."""
    options = ("max_new_tokens", "temperature", "top_k", "top_p")
    return {"seed": seed, **{option: getattr(args, option) for option in options}}


def respond(model, samples, tokenizer, args, name):
    """Each sample's --samples replies as (generated tokens, text), in the samples' order. A
    batch holds prompts of similar length (little padding), the longest first (a batch too big
    for memory fails at once); the seed is the batch's, so the models of --compare draw alike."""
    order = sorted(range(len(samples)), key=lambda i: -samples[i]["length"])
    stops, K, replies = set(model.config.eos_token_ids), args.samples, [[] for _ in samples]
    for start in tqdm(range(0, len(order), args.batch_size), desc=name, file=sys.stderr):
        batch = order[start:start + args.batch_size]
        prompts = [encode_chat(tokenizer, prompt_messages(samples[i], args.post_prompt))
                   for i in batch]
        rows = generate.generate_batch(  # it moves the batch to the model's device
            model, *left_pad(prompts, PAD_ID), num_samples=K, **sampling(args, args.seed + start))
        for row, ids in enumerate(rows):  # prompt 0's K replies, then prompt 1's, ...
            ids = ids[:-1] if ids and ids[-1] in stops else ids  # the stop token has no text
            replies[batch[row // K]].append((len(ids), tokenizer.decode(ids)))
    return replies

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

# -----------------------------------------------------------------------------
# the paper's two analyses over every reply (--analysis)

def check_analysis(args):
    """Refuse, before any work, an --analysis that could not be drawn or would ignore an option."""
    try:
        import matplotlib  # noqa: F401  (optional: only the figure needs it)
    except ImportError:
        raise ValueError("--analysis needs matplotlib (pip install matplotlib)") from None
    if args.batch_size is not None:
        raise ValueError("--analysis generates one prompt at a time: leave out --batch-size")


def respond_watched(model, samples, tokenizer, args, name):
    """respond's replies, each generated alone under a report.AttentionReport, and each reply's
    analysis record. One prompt at a time: the report watches one prompt (its image tokens, the
    query at its last position), and its hooks need eager steps, without a CUDA graph, in any
    case. Sample i's run k draws with seed --seed + i * K + k, the same for both models."""
    stops, K, replies, records = set(model.config.eos_token_ids), args.samples, [], []
    for i, sample in enumerate(tqdm(samples, desc=f"{name}, analysed", file=sys.stderr)):
        prompt = encode_chat(tokenizer, prompt_messages(sample, args.post_prompt))
        replies.append([])
        for run in range(K):
            with report.AttentionReport(model, prompt[0]) as watcher:
                options = sampling(args, args.seed + i * K + run)
                ids = list(generate.generate(model, *prompt, cuda_graph=False, **options))
            records.append({"id": sample["id"], "benchmark": sample["benchmark"], "model": name,
                            "run": run,  # the stop token counts here
                            **report.analysis_record(watcher.summary(ids))})
            ids = ids[:-1] if ids[-1] in stops else ids  # the stop token has no text
            replies[-1].append((len(ids), tokenizer.decode(ids)))
    return replies, records


def write_analysis(records, model, out):
    """analysis.json: each model's records (`records`: model name -> its records) pooled by
    generated position, then every record; analysis.png draws the pooled numbers."""
    groups = report.layer_groups(len(model.layers))
    models = {name: {"answers": len(mine), "with_image": sum(r["image_tokens"] > 0 for r in mine),
                     "buckets": report.analysis_buckets(mine, groups)}
              for name, mine in records.items()}
    analysis = {"layers": len(model.layers), "pvm_layers": list(model.config.pvm_layers),
                "groups": {g: layers.tolist() for g, layers in groups.items()},
                "models": models, "answers": [r for mine in records.values() for r in mine]}
    (out / "analysis.json").write_text(json.dumps(analysis) + "\n")
    report.analysis_figure(analysis).savefig(out / "analysis.png", dpi=120)

# -----------------------------------------------------------------------------
# the command

def load_samples(args, tokenizer):
    if args.data:
        return read_samples(args.data)[:args.limit]
    if not args.size:
        raise ValueError("--data FILE is needed (or --size tiny, for the built-in task)")
    # train.py's held-out split: its defaults (data.py's) and the same seed draw the same samples
    held_out, _, _ = data.load_data(None, tokenizer, data.MAX_LEN, args.seed, data.EVAL_SAMPLES,
                                    data.SYNTHETIC_SAMPLES)
    return [builtin_sample(messages, where) for messages, where in held_out][:args.limit]


def main(args):
    if args.compare and not args.pvm:
        raise ValueError("--compare needs --pvm FILE")
    if args.samples > 1 and not args.temperature:
        raise ValueError("--samples > 1 needs --temperature > 0: greedy runs are all the same")
    if args.analysis:
        check_analysis(args)
    cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (8 if cuda else 1)
    args.max_new_tokens = args.max_new_tokens or (32 if args.size else 1024)
    args.model = None if args.size else args.model  # results.json: no checkpoint was read
    checkpoint = args.model and resolve_checkpoint(args.model)
    tokenizer = load_tokenizer(checkpoint) if checkpoint else tiny_tokenizer()
    samples = load_samples(args, tokenizer)
    messages = [(prompt_messages(sample, args.post_prompt), sample["where"]) for sample in samples]
    for sample, (tokens, _) in zip(samples, data.sample_lengths(messages, tokenizer)):
        sample["length"] = tokens  # of the prompt (images read from their headers), for batches
    model = (load_model(checkpoint, args.device, torch.bfloat16 if cuda else torch.float32)
             if checkpoint else common.tiny_model(args.seed).to(args.device))
    if args.pvm:  # before any run: a file that does not fit fails at once
        load_pvm(model, args.pvm)
    trained = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".gate_alpha")}
    names = ["base", "pvm"] if args.compare else ["pvm"] if args.pvm else ["base"]
    correct, predictions, records = {}, [], {}
    lengths = torch.zeros(len(samples), dtype=torch.float64)
    for name in names:
        gates = {k: v if name == "pvm" else torch.zeros_like(v) for k, v in trained.items()}
        model.load_state_dict(gates, strict=False)  # gates at 0: exactly the base model (pvm.py)
        if args.analysis:
            replies, records[name] = respond_watched(model, samples, tokenizer, args, name)
        else:
            replies = respond(model, samples, tokenizer, args, name)
        correct[name] = torch.zeros(len(samples), args.samples, dtype=torch.float64)
        for i, sample in enumerate(samples):
            for run, (tokens, text) in enumerate(replies[i]):
                correct[name][i, run] = score(text, sample)
                lengths[i] += tokens / (len(names) * args.samples)
                predictions.append({"id": sample["id"], "benchmark": sample["benchmark"],
                                    "model": name, "run": run, "tokens": tokens, "response": text,
                                    "extracted": extract(text, sample), "answer": sample["answer"],
                                    "correct": bool(correct[name][i, run])})
    summary = summarise(samples, correct, lengths)
    print_table(summary, names, args.samples)
    print(f"open answers graded by {GRADER}")
    settings = ("model", "size", "data", "pvm", "samples", "temperature", "top_p", "top_k",
                "max_new_tokens", "post_prompt", "seed", "analysis")
    results = {**{k: getattr(args, k) for k in settings}, "grader": GRADER, "models": names,
               **summary}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = (json.dumps(prediction, ensure_ascii=False) + "\n" for prediction in predictions)
    (out / "predictions.jsonl").write_text("".join(lines), encoding="utf-8")
    print(f"wrote {out / 'results.json'} and {out / 'predictions.jsonl'}", file=sys.stderr)
    if args.analysis:
        write_analysis(records, model, out)
        print(f"wrote {out / 'analysis.json'} and {out / 'analysis.png'}", file=sys.stderr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Accuracy on a benchmark, with and without PVM.")
    p.add_argument("--model", default="Qwen/Qwen3-VL-4B-Instruct", help="checkpoint dir or hub id")
    p.add_argument("--size", choices=["tiny"], help="tiny: train.py's random backbone of --seed "
                   "in place of --model; without --data, the built-in task's held-out split")
    p.add_argument("--data", help="JSON-lines benchmark file, image paths relative to it")
    p.add_argument("--pvm", help="PVM weights to attach (train.py's pvm.safetensors)")
    p.add_argument("--compare", action="store_true", help="with --pvm: the base model as well")
    p.add_argument("--samples", type=int, default=1, help="runs per question (the paper: 4)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the paper: 0.7)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (default: off)")
    p.add_argument("--top-k", type=int, help="top-k sampling (default: off)")
    p.add_argument("--max-new-tokens", type=int, help="default 1024; 32 with --size tiny")
    p.add_argument("--post-prompt", help="a line after open questions (default: none)")
    p.add_argument("--batch-size", type=int, help="prompts at once (default: 8 on CUDA, 1 on CPU)")
    p.add_argument("--limit", type=int, help="the first N samples only")
    p.add_argument("--seed", type=int, default=0, help="of sampling; with --size tiny also of the "
                   "backbone and the split, as train.py's --seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (the default where there is one) or cpu")
    p.add_argument("--analysis", action="store_true", help="also the image's share of attention "
                   "and the logit lens at every token: analysis.json and .png (needs matplotlib; "
                   "one prompt at a time)")
    p.add_argument("--out", default="out/eval", help="directory for results.json, predictions")
    return common.check_options(p.parse_args(argv))


cli = common.command(main, parse_args)

if __name__ == "__main__":
    sys.exit(cli())
