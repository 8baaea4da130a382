"""
Train Persistent Visual Memory (pvm.py) on a frozen Qwen3-VL: the paper's first stage. Only the PVM
blocks learn; the vision tower, the merger and the language model stay frozen; the loss is taken on
the assistant's tokens (each reply's text and its <|im_end|>).

    python train.py --size 4b --data train.jsonl --out out/pvm-4b
    torchrun --nproc_per_node=8 train.py --size 8b --data train.jsonl --out out/pvm-8b
    python train.py --size tiny                  # small random model, built-in task: a minute on a CPU

--data holds one JSON object a line, image paths relative to the file, in either of two formats:
    LLaVA: {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                                                {"from": "gpt", "value": "A cat."}]}
    chat:  {"images": ["a.jpg"], "messages": [{"role": "user", "content": [{"type": "image"},
            {"type": "text", "text": "What is it?"}]}, {"role": "assistant", "content": "A cat."}]}
Without --data, a built-in synthetic task (see synthetic_sample).

The output directory holds pvm.safetensors (the PVM weights under the reference names: what
`generate.py --pvm` loads), state.pt (everything --resume needs) and log.jsonl.
Left out on purpose: the GRPO stage, packing several samples into one sequence, data loader workers.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import ByteLevel
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from load_qwen import chat_text, encode_chat_with_spans, load_model, load_tokenizer, resolve_checkpoint
from model import Config, Qwen3VL
from pvm import PRESETS, attach_pvm, pvm_state_dict, save_pvm
from vision import MERGE, PATCH, smart_resize

SIZES = {  # default checkpoint, decoder layers that carry a PVM block, PVM width
    "4b": ("Qwen/Qwen3-VL-4B-Instruct", PRESETS["4b"], 512),
    "8b": ("Qwen/Qwen3-VL-8B-Instruct", PRESETS["8b"], 512),
    "tiny": (None, (1, 3), 64),
}

# -----------------------------------------------------------------------------
# data: JSON lines in either format -> chat messages (as load_qwen.chat_text reads them)

ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}


def to_messages(line, root, where):
    """One JSON line in either format -> chat messages. Each "<image>" in a text and each {"type": "image"}
    part takes the sample's next image (or the part's own path); images without any placeholder go in front
    of the first user turn. Paths are relative to `root`, the data file's directory; errors name `where`."""
    def fail(message):
        raise ValueError(f"{where}: {message}")

    def image(path=None):  # the part's own path, else the sample's next one
        if (path := path or next(images, None)) is None:
            fail("more image placeholders than images")
        return {"type": "image", "image": str(Path(root, path))}  # an absolute path stays as it is

    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    record = record if isinstance(record, dict) else {}
    llava = "conversations" in record
    turns, paths = (record.get(key) for key in (("conversations", "image") if llava else ("messages", "images")))
    paths = [paths] if isinstance(paths, str) else paths or []
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        fail('expected a list of turns under "conversations" (LLaVA) or "messages" (chat)')
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        fail("images must be a path or a list of paths")
    images, messages = iter(paths), []
    for turn in turns:
        role, content = (turn.get("from"), turn.get("value")) if llava else (turn.get("role"), turn.get("content"))
        if role not in ROLES:
            fail(f"unknown role {role!r}")
        content = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
            fail("message content must be a string or a list of parts")
        parts = []
        for part in content:
            if part.get("type") == "image" or "image" in part:
                parts.append(image(part["image"] if isinstance(part.get("image"), str) else None))
            elif isinstance(part.get("text"), str):  # LLaVA style: "<image>" placeholders inside the text
                for k, text in enumerate(part["text"].split("<image>")):
                    parts += ([image()] if k else []) + ([{"type": "text", "text": text}] if text else [])
        messages.append({"role": ROLES[role], "content": parts})
    if rest := list(images):
        user = next((m for m in messages if m["role"] == "user"), None)
        if user is None or any(p["type"] == "image" for m in messages for p in m["content"]):
            fail(f"{len(rest)} image(s) more than image placeholders")
        user["content"][:0] = [{"type": "image", "image": str(Path(root, p))} for p in rest]
    if not any(m["role"] == "assistant" for m in messages):
        fail("no assistant turn, so nothing to learn from")
    return messages


def read_jsonl(path):
    """[(messages, "file:line")] of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        return [(to_messages(line, Path(path).parent, f"{path}:{n}"), f"{path}:{n}")
                for n, line in enumerate(f, 1) if line.strip()]


COLORS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (50, 80, 230),
          "yellow": (240, 210, 40), "white": (250, 250, 250), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")


def synthetic_sample(rng):
    """The built-in task: one coloured shape at a random place and size on a grey 64x64 canvas, and a
    lettered multiple-choice question on its colour or its kind. The options keep one order, so
    the text alone says nothing about the answer: it can only be read from the image."""
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    image = Image.new("RGB", (64, 64), (rng.randint(100, 160),) * 3)
    s = rng.randint(20, 40)
    x, y = rng.randint(0, 64 - s), rng.randint(0, 64 - s)
    draw = ImageDraw.Draw(image)
    if shape == "triangle":
        draw.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=COLORS[color])
    else:
        (draw.ellipse if shape == "circle" else draw.rectangle)((x, y, x + s, y + s), fill=COLORS[color])
    question, options, answer = (("What colour is the shape?", list(COLORS), color) if rng.random() < 0.5
                                 else ("Which shape is drawn?", list(SHAPES), shape))
    letters = "ABCDEF"[:len(options)]
    text = f"{question} {' '.join(f'{a}. {o}' for a, o in zip(letters, options))}. Answer with the letter."
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]},
            {"role": "assistant", "content": letters[options.index(answer)]}]


def image_tokens(image, where):
    """Visual tokens an image will give, from its size alone (a path: only the header is read)."""
    try:
        with (nullcontext(image) if isinstance(image, Image.Image) else Image.open(image)) as f:
            H, W = smart_resize(f.height, f.width)
    except FileNotFoundError:
        raise ValueError(f"image not found: {image} ({where})") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {image} ({where}): {e}") from None
    return H * W // (PATCH * MERGE) ** 2


def load_data(args, tokenizer):
    """The samples that fit, shuffled by the seed: (held-out, train, what was skipped). Samples over --max-len
    are skipped, never cut (a cut could fall inside an image); so are samples without an image, which PVM
    cannot learn from (it adds exactly zero there). Both are counted."""
    if args.data:
        samples = read_jsonl(args.data)
    else:
        rng = random.Random(args.seed)
        samples = [(synthetic_sample(rng), f"built-in sample {i}") for i in range(args.synthetic_samples)]
    # (tokens, images) of each sample without decoding an image: the text is tokenised with one
    # <|image_pad|> per image, then each image adds the visual tokens its size gives
    lengths = []
    for start in range(0, len(samples), 1024):  # batches: the tokenizer runs them in parallel
        batch = samples[start:start + 1024]
        texts, images = zip(*(chat_text(messages, add_generation_prompt=False)[:2] for messages, _ in batch))
        encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
        lengths += [(len(e.ids) + sum(image_tokens(im, where) - 1 for im in ims), len(ims))
                    for e, ims, (_, where) in zip(encodings, images, batch)]
    keep = [s for s, (n, k) in zip(samples, lengths) if n <= args.max_len and k > 0]
    too_long, no_image = sum(n > args.max_len for n, _ in lengths), sum(k == 0 for _, k in lengths)
    n_eval = min(args.eval_samples, len(keep) // 10) if args.eval_every else 0
    if len(keep) <= n_eval:
        raise ValueError(f"no training samples in {args.data or 'the built-in task'}: {len(samples)} read, "
                         f"{too_long} over --max-len {args.max_len} tokens, {no_image} without an image")
    order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(args.seed)).tolist()
    keep = [keep[i] for i in order]
    return keep[:n_eval], keep[n_eval:], f"{too_long} over --max-len and {no_image} without an image skipped"

# -----------------------------------------------------------------------------
# the model: an official checkpoint, or a tiny random one with a tokenizer that needs no download

SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                  "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655}


def tiny_tokenizer():
    """Bytes as tokens (no merges) plus the Qwen special tokens at their official ids."""
    vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))} | SPECIAL_TOKENS
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def tiny_model():
    """A small random Qwen3-VL with the official vocabulary and token ids, frozen as load_model's."""
    config = Config(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                    mrope_section=(6, 5, 5), tie_word_embeddings=False, vision_hidden_size=64, vision_depth=4,
                    vision_num_heads=4, vision_intermediate_size=128, vision_deepstack_indexes=(1, 2, 3))
    model = Qwen3VL(config)
    for name, p in model.named_parameters():
        # N(0, 0.02) as the released models' initializer_range; the head larger, or the logits of a
        # 64-wide normalised state would stay within about +-1 and no token could stand out of 151,936
        if p.dim() == 2:
            nn.init.normal_(p, std=0.25 if name == "lm_head.weight" else 0.02)
    return model.eval().requires_grad_(False)


def build_model(args, checkpoint, device, dtype):
    """The frozen backbone of `checkpoint` (None: the tiny random one) with fresh PVM blocks, the
    same on every rank (seeded)."""
    _, layers, d = SIZES[args.size]
    torch.manual_seed(args.seed)
    model = tiny_model().to(device, dtype) if checkpoint is None else load_model(checkpoint, device, dtype)
    attach_pvm(model, layers, d)
    for i in layers:  # float32 master weights for AdamW; autocast runs their matmuls in bf16
        model.layers[i].pvm_block.float()
    model.gradient_checkpointing = args.size != "tiny" if args.grad_ckpt is None else args.grad_ckpt
    return model


class AssistantLoss(nn.Module):
    """Model and loss as one module, so DDP wraps the whole forward. Only the PVM parameters require
    grad, so only they enter DDP's reducer."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, pixel_values, image_grid_thw, loss_mask):
        """Mean cross-entropy over one sample's assistant tokens (loss_mask (1, T))."""
        hidden = self.model.hidden_states(input_ids, pixel_values, image_grid_thw)  # (1, T, D)
        predicts = loss_mask[:, 1:]  # position t predicts token t + 1
        logits = self.model.lm_head(hidden[:, :-1][predicts])                   # (N, V): only where needed
        return F.cross_entropy(logits.float(), input_ids[:, 1:][predicts])

# -----------------------------------------------------------------------------
# the loop

def get_lr(step, total, args):
    """Linear warmup over the first warmup ratio of the steps, then cosine decay to zero."""
    warmup = max(1, round(args.warmup * total))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def encode(sample, tokenizer, device):
    """(messages, where) -> input_ids (1, T), pixel_values (N, 1536), grid (images, 3), loss mask (1, T)."""
    return tuple(t.to(device) for t in encode_chat_with_spans(tokenizer, sample[0], add_generation_prompt=False))


@torch.no_grad()
def evaluate(loss_model, samples, tokenizer, device, autocast, rank, world):
    """Mean loss over the held-out samples, each rank taking its share."""
    loss_model.eval()
    total = torch.zeros(2, device=device)  # loss sum, samples
    for sample in samples[rank::world]:
        with autocast:
            loss = loss_model(*encode(sample, tokenizer, device)).float()
        total += torch.stack([loss, torch.ones_like(loss)])
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def save_checkpoint(out, model, optimizer, step, run):
    """pvm.safetensors for generate.py, state.pt for --resume; each written to a temporary file and
    renamed, so a crash never leaves half a file. The data position is the step: the sample order is
    a function of the seed."""
    save_pvm(model, out / "pvm.safetensors")
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    state = {"step": step, "run": run, "optimizer": optimizer.state_dict(), "rng": rng,
             "pvm": {k: v.detach().cpu() for k, v in pvm_state_dict(model).items()}}
    torch.save(state, out / "state.pt.tmp")
    os.replace(out / "state.pt.tmp", out / "state.pt")


def resume(out, model, optimizer, run):
    """Load state.pt; it must come from this same configuration. Returns the step to continue at."""
    path = out / "state.pt"
    if not path.exists():
        raise ValueError(f"--resume: no checkpoint {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a checkpoint of this script
        raise ValueError(f"--resume: cannot read {path}: {e}") from None
    if diff := [f"{k} {state['run'].get(k)!r} there, {v!r} here" for k, v in run.items() if state["run"].get(k) != v]:
        raise ValueError(f"--resume: {path} comes from another configuration: {'; '.join(diff)}")
    with torch.no_grad():
        for name, tensor in pvm_state_dict(model).items():
            tensor.copy_(state["pvm"][name])
    optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def log(out, entry):
    with open(out / "log.jsonl", "a") as f:  # a line at a time: a crash loses nothing already logged
        f.write(json.dumps(entry) + "\n")


def main(args):
    rank, world, cuda, out = 0, 1, args.device.startswith("cuda"), Path(args.out)
    if ddp := "RANK" in os.environ:  # under torchrun: one process per GPU with nccl, or on CPUs with gloo
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        rank, world = dist.get_rank(), dist.get_world_size()
    if args.size == "tiny" and not cuda:
        torch.set_num_threads(1)  # on tiny matrices a second thread costs more than it gives
    if (out / "state.pt").exists() and not args.resume:
        raise ValueError(f"{out} already holds a checkpoint: pass --resume to continue it, or another --out")
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} does not split over {world} processes")
    if args.size == "tiny" and args.model:
        raise ValueError("--model does not go with --size tiny, which builds its own random model")
    accum = args.batch_size // world  # samples per rank and step, one at a time: no padding
    checkpoint = None if args.size == "tiny" else resolve_checkpoint(args.model or SIZES[args.size][0])
    tokenizer = tiny_tokenizer() if checkpoint is None else load_tokenizer(checkpoint)
    held_out, train, skipped = load_data(args, tokenizer)  # bad data fails here, before the model loads
    model = build_model(args, checkpoint, args.device, torch.bfloat16 if cuda else torch.float32)
    total = args.max_steps or math.ceil(len(train) / args.batch_size)  # one epoch
    run = {k: getattr(args, k) for k in ("size", "model", "data", "synthetic_samples", "seed", "batch_size", "lr",
                                         "warmup", "weight_decay", "max_len")}
    run |= {"pvm_layers": list(model.config.pvm_layers), "pvm_dim": model.config.pvm_dim, "steps": total,
            "held_out": len(held_out), "train": len(train)}
    # the optimizer holds the PVM parameters only: the rest is frozen, so AdamW keeps no moments
    # for the backbone, and no weight but PVM's is ever given a gradient
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    start = resume(out, model, optimizer, run) if args.resume else 0
    loss_model = AssistantLoss(model)
    wrapped = DDP(loss_model, device_ids=[torch.device(args.device).index] if cuda else None) if ddp else loss_model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    gates = [model.layers[i].pvm_block.gate_alpha for i in model.config.pvm_layers]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{len(train)} training and {len(held_out)} held-out samples, {skipped}; {total} steps of "
              f"{args.batch_size}; {sum(p.numel() for p in params):,} trainable parameters", file=sys.stderr)
    with tqdm(total=total, initial=start, disable=rank != 0) as bar:  # closed on an error too: one clean line
        for step in range(start, total + 1):
            if args.eval_every and held_out and (step % args.eval_every == 0 or step == total):
                eval_loss = evaluate(loss_model, held_out, tokenizer, args.device, autocast, rank, world)
                if rank == 0:
                    log(out, {"step": step, "eval_loss": eval_loss})
                    bar.write(f"step {step}: held-out loss {eval_loss:.4f}", file=sys.stderr)
            if step == total:
                break
            lr = get_lr(step, total, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            wrapped.train()  # there is no dropout: this only lets gradient checkpointing act
            stats = torch.zeros(2, device=args.device)  # loss sum, tokens
            for micro in range(accum):  # one sample at a time; the gradient is their mean (with DDP: of all ranks)
                # step s takes samples s*batch .. (s+1)*batch - 1 of the shuffled order (wrapping around)
                sample = train[(step * args.batch_size + micro * world + rank) % len(train)]
                input_ids, pixel_values, grid, loss_mask = encode(sample, tokenizer, args.device)
                if ddp:  # all-reduce the gradients at the last micro-step only
                    wrapped.require_backward_grad_sync = micro == accum - 1
                with autocast:
                    loss = wrapped(input_ids, pixel_values, grid, loss_mask)
                (loss / accum).backward()
                stats[0] += loss.detach().float()
                stats[1] += input_ids.numel()
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ddp:
                dist.all_reduce(stats)
            if rank == 0:
                entry = {"step": step + 1, "loss": stats[0].item() / args.batch_size, "lr": lr,
                         "tokens_per_s": stats[1].item() / (time.perf_counter() - t0),
                         "gates": [g.item() for g in gates]}
                log(out, entry)
                bar.update()
                bar.set_postfix(loss=f"{entry['loss']:.3f}", lr=f"{lr:.1e}", tok_s=f"{entry['tokens_per_s']:.0f}",
                                gates=",".join(f"{g:.3f}" for g in entry["gates"]))
                if (step + 1) % args.save_every == 0 or step + 1 == total:
                    save_checkpoint(out, model, optimizer, step + 1, run)
    if ddp:
        dist.destroy_process_group()
    return model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train PVM blocks on a frozen Qwen3-VL (the paper's SFT stage).")
    p.add_argument("--size", choices=SIZES, default="4b", help="PVM layers and default checkpoint; tiny: random model")
    p.add_argument("--model", help="checkpoint directory or hub id (default: the official one of --size)")
    p.add_argument("--data", help="JSON-lines file, LLaVA or chat format (default: the built-in synthetic task)")
    p.add_argument("--synthetic-samples", type=int, default=2000, help="size of the built-in task")
    p.add_argument("--out", default="out", help="directory for pvm.safetensors, state.pt and log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from --out/state.pt where it stopped")
    p.add_argument("--batch-size", type=int, help="global batch, processes x accumulation steps (default 64; tiny 8)")
    p.add_argument("--lr", type=float, help="peak learning rate of AdamW (default 1e-4; tiny 1e-2)")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup ratio of the cosine schedule")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: one epoch)")
    p.add_argument("--max-len", type=int, default=4096, help="longer samples (text + image tokens) are skipped")
    p.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations; 0: none")
    p.add_argument("--eval-samples", type=int, default=64, help="held-out samples, at most a tenth of the data")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (and one at the end)")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction,
                   help="gradient checkpointing (default: on but for tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    # a random backbone shows learning within a minute only with a larger rate and smaller batches
    args.lr = (1e-2 if args.size == "tiny" else 1e-4) if args.lr is None else args.lr
    args.batch_size = (8 if args.size == "tiny" else 64) if args.batch_size is None else args.batch_size
    if min(args.batch_size, args.save_every, args.max_len, args.max_steps or 1) < 1 or args.eval_every < 0:
        p.error("--batch-size, --save-every, --max-len and --max-steps must be positive, --eval-every not negative")
    return args


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
