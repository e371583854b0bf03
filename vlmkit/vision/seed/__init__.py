"""SEED: a discrete image tokenizer for LLM vocabularies (Ge et al., arXiv 2307.08041 / 2310.01218).

An image becomes ``num_queries`` (32) discrete codes in ``[0, codebook)`` (8192) that a language model
reads and writes as ordinary vocabulary tokens ``<img_00000>`` … ``<img_08191>`` between ``<img>`` and
``</img>`` (reference: ``AILab-CVC/SEED`` @ 93b3cf4). Pieces, each named as in the reference code so a SEED-2
``seed_quantizer.pt`` maps onto them by a prefix rename only (:func:`load_seed_checkpoint`):

- **Vision features**: any *frozen* callable ``pixel_values [B, 3, H, W] -> [B, N, C]`` (a tensor, or an
  output object with ``last_hidden_state``); it runs under ``torch.no_grad`` and is never saved with the
  tokenizer (pass it again when loading). The reference uses EVA-CLIP ViT-g/14 (C=1408). Inside a
  wrapped model (:class:`SEEDConfig` as a ``vlmkit.wrap`` stage) the features are the wrapped model's own
  frozen image features through the family (``Family.image_features``: vision tower + projector, the
  tokens the LM sees, C = LM width); each row of ``pixel_values`` is one image (tiled families: give one
  tile, e.g. the thumbnail, per image). ``ln_vision`` (LayerNorm over C) follows, as in the reference.
- **Causal Q-Former** (``qformer``): BLIP-2's BERT Q-Former without the text path: ``num_queries``
  learned queries, post-LN BERT layers (eps 1e-12, exact GELU), self-attention among the queries with a
  **causal** (lower-triangular) mask, full cross-attention to the image features every
  ``cross_attention_freq`` layers (layer i has it when ``i % freq == 0``), the query FFN
  (``intermediate_query``/``output_query``). [choice] The reference applies the causal mask only when it
  is given exactly 32 queries (its released setting) and attends bidirectionally with any other count;
  vlmkit's :class:`CausalQFormer` is causal for every ``num_queries`` (``causal=False`` gives the
  bidirectional Q-Former), so it matches the reference at 32 queries and differs from it at other counts.
- **Quantiser**: ``encode_task_layer`` Linear(W,W)→Tanh→Linear(W,code_dim); ``quantize`` =
  ``VectorQuantizer2`` (squared-L2 nearest code, no L2 normalisation, straight-through estimator,
  codebook init uniform(±1/codebook), legacy β placement); ``decode_task_layer``
  Linear(code_dim,code_dim)→Tanh→Linear(code_dim,W).
- **Reverse head** (``decode``): codes → ``decode_task_layer`` → + ``pos_embed_image`` → ``blocks_image``
  (``decoder_depth`` pre-LN ViT blocks, eps 1e-6, qkv bias, mlp 4) → ``image_head="mlp"`` (the released
  inference class: ``image_down`` W→256→128→32 ReLU, no bias, flatten Q·32 → ``distill_image_proj``) or
  ``"qformer"`` (the training code: a 1-query Reverse Q-Former → ``distill_image_proj``) → one
  ``image_embed_dim`` image embedding (SEED-2: the 1024-d unCLIP CLIP-ViT-H image embedding).
  ``blocks`` + ``pos_embed`` reconstruct the 32 causal Q-Former embeddings (the L_recon branch).

Training (:func:`train_seed_tokenizer`), two phases as the reference (``blip2_qformer_casual.py``, then
``blip2_qformer_codebook_all_image.py``, in ``SEED_Tokenizer/lavis/models/blip2_models/``):

1. ``"qformer"``: image–text contrastive on the **last** causal query only: ``vision_proj`` (→256) and
   ``text_proj`` features L2-normalised, learnable temperature (init 0.07, clamped to [0.001, 0.5] as
   BLIP-2), symmetric cross-entropy with label smoothing 0.1 over the batch. Trains ``ln_vision``,
   ``query_tokens``, ``qformer`` and the two projections (the reference leaves ``ln_vision``
   trainable in this stage).
2. ``"codebook"``: Q-Former frozen; ``loss = 5·L_vq + 2·L_recon + 0.5·L_img`` with
   ``L_vq = mean((sg[zq]−z)²) + β·mean((zq−sg[z])²)`` (legacy: β on the codebook term),
   ``L_recon = 1 − cos(blocks(decoded + pos_embed), causal_emb)`` averaged over tokens, and
   ``L_img = MSE(decode(codes), target)``.

Design choices not fixed by the reference (written down here):

- **Text side of the contrastive loss.** The reference uses the Q-Former's own BERT text path (its
  ``[CLS]``). vlmkit uses a small *frozen* caption embedding: :class:`HashedTextEmbedder`, the mean of
  fixed random word vectors (each word's vector seeded by a CRC32 of the word, so no vocabulary, no
  download, identical across runs), followed by the trainable ``text_proj``. Any frozen callable
  ``list[str] -> [B, text_dim]`` can replace it (``SeedTokenizer(text_encoder=...)`` or
  ``set_text_encoder``), e.g. :class:`LMTextEmbedder`, the wrapped LM's own frozen input embeddings of
  the caption, mean-pooled (``stage.text_encoder(hf_tokenizer)``).
- **Image-embedding target (L_img).** The reference regresses the frozen CLIP-ViT-H-14 image embedding.
  vlmkit takes any frozen callable ``pixel_values -> [B, image_embed_dim]`` (``target=`` /
  ``set_target``); the default is
  the **mean over tokens of the frozen vision features** (then ``image_embed_dim`` = C), which needs
  nothing extra. Set ``image_embed_dim=1024`` and pass a CLIP-ViT-H embedder to match SEED-2.
- **Small training loop.** AdamW (wd 0.05), cosine decay to 0.1·lr (the reference's 1e-4 → 1e-5 ratio)
  with optional linear warm-up; no all-gather (one process). Losses are reported unweighted and
  weighted (``loss``).
- **Tokens in the LM.** Codes are added first, in order (``<img_00000>`` …), then BOI, EOI, so
  ``id = first_image_id + code`` and the markers follow the codes (the reference's code order; its marker
  ids are unconfirmed). The markers are the reference ``<img>``/``</img>`` unless they already exist
  (InternVL uses them for its own images): then ``<seed_img>``/``</seed_img>`` (``markers="auto"``).
  :func:`add_seed_tokens` checks the tokenizer's vocabulary; the ``SEED`` stage decides from the wrapped
  family (``wrap`` hands stages no tokenizer before ``new_tokens``, and a vocabulary check would flip on a
  reload with a tokenizer that already holds SEED's ``<img>``); any other collision makes ``wrap`` raise
  (then set ``markers="namespaced"``). The reference strings stay in the config (``boi``/``eoi``) and
  :meth:`SEED.to_reference_text` / :meth:`SEED.from_reference_text` translate between the spellings.
- **Fine-tuning the LM** (peft 0.21, tested on the tiny models): LoRA plus
  ``LoraConfig(trainable_token_indices={"embed_tokens": ids, "lm_head": ids})`` with
  ``ids = list(wrapper.added_tokens.values())`` trains only the new rows (list ``lm_head`` too when it is
  not tied, or the model cannot learn to *write* image tokens); ``modules_to_save=["embed_tokens",
  "lm_head"]`` (the reference's choice) trains the full matrices. Both work through ``VLMWrapper``.
- **Generation.** :class:`SeedImageLogitsProcessor` constrains decoding: ``num_queries`` steps after the
  last BOI allow only image tokens, the next step allows only EOI.
  ``vlmkit.Predictor(wrapped, processor).generate_image_tokens(prompt)`` appends BOI to the prompt
  (``SEED.image_prompt``) and decodes exactly ``num_queries`` tokens with it (``SEED.codes_from_tokens``).
- **Role.** SEED is a ``"vocabulary"`` stage (``vlmkit.stage.ImageTokenStage``): it changes nothing in the image-placeholder pipeline; an image
  enters the LM as its discrete tokens in ``input_ids`` (``SEED.image_token_ids``), which the wrapped
  model embeds with its own (resized) embedding table. The stage's features skip the other stages
  (compressors, vision contexts): SEED tokenizes the uncompressed image.
- **Not implemented**: the SEED-1 de-tokenizer (Reverse Q-Former → 77×768 SD text embeddings) and pixel
  decoding through diffusers' unCLIP pipeline (``decode`` stops at the image embedding).

Layout: ``config`` (:class:`SEEDConfig`, token strings, markers), ``tokenizer`` (the modules and
:class:`SeedTokenizer`), ``checkpoint`` (reference checkpoint loading), ``train`` (the training loop),
``stage`` (tokens in the LM vocabulary, constrained decoding, the ``SEED`` stage).
"""

from .checkpoint import (
    FOREIGN_IGNORED_PREFIXES, FOREIGN_KEY_PREFIXES, TRAINING_ONLY_PREFIXES, CheckpointReport, load_seed_checkpoint,
    map_foreign_key,
)
from .config import IMAGE_HEADS, MARKER_MODES, PHASES, SEEDConfig, image_token_strings, resolve_markers
from .stage import SEED, SeedImageLogitsProcessor, SeedTokenIds, add_seed_tokens
from .tokenizer import (
    CONFIG_FILE, WEIGHTS_FILE, CausalQFormer, HashedTextEmbedder, LMTextEmbedder, SeedTokenizer, VectorQuantizer,
    ViTBlock,
)
from .train import shapes_caption, shapes_pixel_values, train_seed_tokenizer

__all__ = [
    "SEEDConfig", "SEED", "SeedTokenizer", "CausalQFormer", "VectorQuantizer", "ViTBlock",
    "HashedTextEmbedder", "LMTextEmbedder", "SeedImageLogitsProcessor", "SeedTokenIds", "CheckpointReport",
    "train_seed_tokenizer", "load_seed_checkpoint", "map_foreign_key", "add_seed_tokens", "resolve_markers",
    "image_token_strings",
    "shapes_caption", "shapes_pixel_values", "MARKER_MODES", "IMAGE_HEADS", "PHASES",
    "CONFIG_FILE", "WEIGHTS_FILE", "FOREIGN_KEY_PREFIXES", "FOREIGN_IGNORED_PREFIXES", "TRAINING_ONLY_PREFIXES",
]
