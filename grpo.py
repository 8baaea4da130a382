"""
GRPO, the paper's second stage after train.py's SFT: each step samples G answers
to each of P prompts, scores them, and raises the log-probability of the answers
that scored above their group's mean, lowers the others'. TRL's GRPOTrainer as
the paper's script configures it (loss_type "dapo" as in TRL v1.0-v1.8, beta 0,
one optimisation pass per batch), written out as one loop; docs/GRPO.md says
which defaults differ from the paper's and why.

    python grpo.py --size 4b --init out/pvm-4b/pvm.safetensors --data train.jsonl
    torchrun --nproc_per_node=8 grpo.py --size 8b --trainable lm --data train.jsonl
    python train.py --size tiny && python grpo.py --size tiny    # minutes on a CPU

--data: eval.py's JSON lines; without it, the built-in task. --out gets
pvm.safetensors, state.pt, log.jsonl, and with --trainable lm model/, a
checkpoint directory. Left out on purpose: the reference model and its KL term
(beta 0), several passes per batch, vLLM, LoRA.
"""
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common
from data import encode_sample, image_tokens, synthetic_sample
from eval import builtin_sample, read_samples
from grading import SYSTEM_PROMPT, grade_answer, paper_reward, score, think_answer_turn
from generate import generate_batch
from processor import encode_chat, left_pad
from pvm import load_pvm

# right-pads the completions: any token of any vocabulary (masked, never read)
PAD_ID = 0

# What depends on --size (PVM's layers, the checkpoint: common.SIZES). The paper's
# settings but max_new_tokens: its 16,384 is a ~160 GB KV cache for the 4B's 64 rows.
# tiny starts from `train.py --size tiny`'s PVM (a random model never samples a letter:
# no reward, no gradient); its reward: the first token alone answers right; 8 tokens, so
# that few are cut; a larger rate, to learn within minutes; no system prompt (never seen).
RELEASED = {"lr": 1e-6, "max_new_tokens": 4096, "system": SYSTEM_PROMPT, "reward": "think_answer",
            "init": None, "max_steps": None}
SIZES = {"4b": RELEASED, "8b": RELEASED,
         "tiny": {"lr": 1e-3, "max_new_tokens": 8, "system": None, "reward": "first_token",
                  "init": "out/pvm.safetensors", "max_steps": 60}}

# -----------------------------------------------------------------------------
# rewards, advantages, the objective

def rewards(text, ids, sample, kind, tokenizer):
    """(format part, accuracy part) of one completion's reward: the paper's (grading.py), or
    with --size tiny whether the first token alone answers right."""
    if kind == "first_token":
        return 0.0, float(score(tokenizer.decode(ids[:1]), sample))
    return paper_reward(text, sample)


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
    tokens = torch.tensor([c + [PAD_ID] * (L - len(c)) for c in completions])  # (G, L)
    # a sampled <|image_pad|> padded over, or the forward would seek an image
    tokens = tokens.masked_fill(tokens == image_token, PAD_ID)
    input_ids = torch.cat([ids.expand(G, -1), tokens], dim=1)              # (G, T + L)
    lengths = torch.tensor([T + len(completion) for completion in completions])
    attention_mask = torch.arange(T + L) < lengths[:, None]                # (G, T + L)
    # TRL's mask_truncated_completions: a completion cut at the length limit teaches nothing.
    # Nor, here, one that holds a sampled <|image_pad|>.
    kept = torch.tensor([c[-1] in stops and image_token not in c for c in completions])
    loss_mask = attention_mask & (torch.arange(T + L) >= T) & kept[:, None]
    repeat = lambda t: None if t is None else t.repeat(G, 1)  # (n, k) -> (G*n, k)
    return input_ids, attention_mask, repeat(pixel_values), repeat(grid), loss_mask, advantages


class PolicyObjective(torch.nn.Module):
    """Model and objective as one module, so DDP wraps the whole forward (as train.py's
    loss). The head and the log-softmax run `chunk` positions at a time; with several
    chunks each is redone in the backward pass: the (N, V) logits never exist whole."""

    def __init__(self, model, temperature=1.0, chunk=4096):
        super().__init__()
        self.model, self.temperature, self.chunk = model, temperature, chunk

    def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, loss_mask,
                advantages):
        """sum of A_row * log p(token) over the completion tokens loss_mask (B, L) marks, by a
        teacher-forced pass; the caller divides by the number of such tokens in the global batch."""
        hidden = self.model.hidden_states(input_ids, pixel_values, image_grid_thw,
                                          attention_mask)                  # (B, L, D)
        predicts = loss_mask[:, 1:]  # position t predicts token t + 1
        weights = advantages[:, None].expand_as(predicts)[predicts]        # (N,)
        chunks = [part.split(self.chunk) for part in
                  (hidden[:, :-1][predicts], input_ids[:, 1:][predicts], weights)]  # N rows each
        if len(chunks[0]) == 1:
            return self.weighted_logp(*(part[0] for part in chunks))
        return sum(checkpoint(self.weighted_logp, *part, use_reentrant=False)
                   for part in zip(*chunks))

    def weighted_logp(self, hidden, tokens, weights):
        """sum of weight * log p(token) for hidden states (n, D): log p from logits / T, as TRL
        takes it, so that the loss reads the distribution the tokens were sampled from."""
        # head(h) / T computed as head(h / T): the head is linear without a bias, and the hidden
        # states (n, D) are far smaller than the logits (n, V) to divide and to differentiate
        logits = self.model.lm_head(hidden / self.temperature).float()  # (n, V): only there
        return (weights * -F.cross_entropy(logits, tokens, reduction="none")).sum()

# -----------------------------------------------------------------------------
# the loop

def load_prompts(args):
    """(sample, "file:line") pairs of eval.py's samples, or the built-in task's, shuffled by the
    seed; bad image headers fail
    here (a body that fails to decode is skipped later: data.encode_sample)."""
    rng = random.Random(args.seed)  # the built-in task's
    samples = read_samples(args.data) if args.data else [
        builtin_sample(synthetic_sample(rng), f"built-in sample {i}")
        for i in range(args.synthetic_samples)]
    for sample in samples:
        for image in sample["images"]:
            image_tokens(image, sample["where"])
    # PVM adds exactly 0 without an image: nothing to learn there
    if args.trainable == "pvm":
        samples = [s for s in samples if s["images"]]
    if not samples:
        raise ValueError(f"no prompt with an image in {args.data} for --trainable pvm")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed))
    # as data.encode_sample reads them
    return [(samples[i], samples[i]["where"]) for i in order.tolist()]


def main(args):
    """GRPO for --max-steps steps (default: one epoch), saving every --save-every steps."""
    rank, world, device = common.init_process(args.device, args.size, ("--prompts", args.prompts))
    cuda, size, lm = device.startswith("cuda"), SIZES[args.size], args.trainable == "lm"
    if args.init and not Path(args.init).is_file():  # before loading the model
        raise ValueError(f"--init {args.init}: no such file: train.py first, or pass --init none")
    if size["reward"] == "think_answer" and grade_answer is None:
        raise ValueError("the paper's accuracy reward needs mathruler: pip install mathruler "
                         "pylatexenc sympy")
    out = common.prepare_out(args.out, args.resume)
    checkpoint, tokenizer = common.checkpoint_and_tokenizer(args.size, args.model)
    prompts = load_prompts(args)
    # lm: float32 master weights (FSDP2 casts them to bf16 on CUDA); pvm: a bf16 backbone there
    model = common.build_model(args.size, args.seed, checkpoint, device,
                               torch.bfloat16 if cuda and not lm else torch.float32, args.grad_ckpt)
    if args.init:
        load_pvm(model, args.init)
    if lm:  # the paper's: the language model too, not the vision tower
        model.requires_grad_(True).visual.requires_grad_(False)
    objective = common.distribute(PolicyObjective(model, args.temperature,
                                                  args.micro_batch_tokens), model, device, lm)
    stops, image_token = set(model.config.eos_token_ids), model.config.image_token_id
    system = [{"role": "system", "content": size["system"]}] if size["system"] else []
    encode = lambda sample: encode_chat(tokenizer, system + think_answer_turn(sample))
    total = args.max_steps or -(-len(prompts) // args.prompts)  # by default one epoch
    # the settings a --resume must share
    run = {k: v for k, v in vars(args).items() if k not in ("out", "resume", "max_steps",
           "save_every", "grad_ckpt", "device", "micro_batch_tokens")} | {"steps": total}
    params = [p for p in model.parameters() if p.requires_grad]
    # AdamW as TRL's Trainer sets it up: no weight decay (torch's default is 0.01); clipping at
    # 1.0; the rate constant (the paper's; the Trainer's default decays it linearly)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    start = done = common.resume(out, model, optimizer, run, rank) if args.resume else 0
    autocast, named = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda), set()
    if rank == 0:
        print(f"{len(prompts)} prompts; {total} steps of {args.prompts} x {args.samples} samples;"
              f" {sum(map(torch.numel, params)):,} trainable parameters", file=sys.stderr)
    try:
        for step in tqdm(range(start, total), initial=start, total=total, disable=rank != 0):
            t0 = time.perf_counter()
            # step s takes prompts s*P .. (s+1)*P - 1 of the shuffled order (wrapping), a share
            # per rank, all sampled in one batch from a seed of the run, the step and the rank
            picks = range(step * args.prompts + rank, (step + 1) * args.prompts, world)
            samples, inputs, skips = zip(*(encode_sample(prompts, i, encode, named) for i in picks))
            sums = Counter(skipped=sum(skips))
            with common.gathered(model), autocast:
                completions = generate_batch(
                    model, *left_pad(inputs),
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=1.0,
                    seed=(args.seed << 32) + step * world + rank, num_samples=args.samples,
                    # FSDP2 gathers bf16 weights on CUDA, and its hooks keep CUDA graphs out
                    cuda_graph=not (lm and torch.distributed.is_initialized()))
            t1 = time.perf_counter()
            # the step's sums over this rank's groups, then over the ranks: see the log line
            micro, G = [], args.samples
            for g, (sample, prompt) in enumerate(zip(samples, inputs)):
                group = completions[g * G:(g + 1) * G]
                parts = torch.tensor([rewards(tokenizer.decode(ids), ids, sample, size["reward"],
                                              tokenizer) for ids in group])  # (G, 2)
                advantages, equal = group_advantages(parts.sum(dim=1), G)
                # passes of whole rows within --micro-batch-tokens; none for an all-equal group
                # (its advantages, and so its gradient, are 0)
                n = max(1, args.micro_batch_tokens // (prompt[0].size(1) + max(map(len, group))))
                micro += [group_batch(prompt, group[a:a + n], stops, image_token,
                                      advantages[a:a + n]) for a in range(0, (not equal) * G, n)]
                sums.update(format=parts[:, 0].sum().item(), accuracy=parts[:, 1].sum().item(),
                            all_equal=equal.sum().item(), length=sum(map(len, group)),
                            truncated=sum(c[-1] not in stops for c in group))
            # TRL v1.0-v1.8's "dapo" loss, the paper's: -sum(A * ratio) over the unmasked
            # tokens / all the global batch's completion tokens, cut ones too (v1.9.0
            # counts only the unmasked). ratio = p / p_old clipped to [1 - eps, 1 + eps];
            # one pass per batch: p_old is p, the gradient that of -sum(A * log p) / count.
            count = torch.tensor(float(sums["length"]), device=device)
            passes = torch.tensor(len(micro), device=device)
            if world > 1:  # the global batch's completion tokens; the most passes of a process
                torch.distributed.all_reduce(count)
                torch.distributed.all_reduce(passes, op=torch.distributed.ReduceOp.MAX)
            # the processes keep in step (DDP's and FSDP2's collectives): each runs as many
            # passes, the spare ones with advantages 0
            spare = group_batch(inputs[0], completions[:1], stops, image_token, torch.zeros(1))
            micro += [spare] * (passes.item() - len(micro))
            objective.train()  # there is no dropout: this only lets gradient checkpointing act
            summed = torch.zeros((), device=device)  # sum(A * log p), read once after the loop
            for m, tensors in enumerate(micro):
                # DDP all-reduces the gradients at the last micro-batch (elsewhere: unread)
                objective.require_backward_grad_sync = m == len(micro) - 1
                with autocast:
                    micro_sum = objective(*(t if t is None else t.to(device) for t in tensors))
                (-micro_sum * world / count).backward()  # DDP, FSDP2: rank mean
                summed += micro_sum.detach().float()
                sums["update_tokens"] += tensors[1].sum().item()  # real tokens of the pass
            grad_norm = common.value(torch.nn.utils.clip_grad_norm_(params, 1.0))
            sums["loss"] = -summed.item()  # this rank's part of the loss's numerator
            common.check_finite(grad_norm, sums["loss"] / count.item(), step)  # not applied
            with common.whole_step():
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
            seconds = t1 - t0, time.perf_counter() - t1  # sampling, update: this rank's
            if world > 1:  # one reduction a step; each rank's names in one order
                totals = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
                torch.distributed.all_reduce(totals)
                sums = dict(zip(sums, totals.tolist()))
            gates = [common.value(model.layers[i].pvm_block.gate_alpha)
                     for i in model.config.pvm_layers]
            if rank == 0:  # before the checkpoint: see common.resume
                rows = args.prompts * args.samples  # completions
                shares = {k: sums[k] / rows for k in ("format", "accuracy", "length", "truncated")}
                common.log(out, {
                    "step": done, "reward": shares["format"] + shares["accuracy"], **shares,
                    "all_equal": sums["all_equal"] / args.prompts,  # share of groups
                    "skipped": int(sums["skipped"]), "loss": sums["loss"] / count.item(),
                    "grad_norm": grad_norm, "sample_tokens_per_s": sums["length"] / seconds[0],
                    "update_tokens_per_s": sums["update_tokens"] / seconds[1], "gates": gates})
            if done % args.save_every == 0 or done == total:
                common.save_checkpoint(out, model, optimizer, done, run, rank)
    except KeyboardInterrupt:
        common.save_interrupted(out, model, optimizer, done, start, run, rank)
        raise
    if lm:  # the model but PVM, as an official checkpoint for generate.py
        with common.gathered(model):  # FSDP2's shards: plain tensors for now
            if rank == 0:
                common.save_backbone(model, out / "model", tokenizer, checkpoint)
    common.end_process()
    return model


def parse_args(argv=None):
    # the defaults: the paper's settings but --trainable and --max-new-tokens (see their help)
    p = common.training_options("GRPO on Qwen3-VL with PVM (the paper's 2nd stage).",
                                out="out/grpo", save_every=100, data="eval.py's format")
    p.add_argument("--init", help="PVM weights to start from (train.py's pvm.safetensors); none: "
                   "fresh (the default; tiny: out/pvm.safetensors)")
    p.add_argument("--trainable", choices=["pvm", "lm"], default="pvm",
                   help="pvm: PVM alone (one GPU holds it); lm: the language model too, the "
                   "paper's (the 4B's float32 weights, gradients, AdamW: 64 GB; use torchrun)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step, over all processes")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt: a group")
    p.add_argument("--max-new-tokens", type=int, help="completions' limit (default 4096, the "
                   "paper's 16384 is a ~160 GB KV cache for the 4B's 64 rows; tiny 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="for sampling and log p")
    p.add_argument("--micro-batch-tokens", type=int, default=4096,
                   help="tokens per pass of the update and logits rows at once: its memory")
    p.add_argument("--lr", type=float, help="AdamW's constant rate (default 1e-6; tiny 1e-3)")
    args = common.parse(p, argv, SIZES, ("lr", "max_new_tokens", "init", "max_steps"))
    args.init = None if args.init == "none" else args.init
    if args.samples == 1:  # the table refuses 0 and below
        raise ValueError("--samples must be at least 2: an advantage compares a prompt's samples")
    if args.temperature == 0:  # the table refuses below 0
        raise ValueError("--temperature must be positive: greedy samples of a prompt are all one")
    return args


cli = common.command(main, parse_args)

if __name__ == "__main__":
    sys.exit(cli())
