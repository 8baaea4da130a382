"""
lmms-eval's own benchmarks on this project's model. `eval.py --lmms-eval TASKS` hands lmms-eval
0.7.3 a model in its model interface (an `lmms` whose generate_until answers a list of requests)
that decodes with generate.generate_batch; lmms-eval does the rest, as for any model it ships:
its datasets, the prompts it writes for Qwen3-VL, its answer parsers, its scores (MMBench's
circular evaluation included). The base and the PVM model are paired as eval.py pairs them
(--compare, --base), with --samples runs each.

    pip install --no-deps lmms-eval==0.7.3 && pip install -r requirements-eval.txt
    python eval.py --lmms-eval mmstar_qwen,ai2d_lite --pvm out/pvm.safetensors --compare
    python eval.py --size tiny --lmms-eval my_task --include-path my_tasks/   # a task of yours

TASKS: lmms-eval's task names, comma-separated; NAME@SPLIT runs another split of a task
(mmmu_val_qwen@dev: the paper's MMMU dev). A request becomes the chat lmms-eval's Qwen3-VL model
writes: its system prompt, then one user turn with the images first (resized into its pixel
bounds) and the text; the answer is cut at the task's stop strings. --out gets lmms_eval.json
(lmms-eval's results for each model and run, and their means), predictions.jsonl (lmms-eval's
record of each sample: the reply, what was read from it, its scores) and what lmms-eval's tasks
write themselves (MMBench's spreadsheets, under MODEL-runK/submissions/). lmms-eval is optional:
nothing here imports it until a run asks for it. Left out on purpose: loglikelihood and
multi-round tasks (the paper's eight generate once), video, several GPUs, --resume.
"""
import argparse
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from tqdm import tqdm

import common
import generate
from grading import accuracy
from load_qwen import resolve_checkpoint
from processor import encode_chat, left_pad, load_tokenizer, tiny_tokenizer, user_turn
from vision import smart_resize, to_rgb

INSTALL = "pip install --no-deps lmms-eval==0.7.3 && pip install -r requirements-eval.txt"
PAD_ID = 151643  # <|endoftext|>, never read: masked
# What lmms-eval's Qwen3-VL model (lmms_eval/models/simple/qwen3_vl.py) does that a task does not
# say: its name, which picks the prompts a task writes for it; its system prompt; the pixel
# bounds its image loader (qwen_vl_utils) resizes every image into; its token limit where a task
# sets none.
MODEL_NAME, SYSTEM_PROMPT = "qwen3_vl", "You are a helpful assistant."
MIN_PIXELS, MAX_PIXELS, MAX_NEW_TOKENS = 256 * 28 * 28, 1605632, 128
# the lmms command's default --reasoning_tags: a <think> section is dropped before scoring
REASONING_TAGS = '[["<think>", "</think>"], ["<analysis>", "</analysis>"]]'


def options(parser):
    """eval.py's two options for this file."""
    parser.add_argument("--lmms-eval", metavar="TASKS", help="lmms-eval's tasks (comma-separated; "
                        "NAME@SPLIT for another split) in place of --data: see lmms.py")
    parser.add_argument("--include-path", help="with --lmms-eval: a folder of task YAML files")

# -----------------------------------------------------------------------------
# from lmms-eval's requests to generate_batch and back

def chat(lm, request):
    """A request's (context, gen_kwargs, doc_to_visual, doc_id, task, split) as the messages
    lmms-eval's Qwen3-VL model writes. Its images go through qwen_vl_utils, which resizes each
    into [MIN_PIXELS, MAX_PIXELS] (sides multiples of 32) before the processor, whose own resize
    then changes nothing; vision.preprocess_image does the same after the resize here."""
    context, _, doc_to_visual, doc_id, task, split = request.args
    images = []
    for visual in doc_to_visual(lm.task_dict[task][split][doc_id]) or []:
        if not isinstance(visual, Image.Image):  # a video's path, audio
            raise ValueError(f"{task}: only images are read, not {type(visual).__name__}")
        image = to_rgb(visual)
        H, W = smart_resize(image.height, image.width, min_pixels=MIN_PIXELS,
                            max_pixels=MAX_PIXELS)
        images.append(image.resize((W, H), Image.BICUBIC))
    text = context.replace("<image>", "")  # a placeholder some tasks write; images come first
    return [{"role": "system", "content": SYSTEM_PROMPT}] + user_turn(images, text)


def sampling(gen_kwargs, defaults):
    """generate's options from a task's generation settings (the command line's have replaced
    the task's own by now), read as lmms-eval's Qwen3-VL model reads them: temperature 0 is
    greedy; top-p and top-k a task leaves out are the checkpoint's generation_config's, as
    transformers' generate fills them (`defaults`). do_sample is not read (a temperature above
    0 samples), nor num_beams (beam search is left out)."""
    temperature = float(gen_kwargs.get("temperature") or 0)
    top_p, top_k = (getattr(defaults, k) if gen_kwargs.get(k) is None else gen_kwargs[k]
                    for k in ("top_p", "top_k"))
    if top_p is not None and top_p <= 0:  # transformers keeps the likeliest token: greedy
        temperature = 0.0
    return {"max_new_tokens": int(gen_kwargs.get("max_new_tokens", MAX_NEW_TOKENS)),
            "temperature": temperature, "top_p": top_p, "top_k": top_k or None}


def cut(text, until):
    """The reply up to the first of the task's stop strings; lmms-eval's Qwen3-VL model drops
    "\\n\\n" from them, so that an answer may run over paragraphs."""
    until = [until] if isinstance(until, str) else until or []
    ends = [text.find(stop) for stop in until if stop and stop != "\n\n" and stop in text]
    return text[:min(ends)] if ends else text


def answer(lm, requests):
    """(reply, generated tokens) for each request, in the requests' order. The requests of one
    generation setting (one task's) go together, the longest prompt text first (little padding;
    lmms-eval's order), lm.args.batch_size at a time; each batch draws with its own seed, a
    function of --seed, the run and its place, so --compare's models draw alike."""
    args, stops = lm.args, set(lm.model.config.eos_token_ids)
    groups, replies, done = {}, [None] * len(requests), 0
    for i, request in enumerate(requests):
        groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
    bar = tqdm(total=len(requests), desc=f"{lm.name}, run {lm.run}", file=sys.stderr)
    for group in groups.values():
        gen_kwargs = requests[group[0]].args[1]
        group.sort(key=lambda i: -len(lm.tokenizer.encode(requests[i].args[0]).ids))
        for start in range(0, len(group), args.batch_size):
            batch = group[start:start + args.batch_size]
            prompts = [encode_chat(lm.tokenizer, chat(lm, requests[i])) for i in batch]
            seed = args.seed + lm.run * len(requests) + done
            try:  # it moves the batch to the model's device
                rows = generate.generate_batch(lm.model, *left_pad(prompts, PAD_ID), seed=seed,
                                               **sampling(gen_kwargs, lm.defaults))
            except ValueError as e:  # a prompt over the context: the batch's longest
                task, doc = requests[batch[0]].args[4], requests[batch[0]].args[3]
                raise ValueError(f"{task}, document {doc}: {e}") from None
            for i, ids in zip(batch, rows):
                ids = ids[:-1] if ids and ids[-1] in stops else ids  # the stop has no text
                replies[i] = cut(lm.tokenizer.decode(ids), gen_kwargs.get("until")), len(ids)
            done += len(batch)
            bar.update(len(batch))
    bar.close()
    return replies


def adapter(model, tokenizer, args, name, run, defaults):
    """`model` as an lmms-eval model. The class is made here, so that importing this file never
    imports lmms-eval; a fresh one for every run (lmms-eval drops a model's modules after its
    requests are answered)."""
    from lmms_eval.api.instance import GenerationResult, TokenCounts
    from lmms_eval.api.model import lmms

    class Model(lmms):
        def __init__(self):
            super().__init__()
            self.model, self.tokenizer, self.args = model, tokenizer, args
            self.name, self.run, self.defaults = name, run, defaults

        def generate_until(self, requests):
            return [GenerationResult(text, TokenCounts(output_tokens=tokens))
                    for text, tokens in answer(self, requests)]

        def loglikelihood(self, requests):
            raise ValueError("lmms-eval's loglikelihood and multi-round tasks are left out: "
                             "every task here must generate once")

        generate_until_multi_round = loglikelihood

    return Model()

# -----------------------------------------------------------------------------
# the run

def check(args):
    """Refuse, before any work, what cannot run: an option that does not go with --lmms-eval,
    lmms-eval missing, a task it does not know or cannot load (its dataset, its code: MathVerse's
    judge wants OPENAI_API_KEY at import). -> (lmms-eval's evaluator, its TaskManager, a function
    that gives the task list afresh: lmms-eval takes a NAME@SPLIT's dictionary apart)."""
    if not args.lmms_eval:
        raise ValueError("--include-path goes with --lmms-eval")
    for option in ("data", "analysis", "resume", "post_prompt"):
        if getattr(args, option):
            raise ValueError(f"--{option.replace('_', '-')} does not go with --lmms-eval")
    if args.include_path and not Path(args.include_path).is_dir():
        raise ValueError(f"--include-path {args.include_path} is not a folder")
    try:  # lmms-eval's import makes PIL read a truncated image as far as it goes, as its runs do
        from lmms_eval import evaluator
        from lmms_eval.tasks import TaskManager, get_task_dict
        from loguru import logger
    except ImportError as e:
        raise ValueError(f"--lmms-eval needs lmms-eval ({e}): {INSTALL}") from None
    logger.remove()  # lmms-eval logs to stdout, which holds the table here
    logger.add(sys.stderr, level="WARNING")
    manager = TaskManager(include_path=args.include_path, model_name=MODEL_NAME)
    names = [item.strip().partition("@") for item in args.lmms_eval.split(",")]
    if unknown := [name for name, _, _ in names if name not in manager.all_tasks]:
        raise ValueError(f"lmms-eval has no task {unknown[0]!r} (python -m lmms_eval --tasks "
                         "list lists them; --include-path adds a folder of yours)")

    def tasks():
        return [{"task": name, "test_split": split} if split else name for name, _, split in names]

    try:
        with redirect_stdout(sys.stderr):
            get_task_dict(tasks(), manager)
    except Exception as e:  # lmms-eval's and datasets' own kinds
        if hasattr(e, "last_attempt"):  # a RetryError (tenacity): its last try's error says why
            e = e.last_attempt.exception()
        raise ValueError(f"lmms-eval cannot load {args.lmms_eval}: {type(e).__name__}: {e}") \
            from None
    return evaluator, manager, tasks


def scores(results):
    """{(task, metric): value}: the numbers of a run's lmms-eval results, less their standard
    errors (lmms-eval's "acc,none" is acc; a filter other than none keeps its name)."""
    return {(task, metric.removesuffix(",none")): value
            for task, entry in results["results"].items() for metric, value in entry.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            and "_stderr" not in metric}


def summarise(runs):
    """{model: {"task metric": accuracy()'s mean, std and runs}} over each model's runs."""
    return {name: {" ".join(key): accuracy(torch.tensor([scores(r)[key] for r in mine],
                                                        dtype=torch.float64))
                   for key in scores(mine[0])}
            for name, mine in runs.items()}


def print_table(summary, names, K):
    """Each task's numbers as lmms-eval reports them (its scale: some tasks 0-1, some 0-100),
    mean ± standard deviation over the runs, and the difference with two models."""
    print(f"{'task and metric':<48}" + "".join(f"{name:>16}" for name in names)
          + (f"{'difference':>12}" if len(names) == 2 else ""))
    for key in summary[names[0]]:
        line = f"{key:<48}"
        for name in names:
            entry = summary[name][key]
            std = f" ± {entry['std']:.2g}" if K > 1 else ""
            line += f"{entry['mean']:.4g}{std}".rjust(16)
        if len(names) == 2:
            line += f"{summary[names[1]][key]['mean'] - summary[names[0]][key]['mean']:>+12.4g}"
        print(line)


def evaluate(args, names, columns, open_out):
    """eval.py --lmms-eval: every check, then lmms-eval's simple_evaluate for each model (names:
    eval.py's columns) and run, its per-sample records to predictions.jsonl as each run ends,
    and the figures."""
    evaluator, manager, tasks = check(args)
    checkpoint = args.model and resolve_checkpoint(args.model)
    base = args.base and resolve_checkpoint(args.base)
    tokenizer = load_tokenizer(checkpoint) if checkpoint else tiny_tokenizer()
    defaults = SimpleNamespace(temperature=None, top_p=None, top_k=None)
    if checkpoint:  # top-p and top-k where a task sets none, as transformers' generate
        generate.sampling_defaults(defaults, checkpoint)
    settings = {k: v for k, v in vars(args).items() if k not in ("overwrite", "resume")}
    out, _ = open_out(settings)  # refuses an earlier run there without --overwrite
    # the command line's sampling replaces every task's, as lmms-eval's --gen_kwargs: greedy
    # unless --temperature says otherwise; a task's own token limit unless --max-new-tokens
    overrides = ",".join(f"{k}={getattr(args, k)}" for k in ("temperature", "top_p", "top_k",
                                                             "max_new_tokens")
                         if getattr(args, k) is not None)
    runs = {}
    with open(out / "predictions.jsonl", "a", encoding="utf-8") as file:
        for name, model in columns(checkpoint, base, names[-1]):
            for run in range(args.samples):
                lm = adapter(model, tokenizer, args, name, run, defaults)
                where = argparse.Namespace(output_path=str(out / f"{name}-run{run}"),
                                           reasoning_tags=REASONING_TAGS, process_with_media=False)
                with redirect_stdout(sys.stderr):  # lmms-eval prints its tasks' reports
                    results = evaluator.simple_evaluate(
                        model=lm, tasks=tasks(), task_manager=manager, limit=args.limit,
                        gen_kwargs=overrides, log_samples=True, cli_args=where)
                file.write("".join(
                    json.dumps({"model": name, "run": run, "task": task, **sample},
                               ensure_ascii=False, default=str) + "\n"
                    for task, samples in results.pop("samples").items() for sample in samples))
                file.flush()
                runs.setdefault(name, []).append(results)
    summary = summarise(runs)
    print_table(summary, names, args.samples)
    text = json.dumps({"settings": settings, "models": names,
                       "summary": summary, "runs": runs}, indent=2, default=str)
    common.write_atomic(out / "lmms_eval.json", lambda tmp: tmp.write_text(text + "\n"))
    print(f"wrote {out / 'lmms_eval.json'} and {out / 'predictions.jsonl'}", file=sys.stderr)
