"""``Predictor``: a processor and a wrapped model → answers, masks and image tokens (cf. ``SamPredictor``).

``VLMWrapper`` keeps the Hugging Face surface (``forward`` / ``generate`` / save / load). Everything that turns
user inputs (PIL images, questions) into model calls and model outputs into results lives here: prompt text,
left-padded batches, greedy-by-default generation, masks from the model's mask head (``TextMaskHead``:
parse the answer; ``TokenMaskHead``: decode the states that predicted the mask token), and image codes from
an ``ImageTokenStage`` (SEED). Token statistics (visual tokens per sample that reached the language model,
prefill length) come from ``VLMWrapper.register_assemble_hook``, i.e. from the batch the model really saw.

    predictor = vlmkit.Predictor(wrapped, processor)
    answers = predictor.answer(images, ["how many shapes are there?"] * len(images))
    masks = predictor.segment(images, ["segment the red circle"] * len(images))
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

import torch

PROMPT_STYLES = ("auto", "chat", "plain", "raw")


@dataclasses.dataclass
class Prediction:
    """One sample's result: the decoded ``text`` (special tokens skipped), ``visual_tokens`` of the sample
    that reached the language model, ``prefill_tokens`` (its real prompt length there), ``generated_tokens``
    (``answer``: up to and with the first end-of-sequence; ``segment``: the answer tokens before it, those
    the mask pass reads) and, from ``segment``, the head's ``masks`` (``TokenMaskHead``: bool [n, H, W], one
    per mask token; ``TextMaskHead``: its parse result, e.g. ``Text4SegResult``)."""

    text: str
    visual_tokens: int
    prefill_tokens: int
    generated_tokens: int
    masks: Any = None


def build_prompt(processor: Any, text: str, style: str = "auto", n_images: int = 1) -> str:
    """The text the processor gets for one sample with ``n_images`` images.

    ``"chat"``: the processor's chat template (user turn = images + text, generation prompt added);
    ``"plain"``: ``"user : <image> {text} assistant :"`` with the processor's image marker (the tiny and
    shipped models' format); ``"auto"``: chat when the processor has a chat template, else plain;
    ``"raw"``: ``text`` as given (it already holds the image markers).
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {list(PROMPT_STYLES)}, got {style!r}")
    if style == "raw":
        return text
    has_template = bool(getattr(processor, "chat_template", None))
    if style == "chat" or (style == "auto" and has_template):
        if not has_template:
            raise ValueError("prompt style 'chat' needs a processor with a chat_template")
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    marker = getattr(processor, "image_token", None) or "<image>"
    return "user : " + " ".join([marker] * n_images) + " " + text + " assistant :"


def _image_lists(images: Sequence[Any] | None, n: int) -> list[list[Any]]:
    """One list of images per sample: an image, a list of images, or None / [] for a text-only sample."""
    if images is None:
        return [[] for _ in range(n)]
    images = list(images)
    if len(images) != n:
        raise ValueError(f"got {len(images)} image entries for {n} prompts; give one entry (an image, a list of "
                         "images or None) per prompt")
    return [[] if im is None else (list(im) if isinstance(im, (list, tuple)) else [im]) for im in images]


class Predictor:
    """Answers, masks and image tokens from a ``VLMWrapper`` and its model's ``processor``.

    ``wrapped``: a ``vlmkit.wrap(...)`` model, or a PEFT model around one (its adapters live inside the
    wrapper's modules, so the wrapper itself is driven). ``prompt_style`` (see ``build_prompt``) decides
    how questions become prompt text; ``"raw"`` passes them as they are. Generation is greedy unless
    ``generate_kwargs`` say otherwise.
    """

    def __init__(self, wrapped, processor, prompt_style: str = "auto") -> None:
        from .wrapper import VLMWrapper

        if not isinstance(wrapped, VLMWrapper) and callable(getattr(wrapped, "get_base_model", None)):
            wrapped = wrapped.get_base_model()  # peft.PeftModel(VLMWrapper)
        if not isinstance(wrapped, VLMWrapper):
            raise TypeError(f"Predictor takes a vlmkit.wrap(...) model, got {type(wrapped).__name__}")
        if processor is None:
            raise ValueError("Predictor needs the model's processor (or tokenizer for text-only prompts): "
                             "vlmkit.Predictor(wrapped, processor)")
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {list(PROMPT_STYLES)}, got {prompt_style!r}")
        self.wrapped = wrapped
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.prompt_style = prompt_style

    @property
    def device(self) -> torch.device:
        return next(self.wrapped.parameters()).device

    # --- inputs -------------------------------------------------------------------------------
    def prompt(self, text: str, n_images: int = 1) -> str:
        return build_prompt(self.processor, text, self.prompt_style, n_images)

    def inputs(self, images: Sequence[Any] | None, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Processor outputs for one left-padded batch (``texts`` already formatted), on the model's device."""
        nested = _image_lists(images, len(texts))
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # decoder-only batch generation
        try:
            if any(nested):
                out = self.processor(images=nested, text=list(texts), return_tensors="pt", padding=True)
            else:
                out = self.processor(text=list(texts), return_tensors="pt", padding=True)
        finally:
            self.tokenizer.padding_side = side
        return dict(out.to(self.device))

    def _generate_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        out = {"max_new_tokens": 32, "do_sample": False, **kwargs}
        if self.tokenizer.pad_token_id is not None:
            out.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return out

    @contextlib.contextmanager
    def _recording(self) -> Iterator[list]:
        """Every ``AssembledBatch`` the wrapper builds inside the ``with`` (token statistics)."""
        batches: list = []
        handle = self.wrapped.register_assemble_hook(lambda _, batch: batches.append(batch))
        try:
            yield batches
        finally:
            handle.remove()

    def _eos_ids(self) -> set[int]:
        config = getattr(self.wrapped.base_model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        ids = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _before_eos(self, new: torch.Tensor) -> torch.Tensor:
        """[B, T] generated ids → [B, T] long mask of the tokens before each row's first end-of-sequence."""
        is_eos = torch.zeros_like(new, dtype=torch.bool)
        for e in self._eos_ids():
            is_eos |= new == e
        return (is_eos.long().cumsum(dim=1) == 0).long()

    def _generate(self, images, prompts: Sequence[str], generate_kwargs: dict[str, Any]):
        """(inputs, new tokens [B, T], prompt batch or None) of one greedy-by-default ``generate``."""
        nested = _image_lists(images, len(prompts))
        texts = [self.prompt(p, len(n)) for p, n in zip(prompts, nested)]
        inputs = self.inputs(nested, texts)
        with self._recording() as batches, torch.no_grad():
            out = self.wrapped.generate(**inputs, **self._generate_kwargs(generate_kwargs))
        seqs = out if isinstance(out, torch.Tensor) else out.sequences
        if seqs.shape[0] != len(prompts):
            raise ValueError(f"expected one sequence per prompt, generate returned {seqs.shape[0]} for {len(prompts)} "
                             "(num_return_sequences / beams returning several are not supported here)")
        return inputs, seqs[:, inputs["input_ids"].shape[1]:], (batches[0] if batches else None)

    @staticmethod
    def _prompt_stats(inputs, batch) -> tuple[list[int], list[int]]:
        """(visual tokens, prefill length) per sample of the prompt the language model saw."""
        if batch is None:  # text only, passed through: the processor's own counts
            return [0] * inputs["input_ids"].shape[0], inputs["attention_mask"].sum(dim=1).tolist()
        return batch.visual_tokens_per_sample, batch.attention_mask.sum(dim=1).tolist()

    # --- tasks --------------------------------------------------------------------------------
    @torch.no_grad()
    def visual_tokens(self, images: Sequence[Any], question: str = "describe the image") -> list:
        """The ``VisualTokens`` of every image as the language model receives them (after every compressor:
        kept grid positions, FoPru's ``scores``), one per image in order; what pruning maps draw.
        ``images[i]``: an image or a list of images of sample i (prompted with ``question``)."""
        nested = _image_lists(images, len(images))
        inputs = self.inputs(nested, [self.prompt(question, len(n)) for n in nested])
        batch = self.wrapped.assemble(inputs["input_ids"], inputs.get("pixel_values"), inputs["attention_mask"],
                                      **self.wrapped.image_inputs(inputs))
        return list(batch.tokens)

    def answer(self, images: Sequence[Any] | None, questions: Sequence[str], **generate_kwargs) -> list[Prediction]:
        """Generate one answer per question (``images[i]``: an image, a list of images or None)."""
        questions = [questions] if isinstance(questions, str) else list(questions)
        inputs, new, batch = self._generate(images, questions, generate_kwargs)
        visual, prefill = self._prompt_stats(inputs, batch)
        texts = self.tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)
        eos = self._eos_ids()
        out = []
        for i, text in enumerate(texts):
            row = new[i].tolist()
            n_gen = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))  # up to and with the first eos
            out.append(Prediction(text, int(visual[i]), int(prefill[i]), int(n_gen)))
        return out

    def mask_head(self):
        """The wrapped model's one head with ``mask_output`` set; ValueError naming what to wrap with otherwise."""
        heads = [h for h in self.wrapped.stages_of("head") if h.mask_output is not None]
        if len(heads) != 1:
            raise ValueError(f"segment needs exactly one mask-producing head, the model has {len(heads)} "
                             f"({[h.config.type for h in heads]}); wrap it with e.g. vlmkit.Text4SegConfig() or "
                             "vlmkit.READConfig(...)")
        return heads[0]

    def segment(self, images: Sequence[Any], prompts: Sequence[str], **generate_kwargs) -> list[Prediction]:
        """Generate an answer per (image, prompt) and the masks the model's mask head makes of it.

        ``TextMaskHead`` (Text4Seg): the answer is parsed (``Prediction.masks`` is the head's result).
        ``TokenMaskHead`` (READ): prompt + answer (up to the first end-of-sequence) run through the language
        model once more and the states that predicted each mask token become masks: bool [n, H, W] at the
        image's size (n = 0 without a mask token). One image per sample.
        """
        head = self.mask_head()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        nested = _image_lists(images, len(prompts))
        if any(len(n) != 1 for n in nested):
            raise ValueError("segment takes exactly one image per prompt")
        images = [n[0] for n in nested]
        if not images:
            return []
        inputs, new, batch = self._generate(nested, prompts, generate_kwargs)
        visual, prefill = self._prompt_stats(inputs, batch)
        keep = self._before_eos(new)
        texts = [self.tokenizer.decode(new[b][keep[b].bool()].tolist(), skip_special_tokens=True)
                 for b in range(len(images))]
        if head.mask_output == "text":
            masks = head.masks_from_text(texts, images=images)
        else:
            masks = self._token_masks(head, inputs, new, keep, images)
        return [Prediction(t, int(v), int(p), int(k.sum()), m)
                for t, v, p, k, m in zip(texts, visual, prefill, keep, masks)]

    @torch.no_grad()
    def _token_masks(self, head, inputs, new: torch.Tensor, keep: torch.Tensor, images: list) -> list[torch.Tensor]:
        """Masks from the states that predicted each mask token of the answers (one pass over prompt + answer)."""
        wrapped = self.wrapped
        full_ids = torch.cat([inputs["input_ids"], new], dim=1)
        full_mask = torch.cat([inputs["attention_mask"], keep.to(inputs["attention_mask"].dtype)], dim=1)
        batch = wrapped.assemble(full_ids, inputs.get("pixel_values"), full_mask, padding_side="right",
                                 **wrapped.image_inputs(inputs))
        hidden = wrapped.run_language_model(batch, output_hidden_states=True).hidden_states[-1]
        positions = []
        for b in range(len(images)):
            n_kept, n_gen = int(batch.attention_mask[b].sum()), int(keep[b].sum())
            q = torch.arange(n_kept - n_gen, n_kept, device=batch.input_ids.device)
            q = q[batch.input_ids[b, q] == head.mask_token_id]
            positions.append((q - 1).tolist())  # the state that predicts the mask token
        return [lg.gt(0).cpu() for lg in head.masks_from_states(batch, hidden, positions, images)]

    @torch.no_grad()
    def generate_image_tokens(self, prompt: str | Sequence[str] | torch.Tensor,
                              attention_mask: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """Image codes [B, n] the model writes after ``prompt`` (text, texts, or left-padded ids [B, S]).

        Needs an ``ImageTokenStage`` (SEED): its start-of-image token ends each prompt and exactly its
        ``num_image_tokens`` tokens are decoded under its logits processor; decode codes with the stage.
        ``generate_kwargs`` go to ``generate`` (``pixel_values`` for multimodal prompts, ``do_sample``, …).
        """
        from transformers import LogitsProcessorList

        stages = [s for s in self.wrapped.stages if s.role == "vocabulary" and s.makes_image_tokens]
        if len(stages) != 1:
            raise ValueError(f"generate_image_tokens needs one image-token stage, the model has {len(stages)}; wrap "
                             "it with vlmkit.SEEDConfig(...) and tokenizer=tok")
        stage = stages[0]
        if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str)):
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
            input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        else:
            input_ids = torch.as_tensor(prompt)
            if input_ids.dim() == 1:
                input_ids = input_ids[None]
            if input_ids.dim() != 2:
                raise ValueError(f"prompt ids must be [B, S], got shape {tuple(input_ids.shape)}")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = stage.image_prompt(input_ids.to(self.device), attention_mask.to(self.device))
        n = stage.num_image_tokens
        processors = LogitsProcessorList([stage.image_logits_processor()])
        processors.extend(generate_kwargs.pop("logits_processor", None) or [])
        for name in ("max_new_tokens", "min_new_tokens"):
            value = generate_kwargs.pop(name, n)
            if value != n:
                raise ValueError(f"generate_image_tokens decodes exactly {n} image tokens, got {name}={value}")
        generate_kwargs.setdefault("do_sample", False)
        out = self.wrapped.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=processors,
                                    max_new_tokens=n, min_new_tokens=n, **generate_kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        return stage.codes_from_tokens(sequences[:, -n:])
