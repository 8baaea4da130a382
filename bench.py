"""
Speed of our generation against transformers' generate, in one run and on the same inputs:
random checkpoints in the official layout, greedy, batches of B prompts (each a 448x448 image
and 32 to 20 text tokens, left-padded), 64 new tokens per prompt. Reports prefill time and
decode tokens/s summed over the batch, as ratios ours / theirs (median of runs), our batch's
rate over our B = 1 rate, and whether the greedy tokens are the same; then a training step and
a GRPO step (sampling, then the update).

    python bench.py                 # the tiny and ~110M models on this CPU, B = 1 and 8
    python bench.py --sizes 4b --train-sizes 4b --grpo-sizes 4b --device cuda --dtype bfloat16 \
        --modes plain graph compile long-cap --batch-sizes 1 8 32

Sizes: tiny (overhead-bound, as a 4B model on a GPU at batch 1), 110m (the real vocabulary,
memory-bound on a CPU), 4b (the Qwen3-VL-4B-Instruct architecture). A development tool, not a
test: it imports transformers, which the runtime files never do.
"""
import argparse
import itertools
import json
import statistics
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
    p.add_argument("--grpo-samples", type=int, default=8, help="answers to the GRPO step's prompt")
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
