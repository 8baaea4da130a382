"""
Train Persistent Visual Memory (pvm.py) on a frozen Qwen3-VL: the paper's first stage. Only the
PVM blocks learn; the vision tower, the merger and the language model stay frozen; the loss is the
mean over the batch's assistant tokens (each reply's text and its <|im_end|>).

    python train.py --size 4b --data train.jsonl --out out/pvm-4b
    torchrun --nproc_per_node=8 train.py --size 8b --data train.jsonl --out out/pvm-8b
    python train.py --size tiny           # small random model, built-in task: a minute on a CPU

--data: JSON lines, LLaVA or chat format (data.py); without it, a built-in synthetic task. --out
gets pvm.safetensors (the PVM weights under the reference names: what `generate.py --pvm` loads),
state.pt (what --resume needs), log.jsonl, and with --size tiny backbone/, the random backbone as
a checkpoint directory (for `generate.py --model`). The second stage, GRPO, is grpo.py. Left out
on purpose: packing samples into one sequence, data loader workers.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import UnreadableSample, encode_sample, load_data, tiny_tokenizer
from load_qwen import check_device, load_model, load_tokenizer, resolve_checkpoint, save_model
from model import Qwen3VL, tiny_config
from pvm import PRESETS, attach_pvm, pvm_state_dict, save_pvm, write_atomic

# Everything that depends on --size. checkpoint None: the tiny random model, built here. The tiny
# model shows learning within a minute only with a larger rate and smaller batches; on its small
# matrices a second CPU thread costs more than it gives (threads None: torch's default).
SIZES = {
    "4b": {"checkpoint": "Qwen/Qwen3-VL-4B-Instruct", "pvm_layers": PRESETS["4b"], "pvm_dim": 512,
           "lr": 1e-4, "batch_size": 64, "grad_ckpt": True, "threads": None},
    "8b": {"checkpoint": "Qwen/Qwen3-VL-8B-Instruct", "pvm_layers": PRESETS["8b"], "pvm_dim": 512,
           "lr": 1e-4, "batch_size": 64, "grad_ckpt": True, "threads": None},
    "tiny": {"checkpoint": None, "pvm_layers": (1, 3), "pvm_dim": 64,
             "lr": 1e-2, "batch_size": 8, "grad_ckpt": False, "threads": 1},
}

# -----------------------------------------------------------------------------
# the model

def tiny_model(seed):
    """A small random Qwen3-VL (model.tiny_config), a function of the seed, frozen."""
    torch.manual_seed(seed)
    model = Qwen3VL(tiny_config())
    for name, p in model.named_parameters():
        # N(0, 0.02) as the released models' initializer_range; the head larger, or the logits of a
        # 64-wide normalised state would stay within about +-1: no token could stand out of 151,936
        if p.dim() == 2:
            nn.init.normal_(p, std=0.25 if name == "lm_head.weight" else 0.02)
    return model.eval().requires_grad_(False)


def build_model(args, checkpoint, device, dtype):
    """The frozen backbone of `checkpoint` (None: the tiny random one) with fresh PVM blocks, the
    same on every rank (seeded)."""
    size = SIZES[args.size]
    model = tiny_model(args.seed) if checkpoint is None else load_model(checkpoint, device, dtype)
    torch.manual_seed(args.seed)
    attach_pvm(model.to(device, dtype), size["pvm_layers"], size["pvm_dim"])
    for i in size["pvm_layers"]:  # float32 master weights for AdamW; autocast runs matmuls in bf16
        model.layers[i].pvm_block.float()
    model.gradient_checkpointing = size["grad_ckpt"] if args.grad_ckpt is None else args.grad_ckpt
    return model


class AssistantLoss(nn.Module):
    """Model and loss as one module, so DDP wraps the whole forward. Only the PVM parameters require
    grad, so only they enter DDP's reducer."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, pixel_values, image_grid_thw, loss_mask):
        """Summed cross-entropy over one sample's assistant tokens (loss_mask (1, T)): the caller
        divides by the number of such tokens in the whole batch."""
        hidden = self.model.hidden_states(input_ids, pixel_values, image_grid_thw)  # (1, T, D)
        predicts = loss_mask[:, 1:]  # position t predicts token t + 1
        logits = self.model.lm_head(hidden[:, :-1][predicts])  # (N, V): only where needed
        return F.cross_entropy(logits.float(), input_ids[:, 1:][predicts], reduction="sum")

# -----------------------------------------------------------------------------
# the loop

def get_lr(step, total, args):
    """Linear warmup over the first warmup ratio of the steps, then half a cosine down towards
    zero (reached at step `total`, one past the last)."""
    warmup = max(1, round(args.warmup * total))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def evaluate(loss_model, samples, read, device, autocast, rank, world):
    """Mean loss over the held-out samples' reply tokens, each rank taking its share. read(samples,
    i): sample i's input_ids, pixel_values, grid and loss mask (data.encode_sample)."""
    loss_model.eval()
    total = torch.zeros(2, device=device)  # loss sum, tokens
    for i in range(rank, len(samples), world):
        input_ids, pixel_values, grid, loss_mask = (t.to(device) for t in read(samples, i)[0])
        with autocast:
            total[0] += loss_model(input_ids, pixel_values, grid, loss_mask).float()
        total[1] += loss_mask[:, 1:].sum()
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def save_checkpoint(out, model, optimizer, step, run):
    """pvm.safetensors for generate.py, state.pt for --resume; each written to a temporary file
    and renamed, so a crash never leaves half a file. No RNG state: nothing in the loop draws a
    random number, and the data position is the step, the sample order a function of the seed."""
    save_pvm(model, out / "pvm.safetensors")
    state = {"step": step, "run": run, "optimizer": optimizer.state_dict(),
             "pvm": {k: v.detach().cpu() for k, v in pvm_state_dict(model).items()}}
    write_atomic(out / "state.pt", partial(torch.save, state))


def resume(out, model, optimizer, run):
    """Load state.pt, which must come from this same configuration, its PVM tensors of this model's
    shapes (an edited or mixed-up file is refused by name, not met by a crash); the step to
    continue at."""
    path = out / "state.pt"
    if not path.exists():
        raise ValueError(f"--resume: no checkpoint {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved_run, saved_pvm, saved_optimizer = state["run"], state["pvm"], state["optimizer"]
    except Exception as e:  # truncated, or not a checkpoint of this script
        raise ValueError(f"--resume: {path} is not a checkpoint of train.py: {e!r}") from None
    if diff := [f"{k} {saved_run.get(k)!r} there, {v!r} here"
                for k, v in run.items() if saved_run.get(k) != v]:
        raise ValueError(f"--resume: {path} comes from another configuration: {'; '.join(diff)}")
    with torch.no_grad():
        for name, tensor in pvm_state_dict(model).items():
            shape = tuple(saved_pvm[name].shape) if name in saved_pvm else "missing"
            if shape != tuple(tensor.shape):
                raise ValueError(f"--resume: {path}: {name} is {shape}, the model's is "
                                 f"{tuple(tensor.shape)}")
            tensor.copy_(saved_pvm[name])
    optimizer.load_state_dict(saved_optimizer)  # a ValueError if its parameters do not fit
    return state["step"]


def check_finite(grad_norm, loss, step):
    """Stop before an update from a NaN or infinite gradient, which would make every PVM weight
    NaN: nothing non-finite is applied or saved (the last checkpoint stays as it was)."""
    if not torch.isfinite(grad_norm):
        raise ValueError(f"step {step + 1}: gradient norm {grad_norm.item()}, loss {loss.item()}: "
                         "training diverged; nothing of this step was applied or saved")


@contextmanager
def ctrl_c_after():
    """Ctrl-C (SIGINT) held back until the block ends, then raised: so that an update is applied
    whole or not at all, and the checkpoint written on Ctrl-C is consistent."""
    held = []
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def log(out, entry):
    with open(out / "log.jsonl", "a") as f:  # a line at a time: a crash loses nothing logged
        f.write(json.dumps(entry) + "\n")


def main(args):
    check_args(args)
    rank, world, cuda, out = 0, 1, args.device.startswith("cuda"), Path(args.out)
    size = SIZES[args.size]
    if ddp := "RANK" in os.environ:  # under torchrun: a process per GPU with nccl, on CPUs gloo
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        rank, world = dist.get_rank(), dist.get_world_size()
    device = args.device
    if size["threads"] and not cuda:
        torch.set_num_threads(size["threads"])
    if (out / "state.pt").exists() and not args.resume:
        raise ValueError(f"{out} already holds a checkpoint: pass --resume, or another --out")
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} does not split over {world} processes")
    if args.model and size["checkpoint"] is None:
        raise ValueError(f"--model does not go with --size {args.size}, a random model built here")
    accum = args.batch_size // world  # samples per rank and step, one at a time: no padding
    checkpoint = size["checkpoint"] and resolve_checkpoint(args.model or size["checkpoint"])
    tokenizer = load_tokenizer(checkpoint) if checkpoint else tiny_tokenizer()
    held_out, train, skipped = load_data(args.data, tokenizer, args.max_len, args.seed,  # bad data
                                         args.eval_samples, args.synthetic_samples)  # fails here
    # but an image that fails to decode only when a step needs it: skipped for the next sample
    read = partial(encode_sample, tokenizer=tokenizer, named=set(), strict=args.strict_data)
    model = build_model(args, checkpoint, device, torch.bfloat16 if cuda else torch.float32)
    total = args.max_steps or math.ceil(len(train) / args.batch_size)  # one epoch
    run = {k: getattr(args, k) for k in ("size", "model", "data", "synthetic_samples", "seed",
                                         "batch_size", "lr", "warmup", "weight_decay", "grad_clip",
                                         "max_len")}
    run |= {"pvm_layers": list(model.config.pvm_layers), "pvm_dim": model.config.pvm_dim,
            "steps": total, "held_out": len(held_out), "train": len(train)}
    # the optimizer holds the PVM parameters only: the rest is frozen, so AdamW keeps no moments
    # for the backbone, and no weight but PVM's is ever given a gradient
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    start = resume(out, model, optimizer, run) if args.resume else 0
    loss_model = AssistantLoss(model)
    device_ids = [torch.device(device).index] if cuda else None
    wrapped = DDP(loss_model, device_ids=device_ids) if ddp else loss_model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        # the tiny backbone, for generate.py --model; on --resume, this run's (same seed) is there
        if checkpoint is None and not (args.resume and (out / "backbone").is_dir()):
            save_model(model, out / "backbone")  # PVM is not part of it
            tokenizer.save(str(out / "backbone" / "tokenizer.json"))
        print(f"{len(train)} training and {len(held_out)} held-out samples, {skipped}; {total} "
              f"steps of {args.batch_size}; {sum(p.numel() for p in params):,} trainable "
              "parameters", file=sys.stderr)
    bar = tqdm(total=total, initial=start, disable=rank != 0)
    done = start  # steps whose update is complete: what a checkpoint written now holds
    try:
        for step in range(start, total + 1):
            if args.eval_every and held_out and (step % args.eval_every == 0 or step == total):
                eval_loss = evaluate(loss_model, held_out, read, device, autocast, rank, world)
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
            # step s takes samples s*batch .. (s+1)*batch - 1 of the shuffled order (wrapping),
            # encoded on the CPU first: their loss masks count the tokens of the loss beforehand
            picks = range(step * args.batch_size + rank, (step + 1) * args.batch_size, world)
            batch, skips = zip(*(read(train, i) for i in picks))
            count = sum(loss_mask[:, 1:].sum() for *_, loss_mask in batch).float().to(device)
            if ddp:
                dist.all_reduce(count)  # the whole batch's, over all ranks
            # the loss is the mean over all the batch's reply tokens, as TRL's SFTTrainer takes it
            # (average_tokens_across_devices), not a mean of per-sample means: each sample adds its
            # summed token losses / count, times world since DDP averages the ranks' gradients
            stats = torch.tensor([0.0, 0.0, sum(skips)], device=device)  # loss, tokens, skipped
            for micro, tensors in enumerate(batch):
                input_ids, pixel_values, grid, loss_mask = (t.to(device) for t in tensors)
                if ddp:  # all-reduce the gradients at the last micro-step only
                    wrapped.require_backward_grad_sync = micro == accum - 1
                with autocast:
                    loss_sum = wrapped(input_ids, pixel_values, grid, loss_mask)
                (loss_sum * world / count).backward()
                stats[0] += loss_sum.detach().float()
                stats[1] += input_ids.numel()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            if ddp:
                dist.all_reduce(stats)
            check_finite(grad_norm, stats[0] / count, step)  # the same on every rank
            with ctrl_c_after():  # the update and its log line, whole or not at all
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                if rank == 0:
                    seconds = time.perf_counter() - t0
                    gates = [model.layers[i].pvm_block.gate_alpha.item()
                             for i in size["pvm_layers"]]
                    entry = {"step": done, "loss": (stats[0] / count).item(), "lr": lr,
                             "grad_norm": grad_norm.item(), "skipped": int(stats[2]),
                             "tokens_per_s": stats[1].item() / seconds, "gates": gates}
                    log(out, entry)
                    bar.update()
                    bar.set_postfix(loss=f"{entry['loss']:.3f}", lr=f"{lr:.1e}",
                                    tok_s=f"{entry['tokens_per_s']:.0f}",
                                    gates=",".join(f"{g:.3f}" for g in gates))
            if rank == 0 and (done % args.save_every == 0 or done == total):
                save_checkpoint(out, model, optimizer, done, run)
    except (KeyboardInterrupt, UnreadableSample) as e:
        bar.close()
        # Ctrl-C reaches every rank, and rank 0 saves; an unreadable sample stops its own rank
        # only, which saves in its place (every rank holds the same weights)
        if done > start and (rank == 0 or isinstance(e, UnreadableSample)):
            save_checkpoint(out, model, optimizer, done, run)
        state = f"step {done} is saved in {out}, --resume continues" if done else "no step done"
        if isinstance(e, UnreadableSample):
            raise UnreadableSample(f"{e}; {state}") from None
        if rank == 0:
            print(f"interrupted: {state}", file=sys.stderr)
        raise
    finally:
        bar.close()
    if ddp:
        dist.destroy_process_group()
    return model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train PVM on a frozen Qwen3-VL (the paper's SFT).")
    p.add_argument("--size", choices=SIZES, default="4b",
                   help="PVM layers and default checkpoint; tiny: a random model, kept in --out")
    p.add_argument("--model", help="checkpoint directory or hub id (default: --size's official)")
    p.add_argument("--data", help="JSON-lines file, LLaVA or chat format (default: built-in task)")
    p.add_argument("--strict-data", action="store_true",
                   help="at an image that fails to decode, save and stop (default: skip it)")
    p.add_argument("--synthetic-samples", type=int, default=2000, help="size of the built-in task")
    p.add_argument("--out", default="out", help="directory for pvm.safetensors, state.pt, log")
    p.add_argument("--resume", action="store_true", help="continue from --out/state.pt")
    p.add_argument("--batch-size", type=int,
                   help="global batch, processes x accumulation steps (default 64; tiny 8)")
    p.add_argument("--lr", type=float, help="peak learning rate of AdamW (default 1e-4; tiny 1e-2)")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup ratio of the cosine schedule")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="largest norm of a step's gradient")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: one epoch)")
    p.add_argument("--max-len", type=int, default=4096, help="longer samples (tokens) are skipped")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations; 0: none")
    p.add_argument("--eval-samples", type=int, default=64,
                   help="held-out samples, at most a tenth of the data (also with --eval-every 0)")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction,
                   help="gradient checkpointing (default: on but for tiny)")
    p.add_argument("--seed", type=int, default=0, help="for PVM's init, data order, built-in task")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (the default where there is one) or cpu")
    args = p.parse_args(argv)
    args.lr = SIZES[args.size]["lr"] if args.lr is None else args.lr
    args.batch_size = SIZES[args.size]["batch_size"] if args.batch_size is None else args.batch_size
    return args


def check_args(args):
    """Refuse, before any work, options that would fail deep inside or silently misbehave: a
    negative rate or clip norm is gradient ascent, a NaN one NaN weights, a negative
    --eval-samples holds back all but a few samples and trains on those."""
    positive = ("batch_size", "save_every", "max_len", "max_steps", "synthetic_samples", "lr",
                "grad_clip")
    for name in positive:
        value = getattr(args, name)
        if value is not None and not 0 < value < math.inf:  # NaN fails every comparison
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("eval_every", "eval_samples", "weight_decay"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.warmup <= 1:
        raise ValueError(f"--warmup is a share of the steps, from 0 to 1; got {args.warmup}")
    check_device(args.device)


def cli(argv=None):
    """The command; its exit status: 2 after one error: line for bad input, 130 on Ctrl-C."""
    try:
        main(parse_args(argv))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # main saved the finished steps and said so
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
