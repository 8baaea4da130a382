"""
The official checkpoint format, both ways: config.json <-> our Config, the checkpoint's tensor
names <-> our parameters.

    load_model("Qwen/Qwen3-VL-4B-Instruct" or a directory, device, dtype) -> model.Qwen3VL
    save_model(model, directory): the official layout, for a model made here (the tiny one)

A checkpoint directory holds config.json, model.safetensors (or shards listed in
model.safetensors.index.json), generation_config.json and tokenizer.json (processor.py reads
it). PVM weights are a file of their own (pvm.py). Left out on purpose: other file formats.
"""
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import Config, Qwen3VL
from vision import MERGE, PATCH, TEMPORAL


def resolve_checkpoint(path_or_id):
    """A local directory as it is, or a hub id like Qwen/Qwen3-VL-4B-Instruct through
    huggingface_hub (its cache first, then a download)."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path_or_id} is a file; expected a checkpoint directory")
    if not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", str(path_or_id)):
        raise ValueError(f"checkpoint directory not found: {path_or_id}")
    from huggingface_hub import snapshot_download
    try:
        files = ["*.json", "*.safetensors"]
        return Path(snapshot_download(str(path_or_id), allow_patterns=files))
    except Exception as e:  # offline and not cached, unknown id, no access, ...
        raise ValueError(f"{path_or_id} is not a local directory and could not be fetched from "
                         f"the Hugging Face Hub ({type(e).__name__}); offline, pass a downloaded "
                         "checkpoint with --model DIR") from None


def read_json(path):
    """A JSON file's contents; a missing or broken file is a ValueError that names it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"missing {Path(path).name} in {Path(path).parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


# -----------------------------------------------------------------------------
# config.json <-> Config: a glossary of the official names

CONFIG_FIELDS = {  # our Config field -> its place in config.json
    "vocab_size": "text_config.vocab_size",                      # 151,936 for both sizes
    "hidden_size": "text_config.hidden_size",                    # D: 2560 (4B), 4096 (8B)
    "intermediate_size": "text_config.intermediate_size",        # SwiGLU width
    "num_layers": "text_config.num_hidden_layers",               # 36 for both sizes
    "num_heads": "text_config.num_attention_heads",
    "num_kv_heads": "text_config.num_key_value_heads",           # grouped-query attention
    "head_dim": "text_config.head_dim",                          # 128, not D / heads
    "rms_norm_eps": "text_config.rms_norm_eps",
    "rope_theta": "text_config.rope_theta",                      # 5,000,000
    "mrope_section": "text_config.rope_scaling.mrope_section",   # (t, h, w) frequency pairs
    "max_position_embeddings": "text_config.max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",                # 4B: tied; 8B: not
    "image_token_id": "image_token_id",                          # <|image_pad|>, 151655
    "vision_hidden_size": "vision_config.hidden_size",           # 1024 (4B), 1152 (8B)
    "vision_depth": "vision_config.depth",
    "vision_num_heads": "vision_config.num_heads",
    "vision_intermediate_size": "vision_config.intermediate_size",
    "vision_num_position_embeddings": "vision_config.num_position_embeddings",  # 48x48 grid
    "vision_deepstack_indexes": "vision_config.deepstack_visual_indexes",  # blocks for DeepStack
}
FIXED = {  # what this implementation supports, in config.json's names
    "model_type": "qwen3_vl",
    "text_config.hidden_act": "silu",  # SwiGLU
    "text_config.attention_bias": False,
    "text_config.rope_scaling.mrope_interleaved": True,  # Qwen3-VL's t,h,w,t,h,w,... layout
    "vision_config.hidden_act": "gelu_pytorch_tanh",
    "vision_config.patch_size": PATCH,  # 16 x 16 pixels
    "vision_config.temporal_patch_size": TEMPORAL,
    "vision_config.spatial_merge_size": MERGE,  # 2 x 2 patches make one visual token
    "vision_config.in_channels": 3,
}


def lookup(hf, place):
    """config.json's value at a dotted place, or None."""
    for key in place.split("."):
        hf = hf.get(key) if isinstance(hf, dict) else None
    return hf


def config_from_hf(hf):
    """The official config.json, field by field, into our flat Config."""
    if not isinstance(hf, dict) or hf.get("model_type") != "qwen3_vl":
        kind = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
        raise ValueError(f"config.json describes {kind!r}, not a Qwen3-VL checkpoint")
    text = hf.get("text_config") or {}
    # names that changed across transformers versions: rope_parameters for rope_scaling
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    rope_theta = text.get("rope_theta", rope.get("rope_theta"))
    text = {**text, "rope_scaling": rope, "rope_theta": rope_theta}
    hf = {**hf, "text_config": text,
          "tie_word_embeddings": hf.get("tie_word_embeddings", text.get("tie_word_embeddings"))}
    for place, want in FIXED.items():
        if lookup(hf, place) not in (None, want):
            raise ValueError(f"config.json has {place} = {lookup(hf, place)!r}; "
                             f"this implementation supports {want!r}")
    values = {field: lookup(hf, place) for field, place in CONFIG_FIELDS.items()}
    if missing := [CONFIG_FIELDS[field] for field, v in values.items() if v is None]:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    config = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    if sum(config.mrope_section) != config.head_dim // 2:
        raise ValueError(f"config.json: text_config.rope_scaling.mrope_section sums to "
                         f"{sum(config.mrope_section)}, not head_dim / 2 = {config.head_dim // 2}")
    if not all(0 <= i < config.vision_depth for i in config.vision_deepstack_indexes):
        raise ValueError(f"config.json: vision_config.deepstack_visual_indexes "
                         f"{list(config.vision_deepstack_indexes)} go beyond the vision depth "
                         f"{config.vision_depth}")
    return config


def hf_config(config):
    """Our Config as an official config.json (the inverse of config_from_hf)."""
    hf = {"architectures": ["Qwen3VLForConditionalGeneration"], "video_token_id": 151656,
          "vision_start_token_id": 151652, "vision_end_token_id": 151653,
          "text_config": {"model_type": "qwen3_vl_text", "rope_scaling": {"rope_type": "default"},
                          "eos_token_id": config.eos_token_ids[0],
                          "tie_word_embeddings": config.tie_word_embeddings},
          "vision_config": {"model_type": "qwen3_vl", "out_hidden_size": config.hidden_size}}
    ours = {place: getattr(config, field) for field, place in CONFIG_FIELDS.items()}
    for place, value in {**FIXED, **ours}.items():
        *parents, key = place.split(".")
        node = hf
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = list(value) if isinstance(value, tuple) else value
    return hf


# -----------------------------------------------------------------------------
# the weights

# Checkpoint tensor name -> our parameter name; {} is a layer / block / merger index.
WEIGHT_MAP = {
    "model.language_model.embed_tokens.weight": "embed_tokens.weight",
    **{f"model.language_model.layers.{{}}.{m}.weight": f"layers.{{}}.{m}.weight" for m in (
        "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
    "model.language_model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",  # absent or a copy of the embedding in tied checkpoints
    "model.visual.patch_embed.proj.weight": "visual.patch_embed.weight",  # a Conv3d, flattened
    "model.visual.patch_embed.proj.bias": "visual.patch_embed.bias",
    "model.visual.pos_embed.weight": "visual.pos_embed.weight",
    **{f"model.visual.blocks.{{}}.{m}.{p}": f"visual.blocks.{{}}.{m}.{p}"
       for p in ("weight", "bias")
       for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")},
    **{f"model.visual.{merger}.{m}.{p}": f"visual.{merger}.{m}.{p}"
       for p in ("weight", "bias") for merger in ("merger", "deepstack_merger_list.{}")
       for m in ("norm", "linear_fc1", "linear_fc2")},
}


def patterns(table):
    """{pattern: target} with {} for an index -> [(compiled pattern, target)]."""
    return [(re.compile(re.escape(k).replace(r"\{\}", r"(\d+)")), v) for k, v in table.items()]


TO_OURS, TO_CHECKPOINT = patterns(WEIGHT_MAP), patterns({v: k for k, v in WEIGHT_MAP.items()})


def rename(name, table):
    """The target of the first pattern that matches all of `name`, or None."""
    for pattern, target in table:
        if match := pattern.fullmatch(name):
            return target.format(*match.groups())
    return None


def weight_files(ckpt):
    """The checkpoint's safetensors files: one, or the shards its index lists (the 8B's 4). An
    index without a weight_map lists none, and load_weights then names a missing tensor."""
    index = ckpt / "model.safetensors.index.json"
    if not index.exists():
        return ["model.safetensors"]
    return sorted(set(read_json(index).get("weight_map", {}).values()))


def load_weights(model, ckpt):
    """Copy every checkpoint tensor into its parameter. The files are memory-mapped (their pages
    are the page cache's, not a second copy of the weights) and each tensor is converted to the
    parameter's dtype and device on the way. Strict: an unknown, missing, duplicated or
    mis-shaped tensor raises, naming the tensor."""
    params, filled = dict(model.named_parameters()), set()  # a tied head appears once
    for file in weight_files(ckpt):
        try:  # safetensors refuses a header that does not fit its data (untrusted input)
            f = safe_open(ckpt / file, framework="pt")
        except Exception as e:  # missing, truncated, inconsistent, a Git LFS pointer
            raise ValueError(f"cannot read weights file {ckpt / file}: {e}") from None
        for name in f.keys():
            ours = rename(name, TO_OURS)
            if ours is None:
                raise ValueError(f"unexpected tensor {name} in checkpoint (not a Qwen3-VL weight)")
            if ours == "lm_head.weight" and model.config.tie_word_embeddings:
                continue  # tied: the head is the embedding, already loaded
            if ours not in params:
                raise ValueError(f"checkpoint tensor {name} does not fit the model of config.json")
            if ours in filled:
                raise ValueError(f"tensor {name} appears twice in the checkpoint")
            tensor, param = f.get_tensor(name), params[ours]
            if ours == "visual.patch_embed.weight":  # Conv3d (C, 3, 2, 16, 16) -> Linear (C, 1536)
                tensor = tensor.flatten(1)
            if tensor.shape != param.shape:
                raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)} in the "
                                 f"checkpoint, the model expects {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor)
            filled.add(ours)
    if missing := sorted(params.keys() - filled):
        raise ValueError(f"checkpoint {ckpt} is missing {len(missing)} tensor(s), "
                         f"e.g. {rename(missing[0], TO_CHECKPOINT)}")


def load_model(path_or_id, device="cpu", dtype=torch.float32):
    """Build the model on the meta device (no memory), allocate it once in `dtype` on `device`,
    then copy the weights in. It comes back frozen, in eval mode; pvm.load_pvm attaches PVM."""
    ckpt = resolve_checkpoint(path_or_id)
    config = config_from_hf(read_json(ckpt / "config.json"))
    config.eos_token_ids = stop_tokens(ckpt)
    with torch.device("meta"):
        model = Qwen3VL(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gives every parameter new storage: tie again
        model.lm_head.weight = model.embed_tokens.weight
    load_weights(model, ckpt)
    return model.eval().requires_grad_(False)


def stop_tokens(ckpt):
    """The ids that end an answer: generation_config.json's eos_token_id (the released models:
    <|im_end|> and <|endoftext|>), else config.json's; none if neither names one."""
    file = ckpt / "generation_config.json"
    eos = read_json(file).get("eos_token_id") if file.exists() else None
    if eos is None:
        eos = lookup(read_json(ckpt / "config.json"), "text_config.eos_token_id")
    return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)


def save_model(model, directory):
    """The model as an official checkpoint directory (config.json, model.safetensors,
    generation_config.json), which load_model and transformers both read. PVM is not saved."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for ours, param in model.named_parameters():  # a tied head once, as the embedding
        if ".pvm_block." in ours:
            continue
        tensor = param.detach().cpu().contiguous()
        if ours == "visual.patch_embed.weight":  # our Linear (C, 1536) -> Conv3d (C, 3, 2, 16, 16)
            tensor = tensor.view(-1, 3, TEMPORAL, PATCH, PATCH)
        tensors[rename(ours, TO_CHECKPOINT)] = tensor
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config(model.config), indent=2) + "\n")
    eos = {"eos_token_id": list(model.config.eos_token_ids)}
    (directory / "generation_config.json").write_text(json.dumps(eos, indent=2) + "\n")
