"""
Official Qwen3-VL checkpoints in, our model out; the tokenizer; the chat format.

    load_model("Qwen/Qwen3-VL-4B-Instruct" or a directory, device, dtype) -> model.Qwen3VL
    load_tokenizer(same) -> tokenizers.Tokenizer
    encode_chat(tokenizer, messages) -> input_ids (1, T), pixel_values (N, 1536), grid (images, 3)
    save_model(model, directory): the official layout, for a model made here (train.py's tiny one)

A checkpoint directory holds config.json, model.safetensors (or shards listed in
model.safetensors.index.json), generation_config.json and tokenizer.json. Left out on purpose:
tool calls in the chat format, video, other file formats than safetensors.
"""
import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

import pvm
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
        files = ["*.json", "*.safetensors"]
        return Path(snapshot_download(str(path_or_id), allow_patterns=files))
    except Exception as e:  # offline and not cached, unknown id, no access, ...
        raise ValueError(f"{path_or_id} is not a local directory and could not be fetched from "
                         f"the Hugging Face Hub ({type(e).__name__}); offline, pass a downloaded "
                         "checkpoint with --model DIR") from None


def check_device(name):
    """--device, if this machine has it: torch's own error would come late, deep in loading."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} is not a device name (cpu, cuda, cuda:N, mps)") from None
    mps = torch.backends.mps.is_available()
    count = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": int(mps)}  # devices of each kind
    if device.type not in count:
        raise ValueError(f"--device {name}: this program runs on cpu, cuda or mps")
    if count[device.type] == 0:
        raise ValueError(f"--device {name}, but this torch sees no {device.type} device")
    if device.index is not None and device.index >= count[device.type]:
        raise ValueError(f"--device {name}, but this machine has {count[device.type]} "
                         f"{device.type} device(s)")


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"missing {Path(path).name} in {Path(path).parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


# -----------------------------------------------------------------------------
# config.json <-> Config: a glossary of the official names

CONFIG_FIELDS = {  # our Config field -> its place in config.json
    "vocab_size": "text_config.vocab_size",
    "hidden_size": "text_config.hidden_size",
    "intermediate_size": "text_config.intermediate_size",        # SwiGLU width
    "num_layers": "text_config.num_hidden_layers",
    "num_heads": "text_config.num_attention_heads",
    "num_kv_heads": "text_config.num_key_value_heads",           # grouped-query attention
    "head_dim": "text_config.head_dim",
    "rms_norm_eps": "text_config.rms_norm_eps",
    "rope_theta": "text_config.rope_theta",
    "mrope_section": "text_config.rope_scaling.mrope_section",   # (t, h, w) frequency pairs
    "max_position_embeddings": "text_config.max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
    "image_token_id": "image_token_id",
    "vision_hidden_size": "vision_config.hidden_size",
    "vision_depth": "vision_config.depth",
    "vision_num_heads": "vision_config.num_heads",
    "vision_intermediate_size": "vision_config.intermediate_size",
    "vision_num_position_embeddings": "vision_config.num_position_embeddings",  # 48x48 grid
    "vision_deepstack_indexes": "vision_config.deepstack_visual_indexes",  # blocks for DeepStack
}
FIXED = {  # what this implementation supports, in config.json's names
    "model_type": "qwen3_vl",
    "text_config.hidden_act": "silu",
    "text_config.attention_bias": False,
    "text_config.rope_scaling.mrope_interleaved": True,
    "vision_config.hidden_act": "gelu_pytorch_tanh",
    "vision_config.patch_size": PATCH,
    "vision_config.temporal_patch_size": TEMPORAL,
    "vision_config.spatial_merge_size": MERGE,
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
    values = {field: checked(lookup(hf, place), place, type(getattr(Config, field)))
              for field, place in CONFIG_FIELDS.items()}
    config = Config(**values)
    if sum(config.mrope_section) != config.head_dim // 2:
        raise ValueError(f"config.json: text_config.rope_scaling.mrope_section sums to "
                         f"{sum(config.mrope_section)}, not head_dim / 2 = {config.head_dim // 2}")
    if not all(0 <= i < config.vision_depth for i in config.vision_deepstack_indexes):
        raise ValueError(f"config.json: vision_config.deepstack_visual_indexes "
                         f"{list(config.vision_deepstack_indexes)} go beyond the vision depth "
                         f"{config.vision_depth}")
    return config


def checked(value, place, kind):
    """config.json's value at `place` as a Config field of type `kind`, or a clear error."""
    if value is None:
        raise ValueError(f"config.json lacks {place}")
    is_int = isinstance(value, int) and not isinstance(value, bool)
    fits = {int: is_int, float: is_int or isinstance(value, float), bool: isinstance(value, bool),
            tuple: isinstance(value, list) and all(isinstance(v, int) for v in value)}[kind]
    if not fits:
        want = {int: "an integer", float: "a number", bool: "true or false",
                tuple: "a list of integers"}[kind]
        raise ValueError(f"config.json: {place} must be {want}, got {value!r}")
    return tuple(value) if kind is tuple else value


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
    index = ckpt / "model.safetensors.index.json"
    if not index.exists():
        return ["model.safetensors"]
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no weight_map")
    return sorted(set(weight_map.values()))


def load_weights(model, ckpt):
    """Copy every checkpoint tensor into its parameter. The files are memory-mapped (their pages
    are the page cache's, not a second copy of the weights) and each tensor is converted to the
    parameter's dtype and device on the way. Strict: an unknown, missing, duplicated or
    mis-shaped tensor raises, naming the tensor; so does a header that does not fit its data."""
    params, filled = dict(model.named_parameters()), set()  # a tied head appears once
    for file in weight_files(ckpt):
        f = open_safetensors(ckpt / file, "weights file")
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


def load_model(path_or_id, device="cpu", dtype=torch.float32, pvm_file=None):
    """Build the model on the meta device (no memory), allocate it once in `dtype` on `device`,
    then copy the weights in. The backbone comes back frozen, in eval mode; `pvm_file` is an
    optional file of PVM weights to attach (see pvm.py)."""
    ckpt = resolve_checkpoint(path_or_id)
    config = config_from_hf(read_json(ckpt / "config.json"))
    config.eos_token_ids = stop_tokens(ckpt)
    with torch.device("meta"):
        model = Qwen3VL(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gives every parameter new storage: tie again
        model.lm_head.weight = model.embed_tokens.weight
    load_weights(model, ckpt)
    model.eval().requires_grad_(False)
    if pvm_file is not None:
        pvm.load_pvm(model, pvm_file)
    return model


def stop_tokens(ckpt):
    """The ids that end an answer: generation_config.json's eos_token_id (the released models:
    <|im_end|> and <|endoftext|>), else config.json's; none if neither names one."""
    file = ckpt / "generation_config.json"
    eos = read_json(file).get("eos_token_id") if file.exists() else None
    if eos is None:
        eos = lookup(read_json(ckpt / "config.json"), "text_config.eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not isinstance(eos, list) or not all(isinstance(i, int) for i in eos):
        raise ValueError(f"{file}: eos_token_id must be a token id or a list of them")
    return tuple(eos)


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


def load_tokenizer(path_or_id):
    ckpt = resolve_checkpoint(path_or_id)
    if not (ckpt / "tokenizer.json").exists():
        raise ValueError(f"missing tokenizer.json in {ckpt}")
    try:
        tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    except Exception as e:  # not JSON, cut short, or not a tokenizer
        raise ValueError(f"cannot read {ckpt / 'tokenizer.json'}: {e}") from None
    for token in CHAT_TOKENS:  # another model's tokenizer would spell them out as text
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"{ckpt / 'tokenizer.json'} lacks the token {token}: "
                             "not a Qwen3-VL tokenizer")
    return tokenizer


# -----------------------------------------------------------------------------
# the chat format (what the official chat_template.json produces, without tools)

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>")


def content_parts(content):
    """A message's content as a list of parts, each {"type": "text", "text": str} or
    {"type": "image", "image": a PIL image, a path, or None where the part names none}.
    A string is one text part; a part is an image if its type says so or it has an "image" or
    "path" key (both spellings of the official template)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        raise ValueError("message content must be a string or a list of parts")
    parts = []
    for part in content:
        if part.get("type") == "image" or "image" in part or "path" in part:
            parts.append({"type": "image", "image": part.get("image", part.get("path"))})
        elif isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
    return parts


def chat_text(messages, add_generation_prompt=True):
    """messages -> (prompt text with one <|image_pad|> per image, the images in order, and the
    character spans (start, end) of each assistant reply with its <|im_end|>, the tokens a
    fine-tuning loss is taken on). Messages are {"role": "system" | "user" | "assistant",
    "content": str or [{"type": "text", "text": ...}, {"type": "image", "image": PIL or path}]}."""
    text, images, spans = "", [], []
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system" and i > 0:
            continue  # the official template only reads a system message in first place
        text += f"<|im_start|>{role}\n"
        start = len(text)
        for part in content_parts(message["content"]):
            if part["type"] == "text":
                text += part["text"]
            elif role == "user":  # images are read in user turns only
                if part["image"] is None:
                    raise ValueError("an image part needs an 'image' (a PIL image or a path)")
                images.append(part["image"])
                text += IMAGE_PLACEHOLDER
        text += "<|im_end|>"
        if role == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text, images, spans


def encode(tokenizer, messages, add_generation_prompt):
    """input_ids (1, T), pixel_values (N, 1536) or None, grid (images, 3) or None, and a bool
    (1, T) mask of the tokens inside assistant replies."""
    text, images, spans = chat_text(messages, add_generation_prompt)
    images = [load_image(im) if isinstance(im, (str, Path)) else im for im in images]
    pixel_values, grids = zip(*map(preprocess_image, images)) if images else ((), ())
    encoding = tokenizer.encode(text, add_special_tokens=False)
    in_reply = [any(s <= start < e for s, e in spans) for start, _ in encoding.offsets]
    # each image's one <|image_pad|> becomes one pad per merged visual token, as the processor
    pad_id = tokenizer.token_to_id("<|image_pad|>")
    counts = iter(int(grid.prod()) // MERGE**2 for grid in grids)
    ids, mask = [], []
    for token, reply in zip(encoding.ids, in_reply):
        n = next(counts, None) if token == pad_id else 1
        if n is None:
            raise ValueError("the prompt holds more <|image_pad|> tokens than there are images")
        ids += [token] * n
        mask += [reply] * n
    if not images:
        return torch.tensor([ids]), None, None, torch.tensor([mask])
    return torch.tensor([ids]), torch.cat(pixel_values), torch.cat(grids), torch.tensor([mask])


def encode_chat(tokenizer, messages, add_generation_prompt=True):
    """Chat messages with images -> input_ids (1, T), pixel_values (N, 1536) or None,
    image_grid_thw (images, 3) or None: what the reference processor's apply_chat_template
    gives."""
    return encode(tokenizer, messages, add_generation_prompt)[:3]


def encode_chat_for_training(tokenizer, messages):
    """As encode_chat without the generation prompt, plus the loss mask (1, T): True on the
    tokens of each assistant reply and its <|im_end|>."""
    return encode(tokenizer, messages, add_generation_prompt=False)


# -----------------------------------------------------------------------------
# checking a weights file's header: a file from the hub is untrusted input

# bytes per element of each safetensors dtype that torch reads
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def open_safetensors(path, what):
    """safetensors' safe_open, which refuses a file whose header does not fit its data (a file
    from the hub is untrusted input); its message often names no tensor, so header_problem
    looks for the one to name."""
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # missing, truncated, an inconsistent header, a Git LFS pointer
        raise ValueError(f"cannot read {what} {path}: {header_problem(path) or e}") from None


def header_problem(path):
    """What makes a safetensors file's header inconsistent, naming the tensor, or None. The format:
    8 bytes (little-endian header length), a JSON header {name: {"dtype", "shape", "data_offsets":
    [begin, end]}} with offsets into the data that follows; each tensor takes exactly its bytes."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size < 8:
        return None
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        data_bytes = path.stat().st_size - 8 - length
        if data_bytes < 0:  # cut short, or not safetensors at all: safetensors' message says so
            return None
        try:
            header = json.loads(f.read(length), object_pairs_hook=no_duplicates)
        except ValueError as e:  # not JSON, not UTF-8, or a name twice
            return f"the header is not valid: {e}"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    spans = []  # (begin, end, name) of each tensor
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if problem := entry_problem(entry, data_bytes):
            return f"tensor {name}: {problem}"
        spans.append((*entry["data_offsets"], name))
    spans.sort()
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            return f"tensors {name} and {other} overlap (bytes {begin} to {end} of the data)"
    return None


def no_duplicates(pairs):
    """A JSON object's pairs as a dict, refusing a key given twice (json.loads keeps the last)."""
    seen = set()
    for name, _ in pairs:
        if name in seen:
            raise ValueError(f"{name} appears twice")
        seen.add(name)
    return dict(pairs)


def entry_problem(entry, data_bytes):
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(entry, dict):
        return "its entry is not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        return f"unknown dtype {dtype!r}"
    if not is_sizes(shape):
        return f"shape {shape!r} is not a list of sizes"
    if not is_sizes(offsets) or len(offsets) != 2:
        return f"data_offsets {offsets!r} are not [begin, end]"
    begin, end = offsets
    need = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - begin != need:  # an end before the begin too
        return (f"data_offsets {offsets} span {end - begin} bytes; shape {shape} of {dtype} "
                f"takes {need}")
    if end > data_bytes:
        return f"data_offsets {offsets} end beyond the file's {data_bytes} bytes of data"
    return None


def is_sizes(value):
    """A list of non-negative integers."""
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)
