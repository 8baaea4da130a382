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
a checkpoint directory (for `generate.py --model`). An image that fails to decode when its step
comes is skipped for the next sample and counted. What every script does around its loop (the
sizes, processes, checkpoints, option checks, the command line) is in common.py; the second
stage, GRPO, is grpo.py. Left out on purpose: packing samples into one sequence, data loader
workers.
"""
import math
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from data import EVAL_SAMPLES, MAX_LEN, encode_sample, load_data
from processor import encode_chat_for_training


class AssistantLoss(nn.Module):
    """Model and loss as one module, so DDP wraps the whole forward. Only the PVM parameters
    require grad, so only they enter DDP's reducer."""

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


def get_lr(step, total, args):
    """Linear warmup over the first warmup ratio of the steps, then half a cosine down towards
    zero (reached at step `total`, one past the last)."""
    warmup = max(1, round(args.warmup * total))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def evaluate(loss_model, samples, read, device, autocast, rank, world):
    """Mean loss over the held-out samples' reply tokens, each rank taking its share.
    read(samples, i): sample i's input_ids, pixel_values, grid and loss mask."""
    loss_model.eval()
    total = torch.zeros(2, device=device)  # loss sum, tokens
    for i in range(rank, len(samples), world):
        input_ids, pixel_values, grid, loss_mask = (t.to(device) for t in read(samples, i)[1])
        with autocast:
            total[0] += loss_model(input_ids, pixel_values, grid, loss_mask).float()
        total[1] += loss_mask[:, 1:].sum()
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def main(args):
    """Train, save every --save-every steps and at the end, and return the model."""
    # torchrun: a process per GPU
    rank, world, device = common.init_process(args.device, args.size,
                                              ("--batch-size", args.batch_size))
    cuda, size, out = device.startswith("cuda"), common.SIZES[args.size], args.out
    out = common.prepare_out(out, args.resume)
    checkpoint, tokenizer = common.checkpoint_and_tokenizer(args.size, args.model)
    held_out, train, skipped = load_data(args.data, tokenizer, args.max_len, args.seed,
                                         args.eval_samples, args.synthetic_samples)
    # a sample's tensors, or the next one's where its image fails to decode; one at a time,
    # batch_size / world a step on each process: no padding
    read = partial(encode_sample, encode=partial(encode_chat_for_training, tokenizer),
                   named=set())
    model = common.build_model(args.size, args.seed, checkpoint, device,
                               torch.bfloat16 if cuda else torch.float32, args.grad_ckpt)
    total = args.max_steps or math.ceil(len(train) / args.batch_size)  # one epoch
    run = {k: getattr(args, k) for k in ("size", "model", "data", "synthetic_samples", "seed",
                                         "batch_size", "lr", "warmup", "weight_decay",
                                         "grad_clip", "max_len")}
    run |= {"steps": total, "held_out": len(held_out), "train": len(train)}
    # the optimizer holds the PVM parameters only: the rest is frozen, so AdamW keeps no
    # moments for the backbone, and no weight but PVM's is ever given a gradient
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    start = common.resume(out, model, optimizer, run, rank) if args.resume else 0
    loss_model = AssistantLoss(model)
    wrapped = common.distribute(loss_model, model, device, shard=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)  # off: does nothing
    if rank == 0:
        # the tiny backbone, for generate.py --model; on --resume, this run's (same seed) is there
        if checkpoint is None and not (out / "backbone").is_dir():
            common.save_backbone(model, out / "backbone", tokenizer, checkpoint)
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
                    common.log(out, {"step": step, "eval_loss": eval_loss})
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
            _, batch, skips = zip(*(read(train, i) for i in picks))
            count = sum(loss_mask[:, 1:].sum() for *_, loss_mask in batch).float().to(device)
            if world > 1:
                dist.all_reduce(count)  # the whole batch's, over all ranks
            # the loss is the mean over all the batch's reply tokens, as TRL's SFTTrainer takes
            # it (average_tokens_across_devices), not a mean of per-sample means: each sample
            # adds its summed token losses / count, times world since DDP averages the ranks
            stats = torch.tensor([0.0, 0.0, sum(skips)], device=device)  # loss, tokens, skipped
            for micro, tensors in enumerate(batch):
                input_ids, pixel_values, grid, loss_mask = (t.to(device) for t in tensors)
                # DDP all-reduces the gradients at the last micro-step only (elsewhere: unread)
                wrapped.require_backward_grad_sync = micro == len(batch) - 1
                with autocast:
                    loss_sum = wrapped(input_ids, pixel_values, grid, loss_mask)
                (loss_sum * world / count).backward()
                stats[0] += loss_sum.detach().float()
                stats[1] += input_ids.numel()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip).item()
            if world > 1:
                dist.all_reduce(stats)
            loss = (stats[0] / count).item()
            common.check_finite(grad_norm, loss, step)  # the same on every rank
            with common.whole_step():  # the update and its log line, whole or not at all
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                if rank == 0:
                    gates = [model.layers[i].pvm_block.gate_alpha.item()
                             for i in size["pvm_layers"]]
                    tokens_per_s = stats[1].item() / (time.perf_counter() - t0)
                    common.log(out, {"step": done, "loss": loss, "lr": lr,
                                     "grad_norm": grad_norm, "skipped": int(stats[2]),
                                     "tokens_per_s": tokens_per_s, "gates": gates})
                    bar.update()
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}",
                                    tok_s=f"{tokens_per_s:.0f}",
                                    gates=",".join(f"{g:.3f}" for g in gates))
            if done % args.save_every == 0 or done == total:
                common.save_checkpoint(out, model, optimizer, done, run, rank)
    except KeyboardInterrupt:
        bar.close()
        common.save_interrupted(out, model, optimizer, done, start, run, rank)
        raise
    finally:
        bar.close()  # before any error line, so that the line is the last one
    common.end_process()
    return model


def parse_args(argv=None):
    p = common.training_options("Train PVM on a frozen Qwen3-VL (the paper's SFT).", out="out",
                                save_every=500, data="LLaVA or chat format (data.py)")
    p.add_argument("--batch-size", type=int,
                   help="global batch, processes x accumulation steps (default 64; tiny 8)")
    p.add_argument("--lr", type=float, help="peak learning rate of AdamW (default 1e-4; tiny 1e-2)")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup ratio of the cosine schedule")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="largest norm of a step's gradient")
    p.add_argument("--max-len", type=int, default=MAX_LEN, help="longer samples are skipped")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations; 0: none")
    p.add_argument("--eval-samples", type=int, default=EVAL_SAMPLES,
                   help="held-out samples, at most a tenth of the data (also with --eval-every 0)")
    return common.parse(p, argv, common.SIZES, ("lr", "batch_size"))


cli = common.command(main, parse_args)

if __name__ == "__main__":
    sys.exit(cli())
