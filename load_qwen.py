"""
Official Qwen3-VL checkpoints in, our model out; the tokenizer; the chat format.

    load_model("Qwen/Qwen3-VL-4B-Instruct" or a directory, device, dtype) -> model.Qwen3VL
    load_tokenizer(same) -> tokenizers.Tokenizer
    encode_chat(tokenizer, messages) -> input_ids (1, T), pixel_values (N, 1536), image_grid_thw (images, 3)

A checkpoint directory holds config.json and model.safetensors (or shards listed in
model.safetensors.index.json) and tokenizer.json. Left out on purpose: tool calls in the chat
format, video, other file formats than safetensors.
"""
import ctypes
import json
import os
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer

from model import Config, Qwen3VL
from vision import MERGE, PATCH, TEMPORAL, load_image, preprocess_image


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
        return Path(snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # offline and not cached, unknown id, no access, ...
        raise ValueError(f"{path_or_id} is not a local directory and could not be fetched from the "
                         f"Hugging Face Hub (offline and not cached?): {type(e).__name__}") from None


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"missing {Path(path).name} in {Path(path).parent}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def config_from_hf(hf):
    """The official config.json, field by field, into our flat Config."""
    if hf.get("model_type") != "qwen3_vl":
        raise ValueError(f"config.json describes model_type {hf.get('model_type')!r} "
                         f"({', '.join(hf.get('architectures') or [])}), not a Qwen3-VL checkpoint")
    text, vis = hf["text_config"], hf["vision_config"]
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}  # the name changed across versions
    fixed = {"vision patch_size": (vis["patch_size"], PATCH), "temporal_patch_size": (vis["temporal_patch_size"], TEMPORAL),
             "spatial_merge_size": (vis["spatial_merge_size"], MERGE), "in_channels": (vis.get("in_channels", 3), 3),
             "hidden_act": (text.get("hidden_act", "silu"), "silu"), "attention_bias": (text.get("attention_bias", False), False),
             "mrope_interleaved": (rope.get("mrope_interleaved", True), True),
             "vision out_hidden_size": (vis["out_hidden_size"], text["hidden_size"])}
    for field, (got, want) in fixed.items():
        if got != want:
            raise ValueError(f"config.json has {field} = {got}; this implementation supports {want}")
    return Config(
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],            # SwiGLU width
        num_layers=text["num_hidden_layers"],
        num_heads=text["num_attention_heads"],
        num_kv_heads=text["num_key_value_heads"],               # grouped-query attention
        head_dim=text["head_dim"],
        rms_norm_eps=text["rms_norm_eps"],
        rope_theta=text.get("rope_theta") or rope["rope_theta"],
        mrope_section=tuple(rope["mrope_section"]),             # (t, h, w) frequency pairs
        max_position_embeddings=text["max_position_embeddings"],
        tie_word_embeddings=hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)),
        image_token_id=hf["image_token_id"],
        vision_hidden_size=vis["hidden_size"],
        vision_depth=vis["depth"],
        vision_num_heads=vis["num_heads"],
        vision_intermediate_size=vis["intermediate_size"],
        vision_num_position_embeddings=vis["num_position_embeddings"],   # a 48x48 learned grid
        vision_deepstack_indexes=tuple(vis["deepstack_visual_indexes"]),  # blocks feeding DeepStack
    )


# Checkpoint tensor name -> our parameter name; {} is a layer / block / merger index.
WEIGHT_MAP = {
    "model.language_model.embed_tokens.weight": "embed_tokens.weight",
    **{f"model.language_model.layers.{{}}.{m}.weight": f"layers.{{}}.{m}.weight" for m in (
        "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
    "model.language_model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",  # absent or a copy of the embedding in tied checkpoints
    "model.visual.patch_embed.proj.weight": "visual.patch_embed.weight",  # Conv3d kernel, flattened
    "model.visual.patch_embed.proj.bias": "visual.patch_embed.bias",
    "model.visual.pos_embed.weight": "visual.pos_embed.weight",
    **{f"model.visual.blocks.{{}}.{m}.{p}": f"visual.blocks.{{}}.{m}.{p}" for p in ("weight", "bias")
       for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")},
    **{f"model.visual.{merger}.{m}.{p}": f"visual.{merger}.{m}.{p}" for p in ("weight", "bias")
       for merger in ("merger", "deepstack_merger_list.{}") for m in ("norm", "linear_fc1", "linear_fc2")},
}


def _patterns(table):
    """{pattern: target} with {} for an index -> [(compiled pattern, target)], compiled once."""
    return [(re.compile(re.escape(k).replace(r"\{\}", r"(\d+)")), v) for k, v in table.items()]


_TO_OURS, _TO_CHECKPOINT = _patterns(WEIGHT_MAP), _patterns({v: k for k, v in WEIGHT_MAP.items()})


def _rename(name, patterns):
    """The target of the first pattern that matches all of `name`, or None."""
    return next((target.format(*m.groups()) for p, target in patterns if (m := p.fullmatch(name))), None)


def our_name(checkpoint_name):
    if (ours := _rename(checkpoint_name, _TO_OURS)) is None:
        raise ValueError(f"unexpected tensor {checkpoint_name} in checkpoint (not a Qwen3-VL weight)")
    return ours


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def read_header(f):
    """A .safetensors file is an 8-byte header length, a JSON header {name: dtype, shape,
    data_offsets}, then raw little-endian data. Returns (where the data starts, the header)."""
    n = int.from_bytes(f.read(8), "little")
    try:
        if n > os.fstat(f.fileno()).st_size - 8:
            raise ValueError("header length beyond the end of the file")
        header = json.loads(f.read(n))
    except ValueError as e:  # a Git LFS pointer, an HTML error page, a truncated download, ...
        raise ValueError(f"{f.name} is not a safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return 8 + n, header


def read_tensor(f, data_start, name, info, out=None):
    """Read one tensor with plain file reads, into `out` when given (same dtype and size). Not a
    memory map: a map keeps every page it touched resident, a second copy of the weights."""
    if info["dtype"] not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    out = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]]) if out is None else out
    f.seek(data_start + start)
    buffer = (ctypes.c_char * (end - start)).from_address(out.data_ptr())  # the tensor's own bytes
    if end > start and f.readinto(buffer) != end - start:
        raise ValueError(f"checkpoint file is truncated at tensor {name}")
    return out


def checkpoint_targets(model):
    """What each checkpoint tensor fills, by its name in our naming (WEIGHT_MAP): our parameters,
    except that a layer's qkv_proj is filled as the checkpoint's q_proj, k_proj and v_proj, which
    are its blocks of rows. A tied lm_head appears once, as embed_tokens.weight."""
    targets = dict(model.named_parameters())
    for i, layer in enumerate(model.layers):
        qkv = targets.pop(f"layers.{i}.self_attn.qkv_proj.weight")
        blocks = qkv.split([n * layer.self_attn.head_dim for n in layer.self_attn.heads])
        targets.update({f"layers.{i}.self_attn.{p}_proj.weight": block for p, block in zip("qkv", blocks)})
    return targets


def load_weights(model, ckpt):
    """Read every checkpoint tensor into its parameter: straight into its memory when dtype and
    device allow, else through one temporary tensor, so no second copy of the model is ever held.
    Strict: unknown, missing, duplicated or mis-shaped tensors raise, naming the tensor."""
    index = ckpt / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.exists() else ["model.safetensors"]
    targets = checkpoint_targets(model)
    filled = set()
    for file in files:
        if not (ckpt / file).exists():
            raise ValueError(f"missing weights file {file} in {ckpt}")
        with open(ckpt / file, "rb") as f:
            data_start, header = read_header(f)
            for name, info in header.items():
                ours = our_name(name)
                if ours == "lm_head.weight" and model.config.tie_word_embeddings:
                    continue  # tied: the head is the embedding, already loaded
                if ours not in targets or ours in filled:
                    raise ValueError(f"checkpoint tensor {name} does not fit the model described by config.json"
                                     if ours not in targets else f"tensor {name} appears twice in the checkpoint")
                param, shape = targets[ours].data, torch.Size(info["shape"])
                if ours == "visual.patch_embed.weight":  # Conv3d (C, 3, 2, 16, 16) -> our Linear (C, 1536)
                    shape = shape[:1] + (shape[1:].numel(),)
                if shape != param.shape:
                    raise ValueError(f"tensor {name} has shape {tuple(info['shape'])} in the checkpoint, "
                                     f"the model expects {tuple(param.shape)}")
                if param.device.type == "cpu" and param.dtype == SAFETENSORS_DTYPES.get(info["dtype"]):
                    read_tensor(f, data_start, name, info, out=param)
                else:  # converts dtype and moves to the device on the way
                    param.copy_(read_tensor(f, data_start, name, info).view(shape))
                filled.add(ours)
    if missing := sorted(targets.keys() - filled):
        example = _rename(missing[0], _TO_CHECKPOINT)
        raise ValueError(f"checkpoint {ckpt} is missing {len(missing)} tensor(s), e.g. {example}")


def load_model(path_or_id, device="cpu", dtype=torch.float32, pvm=None):
    """Build the model on the meta device (no memory), allocate it once in `dtype` on `device`,
    then stream the weights in. The backbone comes back frozen, in eval mode; `pvm` is an
    optional file of PVM weights to attach (see pvm.py)."""
    ckpt = resolve_checkpoint(path_or_id)
    config = config_from_hf(read_json(ckpt / "config.json"))
    with torch.device("meta"):
        model = Qwen3VL(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gives every parameter new storage: tie again
        model.lm_head.weight = model.embed_tokens.weight
    load_weights(model, ckpt)
    model.eval().requires_grad_(False)
    if pvm is not None:
        import pvm as pvm_module
        pvm_module.load_pvm(model, pvm)
    return model


def load_tokenizer(path_or_id):
    ckpt = resolve_checkpoint(path_or_id)
    if not (ckpt / "tokenizer.json").exists():
        raise ValueError(f"missing tokenizer.json in {ckpt}")
    return Tokenizer.from_file(str(ckpt / "tokenizer.json"))


# -----------------------------------------------------------------------------
# the chat format (what the official chat_template.json produces, without tools)

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def _parts(content):
    """Message content as a list of parts: a string is one text part."""
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _is_image(part):
    return part.get("type") == "image" or "image" in part or "path" in part


def chat_text(messages, add_generation_prompt=True):
    """messages -> (prompt text with one <|image_pad|> per image, the images in order, and the
    character spans (start, end) of each assistant reply with its <|im_end|>, the tokens a
    fine-tuning loss is taken on). Messages are {"role": "system" | "user" | "assistant",
    "content": str or [{"type": "text", "text": ...}, {"type": "image", "image": PIL or path}]}
    ("path": ... works too)."""
    text, images, spans = "", [], []
    for i, message in enumerate(messages):
        role, parts = message["role"], _parts(message["content"])
        if role == "system" and i > 0:
            continue  # the official template only reads a system message in first place
        text += f"<|im_start|>{role}\n"
        start = len(text)
        for part in parts:
            if role == "user" and _is_image(part):
                if part.get("image", part.get("path")) is None:
                    raise ValueError(f"an image part needs an 'image' (PIL image or file path) or 'path' key: {part}")
                images.append(part.get("image", part.get("path")))
                text += IMAGE_PLACEHOLDER
            elif "text" in part:
                text += part["text"]
        text += "<|im_end|>"
        if role == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text, images, spans


def encode_chat_with_spans(tokenizer, messages, add_generation_prompt=True):
    """As encode_chat, plus a bool (1, T) mask of the tokens inside assistant replies."""
    text, images, spans = chat_text(messages, add_generation_prompt)
    images = [load_image(im) if isinstance(im, (str, Path)) else im for im in images]
    pixel_values, grids = zip(*map(preprocess_image, images)) if images else ((), ())
    encoding = tokenizer.encode(text, add_special_tokens=False)
    in_reply = [any(s <= start < e for s, e in spans) for start, _ in encoding.offsets]
    # each image's one <|image_pad|> becomes one pad per merged visual token, as the processor does
    pad_id, counts = tokenizer.token_to_id("<|image_pad|>"), iter(int(g.prod()) // MERGE**2 for g in grids)
    ids, mask = [], []
    for token, m in zip(encoding.ids, in_reply):
        n = next(counts, None) if token == pad_id else 1
        if n is None:
            raise ValueError("the prompt holds more <|image_pad|> tokens than there are images")
        ids += [token] * n
        mask += [m] * n
    input_ids, in_reply = torch.tensor([ids]), torch.tensor([mask])
    if not images:
        return input_ids, None, None, in_reply
    return input_ids, torch.cat(pixel_values), torch.cat(grids), in_reply


def encode_chat(tokenizer, messages, add_generation_prompt=True):
    """Chat messages with images -> input_ids (1, T), pixel_values (N, 1536) or None,
    image_grid_thw (images, 3) or None: what the reference processor's apply_chat_template gives."""
    return encode_chat_with_spans(tokenizer, messages, add_generation_prompt)[:3]
