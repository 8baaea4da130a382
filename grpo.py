"""
GRPO, the paper's second stage after train.py's SFT: each step samples G answers to each of P
prompts, scores them, and raises the log-probability of the answers that scored above their
group's mean, lowers the others'. TRL's GRPOTrainer as the paper's script configures it
(loss_type "dapo", beta 0, one optimisation pass per batch), written out as one loop.

    python grpo.py --size 4b --init out/pvm-4b/pvm.safetensors --data train.jsonl --out out/g4b
    torchrun --nproc_per_node=8 grpo.py --size 8b --trainable lm --data train.jsonl --out out/g8b
    python train.py --size tiny && python grpo.py --size tiny      # a few minutes on a CPU

--data: eval.py's JSON lines; without it, the built-in task. --out gets pvm.safetensors, state.pt,
log.jsonl, and with --trainable lm model/, a checkpoint directory. Left out on purpose: the
reference model and its KL term (beta 0), several passes per batch, vLLM, LoRA.
"""
import argparse
import os
import random
import re
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.checkpoint.state_dict import set_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import train
from data import image_tokens, synthetic_sample, tiny_tokenizer
from eval import builtin_sample, prompt_messages, read_samples, score
from generate import generate_batch
from load_qwen import check_device, encode_chat, load_tokenizer, resolve_checkpoint, save_model
from pvm import load_pvm, write_atomic

# DeepSeek-R1's template, which the R1-style GRPO recipes for vision-language models reuse
SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think><answer> answer here </answer>")
# <think>...</think> then <answer>...</answer>: whitespace between, no tag inside, nothing after
FORMAT = re.compile(r"<think>(?:(?!</?think>|</?answer>).)*</think>\s*"
                    r"<answer>(?:(?!</?think>|</?answer>).)*</answer>", re.S)
PAD_ID = 0  # right-pads the completions: any token of any vocabulary (masked, never read)

# What depends on --size (PVM's layers and the checkpoint: train.SIZES). lr: the paper's;
# max_new_tokens: TRL's max_completion_length. tiny starts from `train.py --size tiny`'s PVM, for a
# random model never samples a letter (every reward 0, no gradient); its reward: the first token
# alone answers right; 8 tokens, so that few completions are cut (a cut one is out of the loss);
# its rate is larger, to learn within minutes.
RELEASED = {"lr": 1e-6, "max_new_tokens": 512, "system": SYSTEM_PROMPT, "reward": "think_answer",
            "init": None, "steps": None}
SIZES = {"4b": RELEASED, "8b": RELEASED,
         "tiny": {"lr": 1e-3, "max_new_tokens": 8, "system": None, "reward": "first_token",
                  "init": "out/pvm.safetensors", "steps": 60}}

# -----------------------------------------------------------------------------
# rewards, advantages, the objective

def rewards(text, ids, sample, kind, tokenizer):
    """(format part, accuracy part) of one completion's reward."""
    if kind == "first_token":  # --size tiny
        return 0.0, float(score(tokenizer.decode(ids[:1]), sample))
    answers = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
    return 0.1 * bool(FORMAT.fullmatch(text)), 0.9 * bool(answers and score(answers[-1], sample))


def group_advantages(rewards, G):
    """Rewards (P*G,) -> advantages (P*G,) and which groups are all equal (P,): TRL's
    scale_rewards="group", (r - group mean) / (group std + 1e-4), the std with Bessel's
    correction as TRL's nanstd; exactly 0 in an all-equal group (TRL: 0 up to rounding)."""
    grouped = rewards.view(-1, G)                                          # (P, G)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    equal = (grouped == grouped[:, :1]).all(dim=1)                         # (P,)
    return advantages.masked_fill(equal[:, None], 0.0).view(-1), equal


def group_batch(prompt, completions, stops, image_token, advantages):
    """A prompt's G completions as one batch: input_ids and attention_mask (G, T + L), the
    completions right-padded; pixel values and grids repeated G times; the loss mask (G, T + L)
    on the completion tokens of the rows that ended with a stop token; the advantages (G,)."""
    ids, pixel_values, grid = prompt
    G, T, L = len(completions), ids.size(1), max(map(len, completions))
    input_ids = torch.full((G, T + L), PAD_ID)
    input_ids[:, :T] = ids
    loss_mask = torch.zeros(G, T + L, dtype=torch.bool)
    for row, completion in enumerate(completions):
        tokens = torch.tensor(completion)
        input_ids[row, T:T + len(completion)] = tokens.masked_fill(tokens == image_token, PAD_ID)
        # TRL's mask_truncated_completions: a completion cut at the length limit teaches nothing.
        # Nor, here, one that holds a sampled <|image_pad|>: the forward would seek an image there.
        loss_mask[row, T:T + len(completion)] = (completion[-1] in stops
                                                 and image_token not in completion)
    lengths = torch.tensor([T + len(completion) for completion in completions])
    attention_mask = torch.arange(T + L) < lengths[:, None]                # (G, T + L)
    repeat = lambda t: None if t is None else t.repeat(G, 1)  # (n, k) -> (G*n, k)
    return input_ids, attention_mask, repeat(pixel_values), repeat(grid), loss_mask, advantages


class PolicyObjective(nn.Module):
    """Model and objective as one module, so DDP wraps the whole forward (train.AssistantLoss)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, loss_mask,
                advantages):
        """sum of A_row * log p(token) over the completion tokens loss_mask (B, L) marks, by a
        teacher-forced pass; the caller divides by the number of such tokens in the global batch."""
        hidden = self.model.hidden_states(input_ids, pixel_values, image_grid_thw,
                                          attention_mask)                  # (B, L, D)
        predicts = loss_mask[:, 1:]  # position t predicts token t + 1
        logits = self.model.lm_head(hidden[:, :-1][predicts])              # (N, V): only there
        logp = -F.cross_entropy(logits.float(), input_ids[:, 1:][predicts], reduction="none")
        return (advantages[:, None].expand_as(predicts)[predicts] * logp).sum()

# -----------------------------------------------------------------------------
# the model across processes, checkpoints

def setup_model(args, checkpoint, device, cuda, ddp):
    """train.build_model's backbone and PVM, --init loaded, the trainable part chosen; under
    torchrun wrapped in DDP (--trainable pvm) or sharded by FSDP2 (--trainable lm)."""
    lm = args.trainable == "lm"  # float32 master weights; on CUDA bf16 autocast computes
    model = train.build_model(args, checkpoint, device, torch.bfloat16 if cuda and not lm
                              else torch.float32)
    if args.init:
        load_pvm(model, args.init)
    if lm:  # the paper's: the language model and PVM; the vision tower stays frozen
        model.requires_grad_(True)
        model.visual.requires_grad_(False)
    objective = PolicyObjective(model)
    if ddp and lm:  # parameters, gradients and AdamW states sharded over the processes
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)  # the rest: embeddings, vision tower, final norm, head
        register_fsdp_forward_method(model, "hidden_states")  # what generate and the loss call
    elif ddp:
        objective = DDP(objective, device_ids=[torch.device(device).index] if cuda else None)
    return model, objective


@contextmanager
def gathered(model):
    """FSDP2's shards gathered for the whole of sampling: generate.py samples in inference mode,
    where FSDP2 cannot gather (its buffers would become inference tensors, which the update then
    cannot use). Nothing to do without FSDP2."""
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    yield
    for module in modules:
        module.reshard()
        module.set_reshard_after_forward(module is not model, recurse=False)  # FSDP2's defaults


def value(t):
    """A tensor's number, also of an FSDP2 DTensor (a parameter, the gradient norm)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).item()


def save_checkpoint(out, model, optimizer, step, run, rank):
    """state.pt (the trainable weights, AdamW's states, the step, the settings) and
    pvm.safetensors (the reference names: generate.py --pvm), each to a temporary file and
    renamed. PyTorch's state-dict API gathers FSDP2's shards on rank 0, which writes."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights, optimizer_state = get_state_dict(model, optimizer, options=options)
    if rank == 0:
        state = {"step": step, "run": run, "weights": weights, "optimizer": optimizer_state}
        write_atomic(out / "state.pt", partial(torch.save, state))
        pvm = {f"model.language_model.{k}": v for k, v in weights.items() if ".pvm_block." in k}
        write_atomic(out / "pvm.safetensors", partial(save_file, pvm))


def resume(out, model, optimizer, run):
    """Load state.pt, which must come from this same configuration; the step to continue at."""
    path = out / "state.pt"
    if not path.exists():
        raise ValueError(f"--resume: no checkpoint {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved_run = state["run"]
    except Exception as e:  # truncated, or not a checkpoint of this script
        raise ValueError(f"--resume: {path} is not a checkpoint of grpo.py: {e!r}") from None
    if diff := [f"{k} {saved_run.get(k)!r} there, {v!r} here"
                for k, v in run.items() if saved_run.get(k) != v]:
        raise ValueError(f"--resume: {path} comes from another configuration: {'; '.join(diff)}")
    set_state_dict(model, optimizer, model_state_dict=state["weights"],
                   optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    return state["step"]


# -----------------------------------------------------------------------------
# the loop

def load_prompts(args):
    """eval.py's samples, or the built-in task's, shuffled by the seed; bad images fail here."""
    if args.data:
        samples = read_samples(args.data)
    else:
        rng = random.Random(args.seed)
        samples = [builtin_sample(synthetic_sample(rng), f"built-in sample {i}")
                   for i in range(args.synthetic_samples)]
    for sample in samples:
        for image in sample["images"]:
            image_tokens(image, sample["where"])
    if args.trainable == "pvm":  # PVM adds exactly 0 without an image: nothing to learn there
        samples = [s for s in samples if s["images"]]
    if not samples:
        raise ValueError(f"no prompt with an image in {args.data} for --trainable pvm")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed))
    return [samples[i] for i in order.tolist()]


def main(args):
    check_device(args.device)
    rank, world, cuda, out = 0, 1, args.device.startswith("cuda"), Path(args.out)
    size, checkpoint = SIZES[args.size], train.SIZES[args.size]["checkpoint"]
    if ddp := "RANK" in os.environ:  # under torchrun: a process per GPU with nccl, on CPUs gloo
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        rank, world = dist.get_rank(), dist.get_world_size()
    if train.SIZES[args.size]["threads"] and not cuda:
        torch.set_num_threads(train.SIZES[args.size]["threads"])
    if (out / "state.pt").exists() and not args.resume:
        raise ValueError(f"{out} already holds a checkpoint: pass --resume, or another --out")
    if args.prompts % world:
        raise ValueError(f"--prompts {args.prompts} does not split over {world} processes")
    if args.model and checkpoint is None:
        raise ValueError(f"--model does not go with --size {args.size}, a random model built here")
    if args.init and not Path(args.init).is_file():
        hint = ": run `python train.py --size tiny` first, or pass --init none"
        raise ValueError(f"--init {args.init}: no such file{hint * (args.size == 'tiny')}")
    checkpoint = checkpoint and resolve_checkpoint(args.model or checkpoint)
    tokenizer = load_tokenizer(checkpoint) if checkpoint else tiny_tokenizer()
    prompts = load_prompts(args)
    model, objective = setup_model(args, checkpoint, args.device, cuda, ddp)
    fsdp, stops = ddp and args.trainable == "lm", set(model.config.eos_token_ids)
    system = [{"role": "system", "content": size["system"]}] if size["system"] else []
    total = args.max_steps or size["steps"] or -(-len(prompts) // args.prompts)  # one epoch
    run = {k: getattr(args, k) for k in ("size", "model", "data", "synthetic_samples", "init",
                                         "trainable", "seed", "prompts", "samples",
                                         "max_new_tokens", "lr")} | {"steps": total}
    params = [p for p in model.parameters() if p.requires_grad]
    # AdamW as TRL's Trainer sets it up: no weight decay (torch's default is 0.01); clipping at
    # 1.0; the rate constant (the paper's; the Trainer's default decays it linearly)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    start = resume(out, model, optimizer, run) if args.resume else 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    # PVM's float32 master weights beside a bf16 model sample under autocast, as train.py
    # evaluates; --trainable lm samples in float32, the dtype of its KV cache (generate.py's)
    sampling = autocast if args.trainable == "pvm" else nullcontext()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{len(prompts)} prompts; {total} steps of {args.prompts} x {args.samples} samples; "
              f"{sum(p.numel() for p in params):,} trainable parameters", file=sys.stderr)
    for step in tqdm(range(start, total), initial=start, total=total, disable=rank != 0):
        t0 = time.perf_counter()
        # step s takes prompts s*P .. (s+1)*P - 1 of the shuffled order (wrapping), a share per
        # rank. Each prompt's samples come from a seed of its own: they depend on the run's seed
        # and the prompt's place, not on how the prompts are spread over processes.
        groups = []
        with gathered(model), sampling:
            for i in range(step * args.prompts + rank, (step + 1) * args.prompts, world):
                sample = prompts[i % len(prompts)]
                ids, pixel_values, grid = encode_chat(tokenizer,
                                                      system + prompt_messages(sample, None))
                completions = generate_batch(  # one prefill, its cache copied to G rows
                    model, ids, None, pixel_values, grid, max_new_tokens=args.max_new_tokens,
                    temperature=1.0, top_p=1.0, seed=(args.seed << 32) + i,
                    num_samples=args.samples, cuda_graph=not fsdp)
                groups.append((sample, (ids, pixel_values, grid), completions))
        t1 = time.perf_counter()
        stats = torch.zeros(10, dtype=torch.float64)  # summed over the ranks: see the log
        batches = []
        for sample, prompt, completions in groups:
            parts = torch.tensor([rewards(tokenizer.decode(ids), ids, sample, size["reward"],
                                          tokenizer) for ids in completions])  # (G, 2)
            advantages, equal = group_advantages(parts.sum(dim=1), args.samples)
            batches.append(group_batch(prompt, completions, stops, model.config.image_token_id,
                                       advantages))
            stats[:6] += torch.tensor([*parts.sum(dim=0), equal.sum(), len(completions),
                                       sum(map(len, completions)),
                                       sum(c[-1] not in stops for c in completions)])
        count = sum(batch[4].sum() for batch in batches).float().to(args.device)
        if ddp:
            dist.all_reduce(count)  # the global batch's completion tokens: the loss's denominator
        # TRL's loss_type "dapo": -sum(A * ratio) over all the batch's completion tokens / their
        # number, ratio = p / p_old clipped to [1 - eps, 1 + eps]. With one pass per batch
        # (num_iterations 1) p_old is p itself: the ratio is 1, the clipping inactive, and the
        # gradient that of -sum(A * log p) / count, which is what is taken here.
        objective.train()  # there is no dropout: this only lets gradient checkpointing act
        summed = torch.zeros((), device=args.device)  # sum(A * log p), read once after the loop
        for micro, tensors in enumerate(batches):
            if isinstance(objective, DDP):  # all-reduce the gradients at the last group only
                objective.require_backward_grad_sync = micro == len(batches) - 1
            with autocast:
                group_sum = objective(*(t if t is None else t.to(args.device) for t in tensors))
            (-group_sum * world / count.clamp(min=1)).backward()  # DDP, FSDP2: mean of ranks
            summed += group_sum.detach().float()
            stats[7] += tensors[1].sum()  # real tokens of the teacher-forced pass
        grad_norm = value(torch.nn.utils.clip_grad_norm_(params, 1.0))
        stats[6] = -summed.item()
        train.check_finite(torch.tensor(grad_norm), stats[6] / count.item(), step)  # not applied
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats[8:] = torch.tensor([t1 - t0, time.perf_counter() - t1])
        if ddp:
            stats = stats.to(args.device)  # nccl reduces on the GPU
            dist.all_reduce(stats)
        gates = [value(model.layers[i].pvm_block.gate_alpha) for i in model.config.pvm_layers]
        if (step + 1) % args.save_every == 0 or step + 1 == total:
            save_checkpoint(out, model, optimizer, step + 1, run, rank)
        stats, count = stats.tolist(), count.item()
        rows, seconds = stats[3], [t / world for t in stats[8:]]  # the ranks' mean times
        if rank == 0:
            train.log(out, {
                "step": step + 1, "reward": (stats[0] + stats[1]) / rows, "format": stats[0] / rows,
                "accuracy": stats[1] / rows, "all_equal": stats[2] * args.samples / rows,  # groups
                "length": stats[4] / rows, "truncated": stats[5] / rows,
                "loss": stats[6] / max(count, 1), "grad_norm": grad_norm,
                "sample_tokens_per_s": stats[4] / seconds[0],
                "update_tokens_per_s": stats[7] / seconds[1], "gates": gates})
    if args.trainable == "lm":  # the model but PVM, as an official checkpoint for generate.py
        with gathered(model):  # FSDP2's shards: plain tensors for now
            if rank == 0:
                save_model(model, out / "model")
                tokenizer.save(str(out / "model" / "tokenizer.json"))
                if checkpoint and (checkpoint / "generation_config.json").exists():
                    shutil.copy(checkpoint / "generation_config.json", out / "model")  # sampling
    if ddp:
        dist.destroy_process_group()
    return model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GRPO on Qwen3-VL with PVM (the paper's 2nd stage).")
    p.add_argument("--size", choices=SIZES, default="4b",
                   help="PVM layers, checkpoint, settings; tiny: train.py's random model")
    p.add_argument("--model", help="checkpoint directory or hub id (default: --size's official)")
    p.add_argument("--init", help="PVM weights to start from (train.py's pvm.safetensors); none: "
                   "fresh (the default; tiny: out/pvm.safetensors)")
    p.add_argument("--trainable", choices=["pvm", "lm"], default="pvm",
                   help="pvm: PVM alone; lm: the language model and PVM (the paper's)")
    p.add_argument("--data", help="eval.py's JSON-lines format (default: the built-in task)")
    p.add_argument("--synthetic-samples", type=int, default=2000, help="size of the built-in task")
    p.add_argument("--out", default="out/grpo", help="directory for weights, state.pt, log")
    p.add_argument("--resume", action="store_true", help="continue from --out/state.pt")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step, over all processes")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt: a group")
    p.add_argument("--max-new-tokens", type=int, help="completions' limit (default 512; tiny 8)")
    p.add_argument("--lr", type=float, help="AdamW's constant rate (default 1e-6; tiny 1e-3)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: one epoch; tiny 60)")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction,
                   help="gradient checkpointing (default: on but for tiny)")
    p.add_argument("--seed", type=int, default=0, help="for PVM's init, data order, sampling")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (the default where there is one) or cpu")
    args = p.parse_args(argv)
    for name in ("prompts", "save_every", "max_new_tokens", "max_steps", "synthetic_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.samples < 2:
        p.error("--samples must be at least 2: an advantage compares the samples of a prompt")
    for name in ("lr", "max_new_tokens", "init"):
        if getattr(args, name) is None:
            setattr(args, name, SIZES[args.size][name])
    args.init = None if args.init == "none" else args.init
    return args


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
