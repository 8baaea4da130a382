"""
What every script does around its loop, written once so that the same bad value gets the same
answer everywhere: the sizes and the model of a size, the processes (DDP, FSDP2), the option
checks, the checkpoint (one atomic save and one exact resume for both training stages), the log,
and the command line. Nothing here is part of the model: read model.py, pvm.py, train.py first.
"""
import argparse
import json
import math
import os
import shutil
import signal
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.checkpoint.state_dict import set_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from data import SYNTHETIC_SAMPLES
from load_qwen import load_model, resolve_checkpoint, save_model
from model import Qwen3VL, tiny_config
from processor import load_tokenizer, tiny_tokenizer
from pvm import attach_pvm

# Everything that depends on --size; the paper's PVM layers (4B: 5, 11, 17 of 36; 8B: 8, 16, 24
# of 36) and width. checkpoint None: the tiny random model, built here. lr and
# batch_size are train.py's; the tiny model learns within a minute only with a larger rate and
# smaller batches, and on its small matrices a second CPU thread costs more than it gives.
SIZES = {
    "4b": {"checkpoint": "Qwen/Qwen3-VL-4B-Instruct", "pvm_layers": (5, 11, 17),
           "pvm_dim": 512, "lr": 1e-4, "batch_size": 64, "grad_ckpt": True, "threads": None},
    "8b": {"checkpoint": "Qwen/Qwen3-VL-8B-Instruct", "pvm_layers": (8, 16, 24),
           "pvm_dim": 512, "lr": 1e-4, "batch_size": 64, "grad_ckpt": True, "threads": None},
    "tiny": {"checkpoint": None, "pvm_layers": (1, 3), "pvm_dim": 64,
             "lr": 1e-2, "batch_size": 8, "grad_ckpt": False, "threads": 1},
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # every script's default


def tiny_model(seed):
    """A small random Qwen3-VL (model.tiny_config), a function of the seed, frozen."""
    torch.manual_seed(seed)
    model = Qwen3VL(tiny_config())
    for name, p in model.named_parameters():
        # N(0, 0.02) as the released models' initializer_range; the head larger, or the logits of
        # a 64-wide normalised state would stay within about +-1: no token could stand out
        if p.dim() == 2:
            nn.init.normal_(p, std=0.25 if name == "lm_head.weight" else 0.02)
    return model.eval().requires_grad_(False)


def checkpoint_and_tokenizer(size, model):
    """The checkpoint directory of --size (or --model) and its tokenizer; for the tiny random
    model, None and the byte-level tiny tokenizer."""
    if SIZES[size]["checkpoint"] is None:
        if model:
            raise ValueError(f"--model does not go with --size {size}, a random model")
        return None, tiny_tokenizer()
    checkpoint = resolve_checkpoint(model or SIZES[size]["checkpoint"])
    return checkpoint, load_tokenizer(checkpoint)


def build_model(size, seed, checkpoint, device, dtype, grad_ckpt=None):
    """The frozen backbone of `checkpoint` (None: the tiny random one) with fresh PVM blocks of
    --size's layers and width, the same on every process (seeded), their weights in float32 (the
    master weights AdamW updates; autocast runs the matmuls in bf16)."""
    size = SIZES[size]
    model = tiny_model(seed) if checkpoint is None else load_model(checkpoint, device, dtype)
    torch.manual_seed(seed)
    attach_pvm(model.to(device, dtype), size["pvm_layers"], size["pvm_dim"])
    for i in size["pvm_layers"]:
        model.layers[i].pvm_block.float()
    model.gradient_checkpointing = size["grad_ckpt"] if grad_ckpt is None else grad_ckpt
    return model


def save_backbone(model, folder, tokenizer, checkpoint):
    """The model but PVM as a checkpoint directory that generate.py --model reads: the weights,
    config, tokenizer, and the sampling settings of the checkpoint it came from, if any."""
    save_model(model, folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    if checkpoint and (checkpoint / "generation_config.json").exists():
        shutil.copy(checkpoint / "generation_config.json", folder)

# -----------------------------------------------------------------------------
# processes: one, or one per GPU under torchrun

def init_process(device, size, batch):
    """(rank, world, device) of this process. Under torchrun, a process group: nccl with a GPU
    each, gloo on CPUs. batch: (option, value) of a step's global batch, split over them."""
    rank, world, cuda = 0, 1, device.startswith("cuda")
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        rank, world = dist.get_rank(), dist.get_world_size()
    if SIZES[size]["threads"] and not cuda:
        torch.set_num_threads(SIZES[size]["threads"])
    if batch[1] % world:
        raise ValueError(f"{batch[0]} {batch[1]} does not split over {world} processes")
    return rank, world, device


def end_process():
    if dist.is_initialized():
        dist.destroy_process_group()


def distribute(objective, model, device, shard):
    """Under torchrun, the objective (a module around the model) in DDP, or with `shard` the
    model's parameters, gradients and AdamW states sharded over the processes by FSDP2; on CUDA
    with its mixed precision: the passes (sampling too) on bf16 copies of the float32 master
    weights, the gradients reduced in float32 (on one GPU too, a process group of one)."""
    if shard and "cuda" in device and not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    if not dist.is_initialized():
        return objective
    if not shard:
        return DDP(objective, device_ids=[torch.device(device).index] if "cuda" in device else None)
    dtypes = (torch.bfloat16, torch.float32) if "cuda" in device else ()  # on the CPU: float32
    policy = torch.distributed.fsdp.MixedPrecisionPolicy(*dtypes)
    for layer in model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the rest: embeddings, vision tower, final norm, head
    register_fsdp_forward_method(model, "hidden_states")  # what generate and the loss call
    return objective


@contextmanager
def gathered(model):
    """FSDP2's shards gathered for a block (sampling, saving the whole model): generation runs in
    inference mode, where FSDP2 cannot gather. Nothing to do without FSDP2."""
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

# -----------------------------------------------------------------------------
# option checks: one table for every script (NaN fails every comparison, so it is refused too)

OPTIONS = {  # option -> (what its value must pass, what it must be)
    **dict.fromkeys(("lr", "grad_clip", "batch_size", "save_every", "max_len", "max_steps",
                     "synthetic_samples", "prompts", "samples", "max_new_tokens", "limit",
                     "micro_batch_tokens"),
                    (lambda v: 0 < v < math.inf, "positive")),
    **dict.fromkeys(("eval_every", "eval_samples", "weight_decay", "top_k", "temperature"),
                    (lambda v: 0 <= v < math.inf, "a number >= 0")),
    "warmup": (lambda v: 0 <= v <= 1, "a share of the steps, from 0 to 1"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
}


def check_options(args):
    """args, once every option the table names passes: refused before any work, an option would
    fail deep inside or silently misbehave (a negative rate is gradient ascent, a NaN one NaN
    weights, a NaN temperature NaN sampling)."""
    for name, (test, must) in OPTIONS.items():
        if getattr(args, name, None) is not None and not test(getattr(args, name)):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be {must}, got {getattr(args, name)}")
    try:  # torch names a device this machine lacks, but only where it is first used
        torch.empty(0, device=getattr(args, "device", "cpu"))
    except Exception as e:  # the first line of torch's message is the one that says why
        raise ValueError(f"--device {args.device}: {str(e).splitlines()[0]}") from None
    return args


# -----------------------------------------------------------------------------
# the output folder, checkpoints, the log

def prepare_out(out, resume):
    """The output folder, made now (so that a bad path fails before any work). A fresh run never
    mixes with an earlier one: it refuses a folder that holds one."""
    out = Path(out)
    earlier = [f for f in ("state.pt", "log.jsonl") if (out / f).exists()]
    if earlier and not resume:
        raise ValueError(f"{out} holds an earlier run ({', '.join(earlier)}): pass --resume, "
                         "or another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_atomic(path, write):
    """write(a temporary file), then rename it to `path`: a crash never leaves half a file there,
    and the previous one stays whole. The temporary name holds the process id."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C too
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception):  # torch and safetensors report a full disk in their types
            raise OSError(f"cannot write {path}: {e}") from e
        raise


def save_checkpoint(out, model, optimizer, step, run, rank):
    """state.pt (the trainable weights, AdamW's states, the step, the settings) for --resume, and
    pvm.safetensors (PVM under the reference names) for generate.py --pvm. PyTorch's state-dict
    API gathers FSDP2's shards; rank 0 writes. No RNG state: nothing in the loops draws from
    torch's global generator, and the data position is the step."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights, optimizer_state = get_state_dict(model, optimizer, options=options)
    if rank == 0:
        pvm = {f"model.language_model.{k}": v for k, v in weights.items() if ".pvm_block." in k}
        write_atomic(out / "pvm.safetensors", partial(save_file, pvm))
        log = out / "log.jsonl"  # its size now: what a resume keeps of it
        state = {"step": step, "run": run, "weights": weights, "optimizer": optimizer_state,
                 "log_bytes": log.stat().st_size if log.exists() else 0}
        write_atomic(out / "state.pt", partial(torch.save, state))  # last: it commits the step


def resume(out, model, optimizer, run, rank):
    """Load state.pt, which must come from this same configuration; the step to continue at. The
    log keeps the steps up to that one, so a step lost in a crash is logged once, when redone."""
    path = out / "state.pt"
    if not path.exists():
        raise ValueError(f"--resume: no checkpoint {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved, step = state["run"], state["step"]  # a KeyError: another script's file
        if diff := [f"{k} {saved.get(k)!r} there, {v!r} here"
                    for k, v in run.items() if saved.get(k) != v]:
            raise ValueError(f"it comes from another configuration: {'; '.join(diff)}")
        set_state_dict(model, optimizer, model_state_dict=state["weights"],
                       optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=False))
    except Exception as e:  # truncated, another script's, mis-shaped tensors (several lines)
        raise ValueError(f"--resume: {path} does not fit this run: {' '.join(str(e).split())}"
                         ) from None
    if rank == 0 and (out / "log.jsonl").exists():
        os.truncate(out / "log.jsonl", state["log_bytes"])
    return step


def log(out, entry):
    with open(out / "log.jsonl", "a") as f:  # a line at a time: a crash loses nothing logged
        f.write(json.dumps(entry) + "\n")


def check_finite(grad_norm, loss, step):
    """Stop before an update from a NaN or infinite gradient, which would make every trained
    weight NaN: nothing of the step is applied or saved (the last checkpoint stays as it was)."""
    if not math.isfinite(grad_norm):
        raise ValueError(f"step {step + 1}: gradient norm {grad_norm}, loss {loss}: training "
                         "diverged; nothing of this step was applied or saved")


@contextmanager
def whole_step():
    """Ctrl-C held back until the block ends: an update is applied whole or not at all, so the
    checkpoint written on Ctrl-C is consistent."""
    held = []
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def save_interrupted(out, model, optimizer, done, start, run, rank):
    """On Ctrl-C (which reaches every process): keep the finished steps and say so."""
    if done > start:
        save_checkpoint(out, model, optimizer, done, run, rank)
    if rank == 0:
        state = f"step {done} is saved in {out}, --resume continues" if done else "no step done"
        print(f"interrupted: {state}", file=sys.stderr)

# -----------------------------------------------------------------------------
# the command line

def training_options(description, out, save_every, data):
    """The options of train.py and grpo.py that mean the same in both; each adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size", choices=SIZES, default="4b",
                   help="PVM layers, checkpoint, defaults; tiny: a random model, kept in --out")
    p.add_argument("--model", help="checkpoint directory or hub id (default: --size's official)")
    p.add_argument("--data", help=f"JSON lines, {data} (default: the built-in task)")
    p.add_argument("--synthetic-samples", type=int, default=SYNTHETIC_SAMPLES,
                   help="size of the built-in task")
    p.add_argument("--out", default=out, help="directory for pvm.safetensors, state.pt, log")
    p.add_argument("--resume", action="store_true", help="continue from --out/state.pt")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: one epoch)")
    p.add_argument("--save-every", type=int, default=save_every, help="steps between checkpoints")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction,
                   help="gradient checkpointing (default: on but for tiny)")
    p.add_argument("--seed", type=int, default=0, help="of PVM's init, data order, sampling")
    p.add_argument("--device", default=DEVICE, help="cuda (the default where there is one) or cpu")
    return p


def parse(p, argv, sizes, names):
    """The command line's options; those of `names` that it leaves out take their value from
    sizes[--size]; then the table's checks (check_options)."""
    size = sizes[p.parse_known_args(argv)[0].size]
    p.set_defaults(**{name: size[name] for name in names})
    return check_options(p.parse_args(argv))


def command(main, parse_args):
    """The command of a script: a function of argv that returns the exit status. Bad input (a
    ValueError or OSError, which the loaders raise naming the file) is one `error:` line and 2;
    Ctrl-C is 130; a closed stdout (`| head`) is 141, quietly, as a process that SIGPIPE ends."""
    def cli(argv=None):
        try:
            main(parse_args(argv))
        except BrokenPipeError:  # stdout to /dev/null: the flush at exit would fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print()  # ends an answer's line: the shell does not for a program that exits itself
            return 130
        return 0
    return cli
