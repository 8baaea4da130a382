"""
Measure what PVM is for: accuracy on a benchmark, the base and the PVM model on the same samples,
and how the difference changes with the length of the answer (the paper's claim: it grows).

    python eval.py --model Qwen/Qwen3-VL-4B-Instruct --data mmstar.jsonl
    python eval.py --data mmstar.jsonl --pvm out/pvm.safetensors --compare \\
        --samples 4 --temperature 0.7                 # the paper's protocol: 4 sampled runs
    python eval.py --size tiny [--pvm out/pvm.safetensors --compare]   # CPU, no download
    python eval.py --size tiny --analysis     # also the paper's two analyses, over every reply
    python eval.py --lmms-eval mmstar_qwen --pvm out/pvm.safetensors --compare    # see lmms.py

--data: JSON lines {"id", "images": [paths relative to the file], "question", "options": [...]
(optional), "answer" (with options: a letter or an option's text), "benchmark" (optional)}.
Prompts as lmms-eval writes them, verdicts by `score`. The table goes to stdout, every figure to
--out/results.json, every reply to --out/predictions.jsonl; with --analysis, the image's share of
attention and the logit lens's convergence layer at every generated token (report.py) to
--out/analysis.json and --out/analysis.png. A run never replaces an earlier one in --out
without --overwrite; predictions.jsonl grows as answers come, and --resume continues a run that
was stopped (Ctrl-C, a kill, a sample that failed) with the settings it had. --base CHECKPOINT
makes the base column another checkpoint's (Qwen3-VL against a GRPO-tuned model), paired as
--compare's. --lmms-eval TASKS runs lmms-eval's own tasks, prompts and scores in place of
--data (lmms.py). Left out on purpose here: downloading and converting benchmarks, LLM judges,
lmms-eval's random letter for a reply it cannot parse (wrong here), images placed inside the
question (MMMU's <image 1>: all images come first), several GPUs.
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
import lmms
import report
from grading import GRADER, answer_letter, extract, print_table, prompt_messages, score, summarise
from load_qwen import load_model, resolve_checkpoint
from processor import encode_chat, framing_token, left_pad, load_tokenizer, tiny_tokenizer
from pvm import load_pvm

PAD_ID = 151643  # <|endoftext|>, the official tokenizer's pad token (never read: masked)
RUNS_AT_ONCE = 8  # a prompt's runs per generate call (the paper's 4 in one)

# -----------------------------------------------------------------------------
# samples and prompts

def read_samples(path):
    """The samples of a JSON-lines benchmark file; an error names file and line."""
    return data.read_jsonl(path, partial(check_sample, benchmark=Path(path).stem, seen={}))


def check_sample(record, root, where, benchmark, seen):
    """A benchmark record as a sample, its image paths relative to the file's folder `root`; its
    benchmark, if the record names none, the file's name. `seen`: id -> where, of the lines
    before (two samples of one id would mix their predictions)."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    question, options, answer = record.get("question"), record.get("options"), record.get("answer")
    images = record.get("images", [])  # 0 or null is no list of paths
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
    sample_id = str(record.get("id", where))
    if sample_id in seen:
        raise ValueError(f"the id {sample_id!r} again (first at {seen[sample_id]})")
    seen[sample_id] = where
    return {"id": sample_id,
            "benchmark": str(record.get("benchmark", benchmark)),
            "images": [str(root / image) for image in images],  # absolute ones stay so
            "question": question, "options": options, "answer": letter or str(answer),
            "category": None if record.get("category") is None else str(record["category"]),
            "where": where}


def builtin_sample(messages, where):
    """A sample of data.py's built-in task. It keeps the prompt train.py trains on ("... A. red
    B. green ... Answer with the letter."): a tiny model trained for a minute knows no other.
    Its options are read back from that text, for scoring."""
    image, text = messages[0]["content"][0]["image"], messages[0]["content"][1]["text"]
    return {"id": where, "benchmark": "built-in", "images": [image], "question": text,
            "options": re.findall(r"\b[A-F]\. (\w+)", text), "answer": messages[1]["content"],
            "where": where, "messages": messages[:1]}


# -----------------------------------------------------------------------------
# generation

def sampling(args, seed):
    """generate's options from the command line, with this seed."""
    options = ("max_new_tokens", "temperature", "top_k", "top_p")
    return {"seed": seed, **{option: getattr(args, option) for option in options}}


def encode(sample, tokenizer, args):
    """The sample's prompt for generate; an image that fails to decode is named with its line."""
    try:
        return encode_chat(tokenizer, prompt_messages(sample, args.post_prompt))
    except ValueError as e:
        raise ValueError(f"{sample['where']}: {e}") from None


def respond(model, samples, tokenizer, args, name, done, keep):
    """Each sample's --samples replies as (generated tokens, text), handed to keep(i, replies) as
    its batch ends; a batch of samples all in `done` (ids a stopped run kept) is skipped. A batch
    holds prompts of similar length (little padding), the longest first (a batch too big for
    memory fails at once). A prompt's runs are drawn RUNS_AT_ONCE at a time, so memory grows
    with the batch, not with --samples; the seed is the batch's and the chunk's, so the models
    of --compare draw alike, and a resumed run as the run it continues."""
    order = sorted(range(len(samples)), key=lambda i: -samples[i]["length"])
    stops, K = set(model.config.eos_token_ids), args.samples
    for start in tqdm(range(0, len(order), args.batch_size), desc=name, file=sys.stderr):
        batch = order[start:start + args.batch_size]
        if all(samples[i]["id"] in done for i in batch):
            continue
        prompts = [encode(samples[i], tokenizer, args) for i in batch]
        replies = [[] for _ in batch]
        for first in range(0, K, RUNS_AT_ONCE):
            k, seed = min(RUNS_AT_ONCE, K - first), args.seed + start + first * len(order)
            try:  # it moves the batch to the model's device
                rows = generate.generate_batch(model, *left_pad(prompts, PAD_ID), num_samples=k,
                                               **sampling(args, seed))
            except ValueError as e:  # a prompt over the context: the batch's longest
                raise ValueError(f"{samples[batch[0]]['where']}: {e}") from None
            for row, ids in enumerate(rows):  # prompt 0's k replies, then prompt 1's, ...
                ids = ids[:-1] if ids and ids[-1] in stops else ids  # the stop token has no text
                replies[row // k].append((len(ids), tokenizer.decode(ids)))
        for i, mine in zip(batch, replies):
            keep(i, mine)

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


def respond_watched(model, samples, tokenizer, args, name, keep):
    """respond's replies, each generated alone under a report.AttentionReport, and each reply's
    analysis record (returned). One prompt at a time: the report watches one prompt (its image
    tokens, the query at its last position), and its hooks need eager steps, without a CUDA
    graph, in any case. Sample i's run k draws with seed --seed + i * K + k, for both models."""
    stops, K, records = set(model.config.eos_token_ids), args.samples, []
    for i, sample in enumerate(tqdm(samples, desc=f"{name}, analysed", file=sys.stderr)):
        prompt, replies = encode(sample, tokenizer, args), []
        for run in range(K):
            with report.AttentionReport(model, prompt[0]) as watcher:
                options = sampling(args, args.seed + i * K + run)
                try:
                    ids = list(generate.generate(model, *prompt, cuda_graph=False, **options))
                except ValueError as e:  # a prompt over the context
                    raise ValueError(f"{sample['where']}: {e}") from None
            records.append({"id": sample["id"], "benchmark": sample["benchmark"], "model": name,
                            "run": run,  # the stop token counts here
                            **report.analysis_record(watcher.summary(ids))})
            ids = ids[:-1] if ids[-1] in stops else ids  # the stop token has no text
            replies.append((len(ids), tokenizer.decode(ids)))
        keep(i, replies)
    return records


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
    write_text(out / "analysis.json", json.dumps(analysis) + "\n")
    common.write_atomic(out / "analysis.png",
                        lambda tmp: report.analysis_figure(analysis).savefig(tmp, format="png",
                                                                             dpi=120))

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


SETTINGS = ("model", "size", "data", "pvm", "base", "compare", "samples", "temperature", "top_p",
            "top_k", "max_new_tokens", "post_prompt", "batch_size", "limit", "seed", "analysis")


def write_text(path, text):
    """A text file written whole or not at all (a full disk, a kill): the previous one stays."""
    common.write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def open_out(args, settings):
    """The output folder, checked before any work. A run never replaces an earlier one there
    without --overwrite; --resume continues it, if its settings are these. -> the predictions
    it kept, by (model, id): a sample's runs are kept whole (a kill can cut the last line)."""
    out, kept = Path(args.out), {}
    file = out / "predictions.jsonl"
    if file.exists() and not (args.resume or args.overwrite):
        raise ValueError(f"{out} holds an earlier run: --resume continues it, --overwrite "
                         "replaces it")
    if args.resume and file.exists():
        earlier = json.loads((out / "settings.json").read_text())
        if changed := [k for k in settings if earlier.get(k) != settings[k]]:
            raise ValueError(f"--resume: {out}'s run had other settings ({', '.join(changed)})")
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                prediction = json.loads(line)
            except json.JSONDecodeError:  # the line a kill cut short
                continue
            kept.setdefault((prediction["model"], prediction["id"]), []).append(prediction)
        kept = {key: runs for key, runs in kept.items() if len(runs) == args.samples}
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "analysis.json", "analysis.png"):  # the earlier run's
        (out / name).unlink(missing_ok=True)
    write_text(out / "settings.json", json.dumps(settings) + "\n")
    write_text(file, "".join(json.dumps(p, ensure_ascii=False) + "\n"
                             for runs in kept.values() for p in runs))
    return out, kept


def load(checkpoint, args):
    """The model of a checkpoint directory, or for --size tiny train.py's random backbone."""
    cuda = args.device.startswith("cuda")
    return (load_model(checkpoint, args.device, torch.bfloat16 if cuda else torch.float32)
            if checkpoint else common.tiny_model(args.seed).to(args.device))


def columns(args, checkpoint, base, name):
    """(name, model) of each column of the table; a --pvm that does not fit fails at once.
    --compare: one copy of the weights, with PVM's gates at 0 first: exactly the base model
    (pvm.py); --base: that checkpoint's model, after --model's."""
    model = load(checkpoint, args)
    if args.pvm:
        load_pvm(model, args.pvm)
    trained = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".gate_alpha")}
    if args.compare:
        model.load_state_dict({k: torch.zeros_like(v) for k, v in trained.items()}, strict=False)
        yield "base", model
        model.load_state_dict(trained, strict=False)
    yield name, model
    if base:
        del model  # one model in memory at a time
        yield "base", load(base, args)


def prediction(sample, name, run, tokens, text):
    """A line of predictions.jsonl: one reply, what was read from it and its verdict."""
    return {"id": sample["id"], "benchmark": sample["benchmark"], "model": name, "run": run,
            "tokens": tokens, "response": text, "extracted": extract(text, sample),
            "answer": sample["answer"], "correct": score(text, sample)}


def main(args):
    """Every option checked, then --out, before a model loads; the answers go to disk as they
    come (a stopped or failed run keeps them for --resume), the figures once all are in."""
    if args.compare and not args.pvm:
        raise ValueError("--compare needs --pvm FILE")
    if args.compare and args.base:
        raise ValueError("--compare and --base are two ways to get the base column: pass one")
    if args.samples > 1 and not args.temperature:
        raise ValueError("--samples > 1 needs --temperature > 0: greedy runs are all the same")
    if token := framing_token(args.post_prompt or ""):
        raise ValueError(f"--post-prompt holds {token}, a special token of the chat format")
    if args.analysis:
        check_analysis(args)
    cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (8 if cuda else 1)
    args.model = None if args.size else args.model  # results.json: no checkpoint was read
    names = (["base", "pvm" if args.pvm else "model"] if args.compare or args.base
             else ["pvm" if args.pvm else "base"])
    if args.lmms_eval or args.include_path:  # lmms-eval's tasks, prompts, token limits, scores
        return lmms.evaluate(args, names, partial(columns, args), partial(open_out, args))
    args.max_new_tokens = args.max_new_tokens or (32 if args.size else 1024)
    checkpoint = args.model and resolve_checkpoint(args.model)
    base = args.base and resolve_checkpoint(args.base)
    if checkpoint and args.temperature and args.top_k is None and args.top_p is None:
        generate.sampling_defaults(args, checkpoint)  # as lmms-eval: the checkpoint's top-k, p
    tokenizer = load_tokenizer(checkpoint) if checkpoint else tiny_tokenizer()
    samples = load_samples(args, tokenizer)
    messages = [(prompt_messages(sample, args.post_prompt), sample["where"]) for sample in samples]
    for sample, (tokens, _) in zip(samples, data.sample_lengths(messages, tokenizer)):
        sample["length"] = tokens  # of the prompt (images read from their headers), for batches
    out, kept = open_out(args, {k: getattr(args, k) for k in SETTINGS})  # before the model
    predictions, records, file = dict(kept), {}, open(out / "predictions.jsonl", "a")

    def keep(name, i, replies):  # a sample's replies, on disk as they come
        runs = [prediction(samples[i], name, run, *reply) for run, reply in enumerate(replies)]
        predictions[name, samples[i]["id"]] = runs
        file.write("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in runs))
        file.flush()

    try:
        for name, model in columns(args, checkpoint, base, names[-1]):
            if args.analysis:
                records[name] = respond_watched(model, samples, tokenizer, args, name,
                                                partial(keep, name))
            else:
                done = {key[1] for key in predictions if key[0] == name}
                respond(model, samples, tokenizer, args, name, done, partial(keep, name))
    except ValueError as e:
        raise ValueError(f"{e} (the answers before it are kept in {file.name}: --resume "
                         "continues)") from None
    except KeyboardInterrupt:
        print(f"\nstopped: the answers so far are kept in {file.name}: --resume continues",
              file=sys.stderr)
        raise
    finally:
        file.close()
    K, correct, ordered = args.samples, {}, []
    lengths = torch.zeros(len(samples), dtype=torch.float64)
    for name in names:  # the predictions in the samples' order, whatever the run's was
        correct[name] = torch.zeros(len(samples), K, dtype=torch.float64)
        for i, sample in enumerate(samples):
            for run, p in enumerate(predictions[name, sample["id"]]):
                correct[name][i, run] = p["correct"]
                lengths[i] += p["tokens"] / (len(names) * K)
                ordered.append(p)
    summary = summarise(samples, correct, lengths)
    print_table(summary, names, K)
    print(f"open answers graded by {GRADER}")
    results = {**{k: getattr(args, k) for k in SETTINGS}, "grader": GRADER, "models": names,
               **summary}
    write_text(out / "predictions.jsonl",
               "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in ordered))
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
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
    p.add_argument("--max-new-tokens", type=int, help="1024 (tiny: 32; --lmms-eval: the task's)")
    p.add_argument("--post-prompt", help="a line after open questions (default: none)")
    p.add_argument("--batch-size", type=int, help="prompts at once (default: 8 on CUDA, 1 on CPU)")
    p.add_argument("--limit", type=int, help="the first N samples only")
    p.add_argument("--seed", type=int, default=0, help="of sampling; with --size tiny also of the "
                   "backbone and the split, as train.py's --seed")
    p.add_argument("--device", default=common.DEVICE,
                   help="cuda (the default where there is one) or cpu")
    p.add_argument("--analysis", action="store_true", help="also the image's share of attention "
                   "and the logit lens at every token: analysis.json and .png (needs matplotlib; "
                   "one prompt at a time)")
    p.add_argument("--base", help="a checkpoint for the base column: a paired comparison of two "
                   "checkpoints (Qwen3-VL against a GRPO-tuned one)")
    lmms.options(p)  # --lmms-eval TASKS, --include-path DIR: lmms-eval's own benchmarks
    p.add_argument("--out", default="out/eval", help="directory for results.json, predictions")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--resume", action="store_true", help="continue the stopped run in --out")
    return common.check_options(p.parse_args(argv))


cli = common.command(main, parse_args)

if __name__ == "__main__":
    sys.exit(cli())
