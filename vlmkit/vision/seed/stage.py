"""SEED in the language model: token ids, :func:`add_seed_tokens`, constrained decoding and the ``SEED`` stage.

"The module docstring" in the docstrings below is the package docstring (``vlmkit.vision.seed``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
from torch import nn

from vlmkit.config import register_stage
from vlmkit.stage import ImageTokenStage

from .config import SEEDConfig, image_token_strings, resolve_markers
from .tokenizer import LMTextEmbedder, SeedTokenizer, _set_plain


@dataclasses.dataclass(frozen=True)
class SeedTokenIds:
    """Ids of the SEED tokens in one tokenizer: code c is ``first_image_id + c``; the marker strings used."""

    first_image_id: int
    codebook: int
    boi_id: int
    eoi_id: int
    boi: str
    eoi: str

    def span(self, codes: torch.Tensor) -> torch.Tensor:
        """``[BOI, first+codes…, EOI]`` ids [B, Q+2] for codes [B, Q]."""
        B = codes.shape[0]
        boi = torch.full((B, 1), self.boi_id, dtype=torch.long, device=codes.device)
        eoi = torch.full((B, 1), self.eoi_id, dtype=torch.long, device=codes.device)
        return torch.cat([boi, codes.long() + self.first_image_id, eoi], dim=1)


def _check_bound(config: SEEDConfig, ids: dict[str, int], boi: str, eoi: str) -> SeedTokenIds:
    strings = image_token_strings(config)
    missing = [s for s in (*strings[:1], *strings[-1:], boi, eoi) if s not in ids]
    if missing:
        raise ValueError(f"SEED token ids are missing for {missing}")
    first = ids[strings[0]]
    bad = [s for i, s in enumerate(strings) if ids.get(s) != first + i]
    if bad:
        raise ValueError(f"SEED image tokens must have consecutive ids (id = first_image_id + code); "
                         f"{len(bad)} do not, e.g. {bad[0]!r} has {ids.get(bad[0])}, "
                         f"expected {first + strings.index(bad[0])}")
    if config.first_image_id is not None and first != config.first_image_id:
        raise ValueError(f"SEEDConfig.first_image_id={config.first_image_id} but the image tokens start at id {first}")
    return SeedTokenIds(first, config.codebook, ids[boi], ids[eoi], boi, eoi)


def add_seed_tokens(tokenizer, config: SEEDConfig, model: nn.Module | None = None,
                    family_markers: Iterable[str] = ()) -> SeedTokenIds:
    """Add the SEED tokens to a HF ``tokenizer`` (codes in order, then BOI, EOI) outside ``vlmkit.wrap``.

    The markers come from :func:`resolve_markers`. With ``model``, its input/output embeddings are
    resized to ``len(tokenizer)``. ValueError when an image token already exists (the codes must get
    consecutive new ids).
    """
    from transformers import AddedToken

    boi, eoi = resolve_markers(config, tokenizer, family_markers)
    strings = [*image_token_strings(config), boi, eoi]
    vocab = tokenizer.get_vocab()
    taken = [s for s in strings if s in vocab]
    if taken:
        raise ValueError(f"SEED tokens already in the tokenizer: {taken[:5]}{' …' if len(taken) > 5 else ''}")
    tokenizer.add_tokens([AddedToken(s, normalized=False, special=False) for s in strings])
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in strings}
    if model is not None:
        model.resize_token_embeddings(len(tokenizer))
    return _check_bound(config, ids, boi, eoi)


class SeedImageLogitsProcessor:
    """Constrained decoding of SEED images (a transformers ``LogitsProcessor``).

    For each row, let n be the number of tokens after its last BOI: n < ``num_queries`` allows only the
    image tokens ``[first_image_id, first_image_id + codebook)``; n == ``num_queries`` allows only EOI
    (when ``force_eoi``); rows without BOI, or past the image, are unconstrained. ``after_boi=True``:
    a row without BOI counts as if BOI came just before its first id (``generate`` from
    ``inputs_embeds`` shows the processor the new tokens only, not the prompt that ends with BOI).
    """

    def __init__(self, ids: SeedTokenIds, num_queries: int, force_eoi: bool = True, after_boi: bool = False) -> None:
        self.ids, self.num_queries, self.force_eoi, self.after_boi = ids, num_queries, force_eoi, after_boi

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        is_boi = input_ids == self.ids.boi_id
        has = is_boi.any(dim=1)
        L = input_ids.shape[1]
        B = input_ids.shape[0]
        pos = torch.arange(1, L + 1, device=input_ids.device)
        last = (is_boi * pos).amax(dim=1) if L else torch.zeros(B, dtype=torch.long, device=input_ids.device)
        since = torch.where(has, L - last, torch.full_like(last, L))  # tokens after the last BOI (1-based last)
        if self.after_boi:
            has = torch.ones_like(has)
        in_image = has & (since < self.num_queries)
        at_end = has & (since == self.num_queries) & self.force_eoi
        if not bool(in_image.any() or at_end.any()):
            return scores
        V = scores.shape[-1]
        vocab = torch.arange(V, device=scores.device)
        first = self.ids.first_image_id
        image_ok = (vocab >= first) & (vocab < first + self.ids.codebook)
        eoi_ok = vocab == self.ids.eoi_id
        allowed = torch.ones_like(scores, dtype=torch.bool)
        allowed[in_image] = image_ok
        allowed[at_end] = eoi_ok
        return scores.masked_fill(~allowed, float("-inf"))


class _FamilyFeatures:
    """Frozen features of the wrapped model: ``Family.image_features`` stacked to [B, N, D] (no gradient)."""

    def __init__(self, family) -> None:
        self.family = family

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.family.check_pixel_values(pixel_values)
        feats = self.family.image_features(pixel_values)
        return torch.stack(list(feats))


@register_stage(SEEDConfig)
class SEED(ImageTokenStage):
    """SEED in the language model: the tokenizer over the wrapped model's frozen features, the image
    tokens in its vocabulary, reading images as tokens and generating them (see the module docstring).

    An ``ImageTokenStage``: ``vlmkit.Predictor(wrapped, processor).generate_image_tokens(prompt)`` asks the
    model for an image (``image_prompt`` appends BOI, ``image_logits_processor`` keeps the next
    ``num_image_tokens`` tokens image codes, ``codes_from_tokens`` maps them to codes).

    Built by ``vlmkit.wrap(model, SEEDConfig(...), tokenizer=tok)``; ``visual_tokenizer`` (the
    :class:`SeedTokenizer`, its weights are this stage's) exists after ``attach`` and ``token_ids`` after
    the tokens were added. The BOI/EOI strings are resolved from the config and the family alone
    (``markers="auto"``: namespaced for families known to use ``<img>``, i.e. InternVL), never from the
    tokenizer's current vocabulary, so a reload with a tokenizer that already holds the SEED tokens
    resolves the same strings; a tokenizer of another family that happens to hold ``<img>`` makes
    ``wrap`` fail loudly (set ``markers="namespaced"``).
    """

    def __init__(self, config: SEEDConfig) -> None:
        super().__init__(config)
        self._family = None
        self._markers: tuple[str, str] | None = None
        self.token_ids: SeedTokenIds | None = None

    # --- wrap-time hooks --------------------------------------------------------------------------
    def attach(self, family) -> None:
        D = family.text_width
        if self.config.vision_dim is not None and self.config.vision_dim != D:
            raise ValueError(f"SEEDConfig.vision_dim={self.config.vision_dim} but the {family.model_type} model's "
                             f"image features are {D}-wide (its LM width); leave vision_dim=None")
        embedding = family.model.get_input_embeddings()
        weight = embedding.weight
        self._family = family
        self.visual_tokenizer = SeedTokenizer(self.config, _FamilyFeatures(family), vision_dim=D, text_dim=D).to(
            weight.device, weight.dtype)
        _set_plain(self, "_embedding_for_text", embedding)  # for LMTextEmbedder; not a submodule

    def detach(self, family) -> None:
        self._family = None

    def _family_markers(self) -> tuple[str, ...]:
        return () if self._family is None else tuple(self._family.image_markers)

    @property
    def markers(self) -> tuple[str, str]:
        """(BOI, EOI) strings this stage uses in the LM vocabulary."""
        if self.token_ids is not None:
            return self.token_ids.boi, self.token_ids.eoi
        if self._markers is None:
            self._markers = resolve_markers(self.config, None, self._family_markers())
        return self._markers

    def new_tokens(self) -> list[str]:
        return [*image_token_strings(self.config), *self.markers]

    def bind_tokens(self, ids: dict[str, int]) -> None:
        boi, eoi = self.markers
        self.token_ids = _check_bound(self.config, ids, boi, eoi)

    def _ids(self) -> SeedTokenIds:
        if self.token_ids is None:
            raise ValueError("the SEED tokens are not in the vocabulary yet: wrap the model with "
                             "vlmkit.wrap(model, SEEDConfig(...), tokenizer=tok)")
        return self.token_ids

    # --- images ↔ tokens --------------------------------------------------------------------------
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Codes [B, num_queries] of ``pixel_values`` (one image per row) through the wrapped model's features."""
        return self.visual_tokenizer.encode(pixel_values)

    def decode(self, codes: Any) -> torch.Tensor:
        """Image embeddings [B, image_embed_dim] of codes [B, num_queries]."""
        return self.visual_tokenizer.decode(codes)

    def image_token_ids(self, pixel_values: torch.Tensor | None = None,
                        codes: torch.Tensor | None = None) -> torch.Tensor:
        """The id span ``<img> <img_xxxxx>×num_queries </img>`` [B, num_queries + 2] of images (or codes)."""
        if (pixel_values is None) == (codes is None):
            raise ValueError("give exactly one of pixel_values and codes")
        codes = self.encode(pixel_values) if codes is None else self.visual_tokenizer.check_codes(codes)
        return self._ids().span(codes)

    def image_text(self, pixel_values: torch.Tensor | None = None, codes: torch.Tensor | None = None) -> list[str]:
        """The span as text, one string per image, to put in a prompt (the tokenizer maps it to
        :meth:`image_token_ids` exactly since every piece is an added token)."""
        ids = self.image_token_ids(pixel_values, codes)
        boi, eoi = self.markers
        fmt = self.config.image_token_format
        first = self._ids().first_image_id
        return [boi + "".join(fmt.format(int(i) - first) for i in row[1:-1]) + eoi for row in ids]

    def to_reference_text(self, text: str) -> str:
        """Replace this stage's markers by the reference ``<img>``/``</img>`` (interop with SEED-LLaMA text)."""
        boi, eoi = self.markers
        if (boi, eoi) == (self.config.boi, self.config.eoi):
            return text
        return text.replace(boi, self.config.boi).replace(eoi, self.config.eoi)

    def from_reference_text(self, text: str) -> str:
        """Replace the reference ``<img>``/``</img>`` by this stage's markers (inverse of :meth:`to_reference_text`)."""
        boi, eoi = self.markers
        if (boi, eoi) == (self.config.boi, self.config.eoi):
            return text
        return text.replace(self.config.eoi, eoi).replace(self.config.boi, boi)

    def codes_from_ids(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Codes of every complete image span in a 1-D id sequence (BOI, num_queries image ids, EOI)."""
        t = self._ids()
        ids = torch.as_tensor(ids).flatten().tolist()
        out, Q = [], self.config.num_queries
        for i, tok in enumerate(ids):
            if tok == t.boi_id and i + Q + 1 < len(ids) and ids[i + Q + 1] == t.eoi_id:
                body = ids[i + 1 : i + 1 + Q]
                if all(t.first_image_id <= x < t.first_image_id + t.codebook for x in body):
                    out.append(torch.tensor(body) - t.first_image_id)
        return out

    def logits_processor(self, force_eoi: bool = True, after_boi: bool = False) -> SeedImageLogitsProcessor:
        """The constrained-decoding processor for this stage's tokens (see :class:`SeedImageLogitsProcessor`)."""
        return SeedImageLogitsProcessor(self._ids(), self.config.num_queries, force_eoi, after_boi)

    def text_encoder(self, tokenizer) -> LMTextEmbedder:
        """A frozen caption embedder from the wrapped LM's input embeddings and its HF ``tokenizer``
        (``stage.visual_tokenizer.set_text_encoder(stage.text_encoder(tok))``; needs ``text_dim`` None or
        the LM width)."""
        return LMTextEmbedder(tokenizer, self._embedding_for_text)

    # --- ImageTokenStage: generation through vlmkit.Predictor.generate_image_tokens ---------------------
    @property
    def num_image_tokens(self) -> int:
        """Tokens of one image: ``config.num_queries``."""
        return self.config.num_queries

    def image_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids / mask [B, S] → [B, S + 1] ending with BOI (unchanged [B, S] when every
        prompt already ends with it). ValueError for a mask of another shape, right padding (a row whose last
        token is padding) or a batch where only some prompts end with BOI."""
        t = self._ids()
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match the prompt "
                             f"{tuple(input_ids.shape)}")
        if not bool((attention_mask[:, -1] == 1).all()):
            raise ValueError("prompts must be left-padded (every row's last token real) to append BOI")
        ends = input_ids[:, -1] == t.boi_id
        if bool(ends.any()) and not bool(ends.all()):
            raise ValueError("either every prompt or none may end with BOI")
        if not bool(ends.all()):
            input_ids = torch.cat([input_ids, torch.full_like(input_ids[:, :1], t.boi_id)], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        return input_ids, attention_mask

    def image_logits_processor(self) -> SeedImageLogitsProcessor:
        """Only image codes for the next ``num_queries`` tokens, then EOI. ``after_boi``: every prompt ends with
        BOI, and ``generate`` from ``inputs_embeds`` may show the processor only the new tokens."""
        return self.logits_processor(force_eoi=True, after_boi=True)

    def codes_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Generated image tokens [B, num_queries] → codes [B, num_queries] (``id - first_image_id``).

        ValueError (the ``ImageTokenStage`` contract) naming the tokens when they are not ``num_queries`` image
        codes per row, e.g. generation without :meth:`image_logits_processor`.
        """
        t = self._ids()
        Q = self.config.num_queries
        tokens = torch.as_tensor(tokens)
        codes = tokens - t.first_image_id
        bad = tokens.dim() != 2 or tokens.shape[1] != Q
        if not bad and codes.numel():
            bad = int(codes.min()) < 0 or int(codes.max()) >= t.codebook
        if bad:
            raise ValueError(f"not image tokens: expected [B, {Q}] ids in [{t.first_image_id}, "
                             f"{t.first_image_id + t.codebook}) (the SEED codes), got {tokens.tolist()}")
        return codes
