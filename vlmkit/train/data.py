"""Supervised fine-tuning data: LLaVA conversation JSON and ShareGPT ``messages``, assistant-only labels.

Accepted records (a JSON list, or JSON Lines):

- LLaVA: ``{"id", "image": "x.png" | [...], "conversations": [{"from": "human"|"gpt"|"system", "value"}]}``
- ShareGPT / messages: ``{"messages": [{"role": "user"|"assistant"|"system", "content"}], "images": [...]}``
- either may add ``"masks": ["m0.png", ...]`` for a segmentation head (READ / LISA, PMP): one binary PNG
  (non-zero = object) per ``[SEG]`` of the answers, in order, at the first image's size. The batch then
  carries ``masks`` (one [n, H, W] tensor per record) and ``sam_images`` (the record's first image).

Each ``<image>`` marker in the text is one image; their number must equal the number of images
(LLaMA-Factory's rule). The marker is replaced by the processor's image token and the processor expands
it (LLaVA: ``<image>`` × tokens per image; InternVL: ``<img><IMG_CONTEXT>…</img>``). Labels are -100
everywhere except the assistant answers (and the end-of-turn token after each), so visual tokens, the
prompt and padding never count in the loss (LLaVA ``preprocess_v1``, LLaMA-Factory ``train_on_prompt: false``).

Image and mask names are confined (``vlmkit.data.images``): relative to ``--image-folder`` when given, else to the
data file's folder (``x.png`` or ``images/x.png`` next to it), and they must resolve inside that folder, symbolic
links followed; absolute names and escapes need ``allow_absolute_paths=True`` (``--allow-absolute-paths``).
Files are opened by ``vlmkit.data.images.open_image``: an image above its pixel budget is downscaled when opened
(with a warning naming the file), and a record's masks are downscaled to the same size as its image.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

IMAGE_MARKER = "<image>"
IGNORE_INDEX = -100
ROLE_ALIASES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
    "model": "assistant", "system": "system",
}
TEMPLATES = ("auto", "plain", "chat")


@dataclasses.dataclass
class Conversation:
    """One training record: ``messages`` (role, content) with ``<image>`` markers and resolved image paths."""

    id: str
    messages: list[dict[str, str]]
    images: list[str]
    masks: list[str] = dataclasses.field(default_factory=list)


def _record_name(record: Any, index: int, source: str) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{source} record {index}" + (f" (id {rid!r})" if rid is not None else "")


def _read_records(path: Path) -> list[Any]:
    """The records of a JSON list / object or a JSON Lines file; errors name the file (and the line)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole:
        lines = text.split("\n")  # JSON Lines: one record per \n-terminated line (not str.splitlines)
        data = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as e:
                if not data:  # not even the first record parses on its own: one JSON document, broken
                    raise ValueError(f"{path}: not valid JSON: {whole.msg} at line {whole.lineno}, column "
                                     f"{whole.colno}") from None
                raise ValueError(f"{path}: JSON Lines: line {n} is not valid JSON: {e.msg} at column {e.colno}"
                                 ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data


def _resolve_image(name: str, where: str, json_dir: Path, image_folder: Path | None,
                   allow_absolute: bool = False) -> str:
    from vlmkit.data.images import resolve_image_path

    root = image_folder if image_folder is not None else json_dir
    p = resolve_image_path(name, root, allow_absolute=allow_absolute, where=where)  # refuses escapes
    if Path(name).is_absolute():
        candidates = [p]
    elif image_folder is not None:
        candidates = [p]
    else:
        candidates = [p, resolve_image_path(Path("images") / name, root, allow_absolute=allow_absolute, where=where)]
    for c in candidates:
        if c.is_file():
            return str(c)
    raise FileNotFoundError(f"{where}: image {name!r} not found (tried {[str(c) for c in candidates]}); "
                            "pass --image-folder")


def normalize_record(
    record: Any, index: int, source: str = "<data>", json_dir: Path | None = None, image_folder: Path | None = None,
    check_files: bool = True, allow_absolute_paths: bool = False,
) -> Conversation:
    """Validate one LLaVA or ShareGPT record and return it as a ``Conversation``. With ``check_files`` its image
    and mask names are resolved (confined: see the module docstring) and must exist."""
    where = _record_name(record, index, source)
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    if ("conversations" in record) == ("messages" in record):
        raise ValueError(f"{where}: needs exactly one of 'conversations' (LLaVA) or 'messages' (ShareGPT); keys: {sorted(record)}")
    if "image" in record and "images" in record:
        raise ValueError(f"{where}: has both 'image' and 'images'")
    turns = record.get("conversations", record.get("messages"))
    role_key, text_key = ("from", "value") if "conversations" in record else ("role", "content")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: the conversation must be a non-empty list")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise ValueError(f"{where}: turn {k} must have {role_key!r} and {text_key!r}, got {turn!r}")
        role = ROLE_ALIASES.get(str(turn[role_key]).lower())
        if role is None:
            raise ValueError(f"{where}: turn {k} has {role_key}={turn[role_key]!r}; accepted: {sorted(ROLE_ALIASES)}")
        if not isinstance(turn[text_key], str):
            raise ValueError(f"{where}: turn {k} {text_key} must be a string, got {type(turn[text_key]).__name__}")
        if role == "assistant" and IMAGE_MARKER in turn[text_key]:
            raise ValueError(f"{where}: turn {k}: {IMAGE_MARKER} markers are only accepted in user/system turns")
        messages.append({"role": role, "content": turn[text_key]})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant turn, so nothing to train on")
    images = record.get("images", record.get("image", []))
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ValueError(f"{where}: images must be a path or a list of paths, got {images!r}")
    markers = sum(m["content"].count(IMAGE_MARKER) for m in messages)
    if markers != len(images):
        raise ValueError(f"{where}: {markers} {IMAGE_MARKER} marker(s) in the text but {len(images)} image(s); "
                         "they must be equal")
    masks = record.get("masks", [])
    masks = [masks] if isinstance(masks, str) else masks
    if not isinstance(masks, list) or not all(isinstance(m, str) for m in masks):
        raise ValueError(f"{where}: masks must be a path or a list of paths, got {masks!r}")
    if masks and not images:
        raise ValueError(f"{where}: masks need an image to segment")
    if check_files:
        json_dir = json_dir or Path(".")
        images = [_resolve_image(i, where, json_dir, image_folder, allow_absolute_paths) for i in images]
        masks = [_resolve_image(m, where, json_dir, image_folder, allow_absolute_paths) for m in masks]
    rid = str(record.get("id", index))
    return Conversation(rid, messages, images, masks)


def load_conversations(path: str | os.PathLike, image_folder: str | os.PathLike | None = None, *,
                       allow_absolute_paths: bool = False) -> list[Conversation]:
    """Read and validate every record of a LLaVA / ShareGPT JSON (or JSONL) file (image names confined to
    ``image_folder`` or the file's folder unless ``allow_absolute_paths``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file {os.fspath(path)!r}")
    records = _read_records(path)
    if not records:
        raise ValueError(f"{path}: no records")
    folder = Path(image_folder) if image_folder is not None else None
    return [normalize_record(r, i, str(path), path.parent, folder, allow_absolute_paths=allow_absolute_paths)
            for i, r in enumerate(records)]


# ------------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------------


def _image_token(processor) -> str:
    token = getattr(processor, "image_token", None)
    if not token:
        raise ValueError(f"{type(processor).__name__} has no image_token; cannot place images in the text")
    return token


def _segments_plain(messages: list[dict[str, str]], eos: str | None) -> list[tuple[str, bool]]:
    """``role : content`` turns; the assistant's answer (+ eos) is the trained part. Matches
    ``vlmkit.testing.image_prompt`` (``user : … assistant :``)."""
    out: list[tuple[str, bool]] = []
    for k, m in enumerate(messages):
        sep = " " if k else ""
        if m["role"] == "assistant":
            out.append((f"{sep}assistant : ", False))
            out.append((m["content"] + (f" {eos}" if eos else ""), True))
        else:
            out.append((f"{sep}{m['role']} : {m['content']} ", False))
    return out


def _segments_chat(messages: list[dict[str, str]], tokenizer) -> list[tuple[str, bool]]:
    """Split the chat-template rendering into prompt / answer parts by rendering growing prefixes."""
    out: list[tuple[str, bool]] = []
    done = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the chat template does not render conversations prefix by prefix; use --template plain")
        out.append((prompt[len(done):], False))
        out.append((full[len(prompt):], True))
        done = full
    return out


def encode_conversation(
    conv: Conversation, processor, template: str = "auto", max_length: int | None = None, load_image=None
) -> dict[str, Any]:
    """Tokenize one conversation: ``input_ids`` [S], ``labels`` [S] (-100 off the answers),
    ``pixel_values`` [n_img(·tiles), C, H, W] or None, plus any other image tensors the processor returns.

    Text segments are tokenized one by one (the LLaMA-Factory way) so the answer spans are exact; a
    segment that holds images goes through the processor, which expands the image token.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; accepted: {list(TEMPLATES)}")
    if template == "auto":
        template = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    image_token = _image_token(processor)
    messages = [{"role": m["role"], "content": m["content"].replace(IMAGE_MARKER, image_token)} for m in conv.messages]
    if template == "chat":
        segments = _segments_chat(messages, tokenizer)
        prefix_ids: list[int] = []  # the template writes its own BOS
    else:
        segments = _segments_plain(messages, tokenizer.eos_token)
        prefix_ids = list(tokenizer("", add_special_tokens=True)["input_ids"])  # BOS for tokenizers that add one
    load_image = load_image or _load_rgb
    images = list(conv.images)
    ids: list[int] = list(prefix_ids)
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    image_tensors: dict[str, list[torch.Tensor]] = {}
    for text, trained in segments:
        if not text:
            continue
        n = text.count(image_token)
        if n:
            seg_images = [load_image(p) for p in images[:n]]
            images = images[n:]
            enc = processor(text=text, images=seg_images, add_special_tokens=False, return_tensors="pt")
            seg_ids = enc["input_ids"][0].tolist()
            for key, value in enc.items():
                if key not in ("input_ids", "attention_mask") and isinstance(value, torch.Tensor):
                    image_tensors.setdefault(key, []).append(value)
        else:
            seg_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += seg_ids
        labels += seg_ids if trained else [IGNORE_INDEX] * len(seg_ids)
    if images:
        raise ValueError(f"record {conv.id!r}: {len(images)} image(s) left over after placing the markers")
    if max_length is not None and len(ids) > max_length:
        image_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_id in ids[max_length:]:
            raise ValueError(f"record {conv.id!r}: {len(ids)} tokens; truncating to max_length={max_length} would cut image tokens")
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(f"record {conv.id!r}: no answer token left to train on (max_length={max_length})")
    out: dict[str, Any] = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    for key, values in image_tensors.items():
        out[key] = torch.cat(values, dim=0)
    out.setdefault("pixel_values", None)
    if conv.masks:
        out["sam_images"] = load_image(conv.images[0])
        out["masks"] = torch.stack([_load_mask(m, out["sam_images"].size, conv.id) for m in conv.masks])
    return out


def _load_mask(path: str, size: tuple[int, int], rid: str) -> torch.Tensor:
    """A PNG mask as a bool [H, W] tensor; ValueError unless it has the image's (W, H) ``size`` (both downscaled
    alike when above the pixel budget: nearest-neighbour for the mask)."""
    import numpy as np

    from PIL import Image

    from vlmkit.data.images import open_image

    im = open_image(path, where=f"record {rid!r}: mask: ", mode=None, resample=Image.NEAREST)
    if im.size != size:
        raise ValueError(f"record {rid!r}: mask {path!r} is {im.size[0]}×{im.size[1]}, the image {size[0]}×{size[1]}")
    return torch.from_numpy(np.asarray(im.convert("L")) > 0)


def _load_rgb(path: str):
    from vlmkit.data.images import open_image

    return open_image(path)


class SupervisedDataset:
    """Conversations encoded on access: ``dataset[i]`` → ``encode_conversation(...)`` of record i."""

    def __init__(self, conversations: Sequence[Conversation], processor, template: str = "auto",
                 max_length: int | None = None) -> None:
        self.conversations = list(conversations)
        self.processor = processor
        self.template = template
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return encode_conversation(self.conversations[i], self.processor, self.template, self.max_length)


PER_RECORD_KEYS = ("masks", "sam_images")  # segmentation-head inputs: one entry per record (None if it has none)


def collate(features: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a list of encoded records: ``input_ids`` / ``labels`` / ``attention_mask`` [B, S_max];
    image tensors of all records concatenated along dim 0 in record order (absent when none has images);
    ``masks`` / ``sam_images`` as lists with one entry per record when any record has them."""
    if not features:
        raise ValueError("collate needs at least one record")
    length = max(len(f["input_ids"]) for f in features)
    B = len(features)
    input_ids = torch.full((B, length), pad_token_id, dtype=torch.long)
    labels = torch.full((B, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, length), dtype=torch.long)
    for b, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[b, :n] = f["input_ids"]
        labels[b, :n] = f["labels"]
        attention_mask[b, :n] = 1
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    for key in PER_RECORD_KEYS:
        if any(f.get(key) is not None for f in features):
            batch[key] = [f.get(key) for f in features]
    keys = sorted({k for f in features for k, v in f.items() if isinstance(v, torch.Tensor)} - set(batch))
    for key in keys:
        parts = [f[key] for f in features if isinstance(f.get(key), torch.Tensor)]
        batch[key] = torch.cat(parts, dim=0)
    return batch


def pad_token_id(processor) -> int:
    """The tokenizer's pad id (falls back to eos, then 0)."""
    tok = getattr(processor, "tokenizer", processor)
    for value in (tok.pad_token_id, tok.eos_token_id):
        if value is not None:
            return int(value)
    return 0
