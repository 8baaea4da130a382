"""
Speed of our generation against transformers' generate, in one run and on the same inputs:
random checkpoints in the official layout, greedy, batches of B prompts (each a 448x448 image
and 32 to 20 text tokens, left-padded), 64 new tokens per prompt. Reports prefill time and
decode tokens/s summed over the batch, as ratios ours / theirs (median of runs), our batch's
rate over our B = 1 rate, and whether the greedy tokens are the same; then a training step,
a GRPO step (sampling, then the update), and one GRPO step of TRL's GRPOTrainer against ours.

    python bench.py                 # the tiny and ~110M models on this CPU, B = 1 and 8
    python bench.py --sizes 4b --train-sizes 4b --grpo-sizes 4b --device cuda --dtype bfloat16 \
        --modes plain graph compile long-cap --batch-sizes 1 8 32
    python bench.py --sizes --train-sizes --grpo-sizes --trl-sizes tiny 110m   # against TRL

Sizes: tiny (overhead-bound, as a 4B model on a GPU at batch 1), 110m (the real vocabulary,
memory-bound on a CPU), 4b (the Qwen3-VL-4B-Instruct architecture). A development tool, not a
test: it imports transformers, which the runtime files never do.
"""
import argparse
import contextlib
import copy
import ctypes
import gc
import io
import itertools
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

import processor
import generate
import load_qwen
from model import Config, tiny_config
from vision import preprocess_image


def config_dict(size):
    """The official config.json of a model of `size` (official token ids unless said)."""
    if size == "tiny":
        # the tests' tiny preset with a small vocabulary, so that the output head does not
        # dominate, and token ids inside it (transformers reads them from config.json)
        config = replace(tiny_config(), vocab_size=4096, image_token_id=4000,
                         eos_token_ids=(4005,))
        hf = load_qwen.hf_config(config)
        hf.update(video_token_id=4001, vision_start_token_id=4002, vision_end_token_id=4003)
        return hf
    if size == "110m":  # 78M of it is the (tied) embedding of the real vocabulary
        return load_qwen.hf_config(replace(
            Config(), hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
            num_kv_heads=4, head_dim=64, mrope_section=(12, 10, 10), vision_hidden_size=256,
            vision_intermediate_size=1024, vision_depth=4, vision_num_heads=4,
            vision_deepstack_indexes=(1, 2, 3)))
    return load_qwen.hf_config(Config())  # Qwen3-VL-4B-Instruct


def build_models(size, device, dtype):
    """transformers' model with random weights, saved in the official layout, and ours read
    from that checkpoint."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = config_dict(size)
    torch.manual_seed(0)
    with torch.device(device):
        theirs = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**config)).to(dtype).eval()
    theirs.generation_config.eos_token_id = None  # random weights: always generate all the tokens
    with tempfile.TemporaryDirectory() as path:
        theirs.save_pretrained(path)
        # the official spelling of config.json
        (Path(path) / "config.json").write_text(json.dumps(config, indent=2))
        return theirs, load_qwen.load_model(path, device, dtype)


def batch_inputs(config, batch_size):
    """B prompts, left-padded: [vision_start] + the image pads of a 448x448 photo + [vision_end]
    + 32, 28, 24 or 20 random text tokens. Returns input_ids and attention_mask (B, T),
    pixel_values and image_grid_thw of the B images."""
    photo = Image.open(Path(__file__).parent / "cat.jpg").resize((448, 448))
    pixel_values, grid = preprocess_image(photo)
    n_image = int(grid.prod()) // 4                                   # 196 merged visual tokens
    image = ([config["vision_start_token_id"]] + [config["image_token_id"]] * n_image
             + [config["vision_end_token_id"]])
    top = min(config["text_config"]["vocab_size"] - 100, 150000)      # below the special tokens
    prompts = []
    for b in range(batch_size):
        text = torch.randint(0, top, (32 - 4 * (b % 4),)).tolist()
        prompts.append((torch.tensor([image + text]), pixel_values, grid))
    return processor.left_pad(prompts)


def timed(steps, sync):
    """Consume an iterator of each step's tokens (B,); return (prefill seconds, decode tokens/s
    over the batch, the tokens (B, n) as lists)."""
    start, times, out = time.perf_counter(), [], []
    for tokens in steps:
        sync()
        times.append(time.perf_counter())
        out.append(tokens)
    rate = len(out[0]) * (len(times) - 1) / (times[-1] - times[0])
    return times[0] - start, rate, torch.stack(out, dim=1).tolist()


def run_theirs(model, inputs, n_new, sync):
    """transformers' generate, timed through a streamer: it gets the prompt, then each step's
    new tokens."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            sync()
            self.times.append(time.perf_counter())

        def end(self):
            pass

    ids, attention_mask, pixel_values, grid = (t.to(model.device) for t in inputs)
    stamps, start = Stamps(), time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=attention_mask,
                         pixel_values=pixel_values, image_grid_thw=grid,
                         mm_token_type_ids=(ids == model.config.image_token_id).long(),
                         do_sample=False, max_new_tokens=n_new, streamer=stamps)
    times = stamps.times[1:]  # the first put is the prompt
    rate = len(ids) * (len(times) - 1) / (times[-1] - times[0])
    return times[0] - start, rate, out[:, ids.size(1):].tolist()


MODES = {  # our generation, each way it can run
    "plain": dict(cuda_graph=False),  # one kernel launch after another
    "graph": dict(),              # generate's default: on CUDA, the step replayed as a CUDA graph
    "compile": dict(compile=True),    # --compile: torch.compile, and on CUDA its graph
    # the default again, allowed the whole context (cut off after --new-tokens): the cache
    # grows with the tokens, so the rate should be the default's
    "long-cap": dict(max_new_tokens=10**9),
}


def bench(size, args):
    device, dtype = args.device, getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    theirs, ours = build_models(size, device, dtype)
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    one_row = {}  # mode -> decode tokens/s at B = 1
    for B in args.batch_sizes:
        inputs = batch_inputs(config_dict(size), B)

        def run_ours(mode):
            options = dict(max_new_tokens=args.new_tokens, compile=False, cuda_graph=True)
            options.update(MODES[mode])
            steps = generate.decode(ours, *inputs, temperature=0.0, top_k=None, top_p=None,
                                    seed=0, num_samples=1, stop_tokens=(), **options)
            return timed(itertools.islice(steps, args.new_tokens), sync)

        def run_all():  # alternated, so that a drift in the machine's speed hits every side alike
            return {**{mode: run_ours(mode) for mode in args.modes},
                    "theirs": run_theirs(theirs, inputs, args.new_tokens, sync)}

        run_all()  # warm-up (and torch.compile)
        runs = [run_all() for _ in range(args.runs)]
        made = [len(row) for run in runs for side in run.values() for row in side[2]]
        assert made == [args.new_tokens] * len(made), "every side must make every token"
        pre_t, dec_t = (statistics.median(run["theirs"][i] for run in runs) for i in (0, 1))
        for mode in args.modes:
            pre_o, dec_o = (statistics.median(run[mode][i] for run in runs) for i in (0, 1))
            one_row.setdefault(mode, dec_o)
            pairs = zip(runs[-1][mode][2], runs[-1]["theirs"][2])
            differ = [b for b, (a, t) in enumerate(pairs) if a != t]
            same = f"not in {len(differ)} of {B} rows" if differ else "yes"
            print(f"| {size} ({params:.0f}M) | {B} | {mode} | "
                  f"{pre_o * 1000:.0f} / {pre_t * 1000:.0f} ms | {pre_t / pre_o:.2f}x | "
                  f"{dec_o:.0f} / {dec_t:.0f} tok/s | {dec_o / dec_t:.2f}x | "
                  f"{dec_o / one_row[mode]:.2f}x | {same} |", flush=True)


def best_time(fn, sync, repeats=3):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def pvm_model(hf, args):
    """A frozen random model of config.json `hf` in --dtype on --device, with PVM at the 4B's
    relative depth and width (5, 11, 17 of 36 layers, 512 of 2560 wide) in float32 (the master
    weights train.py and grpo.py keep), gates opened to 0.1 as after some training; and the PVM
    layers and width."""
    from model import Qwen3VL
    from common import SIZES
    from pvm import attach_pvm

    config = load_qwen.config_from_hf(hf)
    layers = sorted({round(i * config.num_layers / 36) for i in SIZES["4b"]["pvm_layers"]})
    width = max(config.head_dim, round(config.hidden_size / 5 / config.head_dim) * config.head_dim)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Qwen3VL(config).to(getattr(torch, args.dtype)).eval().requires_grad_(False)
    attach_pvm(model, layers, width)
    for i in layers:
        model.layers[i].pvm_block.float()
        model.layers[i].pvm_block.gate_alpha.data.fill_(0.1)
    return model, layers, width


def bench_train(size, args, grad_ckpt):
    """One PVM optimizer step (forward, backward, clip, AdamW) against one forward pass of the
    same sample as the step computes it (hidden states, the head on the reply): `--train-tokens`
    tokens, a 512x512 image (256 of them) and text, half of it the reply. PVM at the 4B's
    relative depth and width (5, 11, 17 of 36 layers, 512 of 2560 wide), scaled to the model;
    gates opened to 0.1 as after some training."""
    import data
    import train

    device, cuda = args.device, args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model, layers, width = pvm_model(config_dict(size), args)
    model.gradient_checkpointing = grad_ckpt
    image, tokenizer = Image.new("RGB", (512, 512), (120, 30, 200)), processor.tiny_tokenizer()

    def sample(n_user, n_reply):  # byte tokens: one per character
        user = [{"type": "image", "image": image}, {"type": "text", "text": "x" * n_user}]
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": "y" * n_reply}]
        return tuple(t.to(device) for t in processor.encode_chat_for_training(tokenizer, messages))

    text = args.train_tokens - sample(0, 0)[0].size(1)  # what the image and the chat format leave
    batch = sample(text - text // 2, text // 2)
    loss_model = train.AssistantLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
                else torch.autocast("cpu", enabled=False))

    def step():
        model.train()
        with autocast:
            loss_model(*batch).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward():
        model.eval()
        with autocast:
            loss_model(*batch)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_step = best_time(step, sync)
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "-"
    t_forward = best_time(forward, sync)
    tokens = batch[0].size(1)
    print(f"| {size}, PVM at {layers} width {width} | {'on' if grad_ckpt else 'off'} | "
          f"{tokens} | "
          f"{t_step * 1000:.0f} / {t_forward * 1000:.0f} ms | {t_step / t_forward:.2f}x | "
          f"{tokens / t_step:.0f} | {peak} |", flush=True)


def bench_grpo(size, args):
    """One step of grpo.py in its two parts, on one prompt (the 448x448 image and 32 text tokens of
    batch_inputs): sampling --grpo-samples answers of --new-tokens tokens from one prefill (no
    stop token, so every row runs to the end), then the update on them (a teacher-forced pass
    over the group, backward, clipping, AdamW). PVM at the 4B's relative depth and width, gates
    opened to 0.1 as after some training; every answer counted as finished, so that the head
    runs at all of its tokens."""
    import grpo

    device, cuda = args.device, args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    hf = config_dict(size)
    model, _, _ = pvm_model(hf, args)
    ids, _, pixel_values, grid = batch_inputs(hf, 1)  # one prompt: no padding
    G, n = args.grpo_samples, args.new_tokens
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
                else torch.autocast("cpu", enabled=False))
    objective = grpo.PolicyObjective(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
    completions = []

    def sample():
        with autocast:
            completions[:] = generate.generate_batch(
                model, ids, None, pixel_values, grid, max_new_tokens=n, temperature=1.0,
                top_p=1.0, seed=0, num_samples=G, stop_tokens=())

    def update():
        advantages = torch.linspace(-1, 1, G)  # any advantages but 0: the cost is the same
        batch = grpo.group_batch((ids, pixel_values, grid), completions,
                                 {c[-1] for c in completions}, model.config.image_token_id,
                                 advantages)
        model.train()
        with autocast:
            objective(*(t if t is None else t.to(device) for t in batch)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t_sample = best_time(sample, sync)
    t_update = best_time(update, sync)
    tokens = G * (ids.size(1) + n)  # the update's teacher-forced pass
    print(f"| {size} | {G} x {n} | {t_sample * 1000:.0f} ms, {G * n / t_sample:.0f} tokens/s | "
          f"{t_update * 1000:.0f} ms, {tokens / t_update:.0f} tokens/s | "
          f"{t_sample / (t_sample + t_update):.0%} |", flush=True)


# -----------------------------------------------------------------------------
# one GRPO step: TRL's GRPOTrainer against grpo.py's pieces

def trl_checkpoint(size, path):
    """A random checkpoint of `size` in `path` with what TRL's GRPOTrainer reads besides the
    weights: the official generation, preprocessor and chat-template files and Qwen's tokenizer
    (tests/fixtures.py rebuilds it offline). tiny: model.tiny_config, the tests' and `train.py
    --size tiny`'s model, with the official vocabulary (the processor's token ids)."""
    sys.path.insert(0, str(Path(__file__).parent / "tests"))
    import fixtures
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    hf = load_qwen.hf_config(tiny_config()) if size == "tiny" else config_dict(size)
    torch.manual_seed(0)
    # a copy: transformers edits the nested rope dict in place
    Qwen3VLForConditionalGeneration(Qwen3VLConfig(**copy.deepcopy(hf))).save_pretrained(path)
    (path / "config.json").write_text(json.dumps(hf, indent=2))  # the official spelling
    for name in ("generation_config.json", "preprocessor_config.json", "chat_template.json"):
        shutil.copyfile(fixtures.OFFICIAL_DIR / name, path / name)
    fixtures.build_tokenizer_json(path)
    return path


def builtin_prompts(P):
    """P prompts of the built-in task (grpo.py's without --data: a 64x64 image and a lettered
    question) after the paper's system prompt: as our chat messages, and as rows of a dataset for
    TRL (its "image" column; TRL puts the image before the user's text, where ours has it)."""
    import data
    import grpo

    rng, ours, rows = random.Random(0), [], []
    for _ in range(P):
        user = data.synthetic_sample(rng)[0]
        image, text = user["content"][0]["image"], user["content"][1]["text"]
        ours.append([{"role": "system", "content": grpo.SYSTEM_PROMPT}, user])
        rows.append({"prompt": [{"role": "system", "content": grpo.SYSTEM_PROMPT},
                                {"role": "user", "content": text}], "image": image})
    return ours, rows


def varied_reward(completion):
    """The id of an answer's first token mod 3: a reward that differs within nearly every group,
    so that both sides run the whole update (a random model scores 0 on every answer by the
    paper's reward, and grpo.py skips all-equal groups)."""
    return float(completion[0] % 3) if completion else 0.0


def trl_trainer(path, rows, G, n, out, steps, mask_truncated=True):
    """TRL's GRPOTrainer as the paper's script sets it up (loss "dapo", beta 0, G generations,
    temperature 1, top-p 1, lr 1e-6 constant, gradient checkpointing, the vision tower frozen),
    on the CPU in float32, one step of all the rows' P x G answers of up to n tokens."""
    import fixtures  # on the path: trl_checkpoint
    from datasets import Dataset
    from transformers import Qwen3VLForConditionalGeneration
    from trl import GRPOConfig, GRPOTrainer

    def reward(completion_ids, **_):
        return [varied_reward(c) for c in completion_ids]

    model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    model.model.visual.requires_grad_(False)
    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=len(rows) * G, num_generations=G,
        max_completion_length=n, temperature=1.0, top_p=1.0, loss_type="dapo", beta=0.0,
        mask_truncated_completions=mask_truncated, learning_rate=1e-6,
        lr_scheduler_type="constant", max_steps=steps, gradient_checkpointing=True,
        use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True)
    return GRPOTrainer(model=model, reward_funcs=reward, args=config,
                       train_dataset=Dataset.from_list(rows),
                       processing_class=fixtures.reference_processor(path))


def our_policy(path):
    """grpo.py's `--trainable lm` on the checkpoint, without PVM (TRL's model has none): the
    language model trained in float32, the vision tower frozen, gradient checkpointing, AdamW
    as grpo.py sets it up. Returns model, objective, trainable parameters, optimizer."""
    import grpo

    model = load_qwen.load_model(path)
    model.requires_grad_(True).visual.requires_grad_(False)
    model.gradient_checkpointing = True
    params = [p for p in model.parameters() if p.requires_grad]
    return (model, grpo.PolicyObjective(model), params,
            torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0))


def our_passes(model, prompts, completions, G, stops, budget=4096):
    """grpo.py's update passes for the answers (prompt 0's G first) to prompts, each
    encode_chat's: advantages of varied_reward in each group, passes of whole rows within
    `budget` tokens (--micro-batch-tokens), none for an all-equal group. stops: the tokens that
    end an answer (an answer ending otherwise was cut: out of the loss)."""
    import grpo

    passes = []
    for p, prompt in enumerate(prompts):
        group = completions[p * G:(p + 1) * G]
        rewards = torch.tensor([varied_reward(c) for c in group])
        advantages, equal = grpo.group_advantages(rewards, G)
        rows = max(1, budget // (prompt[0].size(1) + max(map(len, group))))
        passes += [grpo.group_batch(prompt, group[a:a + rows], stops, model.config.image_token_id,
                                    advantages[a:a + rows])
                   for a in range(0, (not equal) * G, rows)]
    return passes


def our_backward(objective, passes, count):
    """grpo.py's loss, -sum(A log p) / count, one backward pass per pass; returns its value."""
    objective.train()
    total = 0.0
    for batch in passes:
        part = objective(*batch)
        (-part / count).backward()
        total += part.item()
    return -total / count


def same_completions(trainer, policy, tokenizer, messages, rows, G, completions=None):
    """TRL's loss and ours on the same answers and the same weights: TRL's own preparation
    (_generate_and_score_completions: masks, N, advantages) with its sampler replaced by the
    given answers (None: TRL samples them), its compute_loss and backward; then grpo.py's
    passes on those answers. Returns TRL's inputs and loss, the answers, our loss and N, and
    {parameter: (our gradient, TRL's)} by the checkpoint's names; the gradients stay zeroed."""
    model, objective = policy[:2]
    sample, used = trainer._generate_single_turn, {}

    def given(prompt_ids, images, fields):  # TRL's sampler, or the given answers
        ids, logprobs = (sample(prompt_ids, images, fields) if completions is None
                         else ([list(c) for c in completions], None))
        used.update(prompts=prompt_ids, completions=ids)
        return ids, logprobs

    trainer._generate_single_turn = given
    try:
        trainer.model.train()
        inputs = trainer._generate_and_score_completions([r for r in rows for _ in range(G)])
    finally:
        del trainer._generate_single_turn  # the class's again
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    prompts = [processor.encode_chat(tokenizer, m) for m in messages]
    assert [p[0][0].tolist() for p in prompts for _ in range(G)] == used["prompts"], \
        "our prompts' tokens must be TRL's"
    answers = used["completions"]
    stops = set(model.config.eos_token_ids) if trainer.mask_truncated_completions else {
        c[-1] for c in answers}  # TRL keeps cut answers in the loss: count every one as ended
    count = sum(map(len, answers))  # TRL v1.0-v1.8's N: every answer's tokens, cut ones too
    ours = our_backward(objective, our_passes(model, prompts, answers, G, stops), count)
    theirs = dict(trainer.model.named_parameters())
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            hf_name = load_qwen.rename(name, load_qwen.TO_CHECKPOINT)
            ours_grad = torch.zeros_like(p) if p.grad is None else p.grad  # all groups equal
            grads[hf_name] = (ours_grad.clone(), theirs[hf_name].grad.clone())
    model.zero_grad(set_to_none=True)
    trainer.model.zero_grad(set_to_none=True)
    return dict(inputs=inputs, loss=loss.item(), completions=answers, ours=ours, count=count,
                grads=grads)


def fresh_peak():
    """Free what can be freed and restart the kernel's count of this process's peak resident
    memory (Linux); returns the resident bytes now."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages back to the system
    Path("/proc/self/clear_refs").write_text("5")
    return resident("VmRSS")


def resident(field):
    """/proc/self/status's VmRSS (resident now) or VmHWM (its peak since fresh_peak), bytes."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def trl_steps(trainer):
    """Run the trainer's steps; each step's (sampling seconds, step seconds, peak resident
    bytes above the step's start). Sampling: TRL's _prepare_inputs (prompts, generate, rewards,
    advantages); the step: from the trainer's on_step_begin to on_step_end (that, the loss's
    forward and backward, clipping, AdamW)."""
    from transformers import TrainerCallback

    steps, prepare = [], trainer._prepare_inputs

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.base, self.sampling, self.start = fresh_peak(), 0.0, time.perf_counter()

        def on_step_end(self, *_, **__):
            steps.append((self.sampling, time.perf_counter() - self.start,
                          resident("VmHWM") - self.base))

    clock = Clock()

    def timed_prepare(batch):
        start = time.perf_counter()
        inputs = prepare(batch)
        clock.sampling += time.perf_counter() - start
        return inputs

    trainer._prepare_inputs = timed_prepare
    trainer.add_callback(clock)
    with contextlib.redirect_stdout(io.StringIO()):  # its summary, not a row of the table
        trainer.train()
    return steps


def our_step(policy, tokenizer, messages, G, n, seed):
    """One grpo.py step on the messages' prompts: (sampling seconds, step seconds, peak resident
    bytes above the step's start). Sampling: encoding, one generate_batch call for all the
    prompts' G answers of n tokens (no stop token, as TRL's random model never samples one),
    rewards, advantages; then the passes, clipping, AdamW. Every answer counts as ended, as TRL's
    run here keeps them all in the loss."""
    model, objective, params, optimizer = policy
    base, start = fresh_peak(), time.perf_counter()
    prompts = [processor.encode_chat(tokenizer, m) for m in messages]
    answers = generate.generate_batch(model, *processor.left_pad(prompts), max_new_tokens=n,
                                      temperature=1.0, top_p=1.0, seed=seed, num_samples=G,
                                      stop_tokens=())
    passes = our_passes(model, prompts, answers, G, {c[-1] for c in answers})
    sampled = time.perf_counter()
    our_backward(objective, passes, sum(map(len, answers)))
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sampled - start, time.perf_counter() - start, resident("VmHWM") - base


def bench_trl(size, args):
    """One GRPO step of TRL's GRPOTrainer against grpo.py's, on the CPU: --trl-prompts built-in
    prompts x --grpo-samples answers of --new-tokens tokens, the same random weights, the whole
    language model trained. First both are fed the answers TRL samples, once, on the same
    weights: the loss and its gradient; then --trl-steps steps each, the first a warm-up, the
    median of the others. Every answer stays in the loss on both sides (TRL's
    mask_truncated_completions off): a random model ends none, so the paper's setting would
    leave nothing to learn from and ours would skip the output head."""
    P, G, n = args.trl_prompts, args.grpo_samples, args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        path = trl_checkpoint(size, Path(tmp) / "model")
        messages, rows = builtin_prompts(P)
        trainer = trl_trainer(path, rows, G, n, Path(tmp) / "trl", args.trl_steps,
                              mask_truncated=False)
        policy, tokenizer = our_policy(path), processor.load_tokenizer(path)
        same = same_completions(trainer, policy, tokenizer, messages, rows, G)
        theirs = trl_steps(trainer)[1:]
        ours = [our_step(policy, tokenizer, messages, G, n, seed)
                for seed in range(args.trl_steps)][1:]
    params = sum(p.numel() for p in policy[0].parameters()) / 1e6
    o, t = ([statistics.median(step[i] for step in side) for i in range(3)]
            for side in (ours, theirs))
    update_o, update_t = o[1] - o[0], t[1] - t[0]
    print(f"| {size} ({params:.0f}M) | {P} x {G} x {n} | "
          f"{o[0]:.2f} / {t[0]:.2f} s | {o[0] / t[0]:.2f} | "
          f"{update_o:.2f} / {update_t:.2f} s | {update_o / update_t:.2f} | "
          f"{o[1]:.2f} / {t[1]:.2f} s | {o[1] / t[1]:.2f} ({t[1] / o[1]:.1f}x faster) | "
          f"{o[2] / 2**20:.0f} / {t[2] / 2**20:.0f} MiB | {o[2] / t[2]:.2f} |", flush=True)
    worst = max(((ours_g - theirs_g).abs().max() / theirs_g.abs().max().clamp(min=1e-30)).item()
                for ours_g, theirs_g in same["grads"].values())
    advantages = same["inputs"]["advantages"]
    kept = same["inputs"]["completion_mask"].sum(dim=1)
    formula = -(advantages * kept).sum().item() / same["count"]
    print(f"  same answers, same weights: N {same['count']} ours, "
          f"{same['inputs']['num_items_in_batch'].item()} TRL's; TRL's loss {same['loss']:.6g} "
          f"(-sum A n / N: {formula:.6g}), ours -sum A log p / N {same['ours']:.6g}; gradients "
          f"of {len(same['grads'])} tensors: largest difference {worst:.1e} of the tensor's "
          f"largest entry", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="*", default=["tiny", "110m"], choices=["tiny", "110m", "4b"],
                   help="sizes for the generation measurement (none: skip it)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N, for both sides")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the weights' dtype, for both sides")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both sides; one suits "
                   "the tiny model and is steady on a shared machine")
    p.add_argument("--runs", type=int, default=5,
                   help="timed runs per side; the median is reported")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--batch-sizes", type=int, nargs="+",
                   help="prompts decoded together (default: 1 8, and 32 on CUDA)")
    p.add_argument("--modes", nargs="+", default=["plain", "compile"], choices=MODES,
                   help="ways to run our generation (on a CPU, graph is plain)")
    p.add_argument("--train-tokens", type=int, default=2048,
                   help="length of the training-step sample")
    p.add_argument("--train-sizes", nargs="*", default=["110m"], choices=["110m", "4b"],
                   help="sizes for the training-step measurement (none: skip it)")
    p.add_argument("--grpo-sizes", nargs="*", default=["tiny", "110m"],
                   choices=["tiny", "110m", "4b"],
                   help="sizes for the GRPO-step measurement (none: skip it)")
    p.add_argument("--grpo-samples", type=int, default=8,
                   help="answers to each GRPO prompt (both GRPO measurements)")
    p.add_argument("--trl-sizes", nargs="*", default=[], choices=["tiny", "110m"],
                   help="sizes for one GRPO step against TRL's GRPOTrainer, on the CPU (needs "
                   "trl; default: none)")
    p.add_argument("--trl-prompts", type=int, default=2, help="prompts of the step against TRL")
    p.add_argument("--trl-steps", type=int, default=3,
                   help="steps each side against TRL: a warm-up, then the median of the others")
    args = p.parse_args()
    if args.batch_sizes is None:
        args.batch_sizes = [1, 8, 32] if args.device.startswith("cuda") else [1, 8]
    torch.set_num_threads(args.threads)
    print(f"{args.device} {args.dtype}, {args.threads} threads, greedy, a 448x448 image and 32 to "
          f"20 text tokens per prompt, {args.new_tokens} new tokens, median of {args.runs}")
    if args.sizes:
        print("| model | B | ours | prefill ours / theirs | speed-up | decode ours / theirs "
              "(all rows) | speed-up | over our first B | same tokens |\n"
              "|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        bench(size, args)
    if args.train_sizes:
        print("\ntraining step (train.py) against one forward pass of the same sample\n"
              "| model | checkpointing | tokens | step / forward | ratio | tokens/s "
              "| peak memory |\n"
              "|---|---|---|---|---|---|---|")
        for size in args.train_sizes:
            for grad_ckpt in (False, True):
                bench_train(size, args, grad_ckpt)
    if args.grpo_sizes:
        print("\nGRPO step (grpo.py): sampling one prompt's answers, then the update on them\n"
              "| model | answers x tokens | sampling | update | sampling's share |\n"
              "|---|---|---|---|---|")
        for size in args.grpo_sizes:
            bench_grpo(size, args)
    if args.trl_sizes:
        print(f"\nGRPO step, grpo.py against TRL's GRPOTrainer (ours / theirs), {args.device}, "
              f"float32, {args.threads} threads; peak: resident memory above the step's start\n"
              "| model | prompts x answers x tokens | sampling | ratio | update | ratio | "
              "whole step | ratio | peak | ratio |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
        for size in args.trl_sizes:
            bench_trl(size, args)
