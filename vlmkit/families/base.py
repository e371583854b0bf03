"""``Family``: what vlmkit needs to know about one HF model family, behind one small interface."""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ..tokens import VisualTokens


#: What a stage may need from a family (``StageConfig.requires``); a family lists what it has in ``capabilities``.
CAPABILITIES: dict[str, str] = {
    "patch_grid": "a fixed tile whose visual tokens pool a grid of vision-tower patches, with the attention q/k and "
                  "MLP of every vision layer exposed by the family",
    "rope_1d": "a decoder whose rotary embedding takes 1-D positions",
    "single_tile": "one pixel_values row per image",
    "tile_rows": "images made of whole tiles of one fixed grid: the tower runs on pixel_values [tiles, C, H, W] "
                 "with no other image input, and each image's run is its tiles' tokens in row order",
    "fixed_grid": "every image's visual tokens lie on tiles of one fixed grid, whatever the image size",
    # --- vision attention rows (pre-LLM pruners) ---
    "vision_cls": "a vision tower whose token sequence starts with a CLS token (its attention row scores the patches)",
    "token_projector": "a projector that maps each visual token's own pre-projector feature vector to its embedding "
                       "(its input: one row per visual token of a tile, in token order)",
    # --- resized vision input (the image-downsampling baseline) ---
    "vision_resize": "a vision tower that runs each tile at a smaller pixel size (its position embeddings "
                     "interpolated) and yields the correspondingly smaller token grid, one projected token per cell "
                     "(`Family.on_resized_vision`)",
    # --- declared directly or implied (IMPLIED_CAPABILITIES) ---
    "mrope": "a decoder with M-RoPE whose (t, h, w) positions the family lays out from the assembled batch "
             "(`Family.mrope_positions`), for the model's own scheme or a position stage's",
    "rope_positions": "a decoder whose rotary positions a position scheme can lay out: 1-D RoPE (`rope_1d`) or "
                      "M-RoPE laid out by the family (`mrope`)",
    "vision_attention": "a vision tower whose per-layer attention the family recomputes for each tile or image from "
                        "the layer's own q/k, with the visual token each key feeds (`Family.on_vision_attention`)",
}

#: A capability a family has when it declares it or any capability listed here for it ("any of"), so a stage can
#: require one name where several mechanisms serve it. ``Family.__init_subclass__`` applies the rule to every
#: family class (``capabilities`` gains the implied names; ``lacks`` gets a reason for those it still lacks).
IMPLIED_CAPABILITIES: dict[str, tuple[str, ...]] = {
    "rope_positions": ("rope_1d", "mrope"),
    "vision_attention": ("patch_grid",),
}


#: The reason a family lacks a capability when it gives none of its own (``with_implied`` fills it in).
DEFAULT_LACKS: dict[str, str] = {
    "vision_resize": "declares no way to run its vision tower on smaller tiles (`Family.on_resized_vision`); with "
                     "dynamic resolution, resize the image before the processor instead",
}


def with_implied(capabilities, lacks: dict[str, str]) -> tuple[frozenset, dict[str, str]]:
    """``capabilities`` plus the implied ones (``IMPLIED_CAPABILITIES``), and ``lacks`` with a reason for each
    implied capability still missing (the reasons of the capabilities that would imply it) and the
    ``DEFAULT_LACKS`` reason for each capability it lacks without giving one."""
    caps, lacks = frozenset(capabilities), dict(lacks)
    for name, sources in IMPLIED_CAPABILITIES.items():
        if name in caps or caps & set(sources):
            caps |= {name}
            lacks.pop(name, None)
        elif name not in lacks:
            lacks[name] = "; ".join(lacks.get(s, f"lacks {s!r}") for s in sources)
    for name, why in DEFAULT_LACKS.items():
        if name not in caps:
            lacks.setdefault(name, why)
    return caps, lacks


class AttentionGroup(NamedTuple):
    """One independent attention of a vision layer: a tile, or one image (frame) of a packed tower.

    q, k: [H, S, d] the layer's queries and keys (its own projections, norms and RoPE), so ``softmax(q kᵀ · scale)``
    [H, S, S] are its attention probabilities; the first ``prefix`` positions feed no visual token (CLS), position
    ``prefix + j`` feeds visual token ``token[j]`` (0 ≤ token < num_tokens, in the order of the image's run:
    tiles / frames one after the other, each row-major).
    """

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    prefix: int
    token: torch.Tensor
    num_tokens: int


class HookHandles:
    """Several hook handles removed together (what ``on_vision_attention`` returns)."""

    def __init__(self, handles) -> None:
        self.handles = list(handles)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _as_pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


class Family:
    """Adapter for one ``*ForConditionalGeneration`` class of the LLaVA / InternVL shape.

    Subclasses name the model classes they accept and how tiles map to images; everything else
    (placeholder id, embeddings, the model's own ``get_image_features``) is shared. Families are the only
    code that knows a model's attribute names (``tests/test_model_knowledge.py`` enforces it): stages ask
    the properties and methods below, overridden per family where the family differs.
    """

    model_type: ClassVar[str] = ""
    model_class_names: ClassVar[tuple[str, ...]] = ()
    image_kwarg_names: ClassVar[tuple[str, ...]] = ()  # extra processor outputs get_image_features takes
    #: token strings the family's prompts use around images (stages adding tokens must not reuse them)
    image_markers: ClassVar[tuple[str, ...]] = ()
    #: keys of ``CAPABILITIES`` this family has; ``lacks`` says why for each one it does not
    capabilities: ClassVar[frozenset[str]] = frozenset({"patch_grid", "rope_1d", "tile_rows", "fixed_grid"})
    lacks: ClassVar[dict[str, str]] = {"single_tile": "tiles its images (several pixel_values rows per image)",
                                       "mrope": "uses 1-D RoPE"}
    capabilities, lacks = with_implied(capabilities, lacks)  # subclasses: __init_subclass__
    #: recipe part alias (``projector`` / ``vision_tower`` / ``language_model``, the vocabulary of
    #: ``vlmkit.train.recipes``) -> module path under the HF ``*ForConditionalGeneration`` model
    #: (transformers 5 layout; LLaVA, LLaVA-NeXT, LLaVA-OneVision and InternVL share it). A class attribute,
    #: so that checkpoints can be quantized while loading, before there is a model.
    part_paths: ClassVar[dict[str, str]] = {
        "projector": "model.multi_modal_projector",
        "vision_tower": "model.vision_tower",
        "language_model": "model.language_model",
    }

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.capabilities, cls.lacks = with_implied(cls.capabilities, cls.lacks)

    def __init__(self, model: nn.Module) -> None:
        # A PEFT model (LoRA on the HF model) is called as it is; attributes are read from the model inside.
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        if type(inner).__name__ not in self.model_class_names:
            raise ValueError(
                f"vlmkit's {self.model_type!r} family wraps {list(self.model_class_names)}, "
                f"got {type(inner).__name__}"
            )
        self.model = inner
        self.config = inner.config

    def require(self, capability: str, stage: str) -> None:
        """ValueError naming the stage, the capability and why this family lacks it (``wrap()`` time)."""
        if capability not in CAPABILITIES:
            raise ValueError(f"stage {stage!r} requires unknown capability {capability!r}; known: {sorted(CAPABILITIES)}")
        if capability not in self.capabilities:
            why = self.lacks.get(capability, "does not provide it")
            raise ValueError(f"stage {stage!r} needs {CAPABILITIES[capability]} ({capability!r}), but "
                             f"{self.model_type!r} {why}")

    # --- ids and embeddings -------------------------------------------------------------------
    @property
    def placeholder_id(self) -> int:
        return int(self.config.image_token_id)

    def image_run_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] bool: the slots of ``input_ids`` [B, S] that belong to the images' runs, i.e. that the images'
        ``VisualTokens`` fill in ``sequence.assemble`` (default: the placeholder tokens). A family whose processor
        writes other tokens inside an image's run (Mistral 3: ``[IMG_BREAK]`` / ``[IMG_END]`` after each row) adds
        them; its ``VisualTokens`` then carry them as newline tokens (``source == -1``)."""
        return input_ids == self.placeholder_id

    @property
    def pad_token_id(self) -> int:
        for cfg in (self.config, getattr(self.config, "text_config", None)):
            pad = getattr(cfg, "pad_token_id", None)
            if pad is not None:
                return int(pad)
        return 0

    @property
    def input_embeddings(self) -> nn.Module:
        """The language model's input embedding table (``nn.Embedding``, weight [V, D])."""
        return self.model.get_input_embeddings()

    @property
    def text_width(self) -> int:
        """Hidden size D of the language model (= width of the projected visual tokens)."""
        return int(self.input_embeddings.embedding_dim)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] ids -> [B, S, D] input embeddings of the language model."""
        return self.input_embeddings(input_ids)

    # --- language model -----------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        """The decoder backbone (``LlamaModel``/``Qwen2Model``…) that runs on ``inputs_embeds``."""
        return self.model.model.language_model

    def set_decoder_checkpointing(self, enable: bool, kwargs=None, every_n_layers: int = 1,
                                  offload: bool = False) -> None:
        """Turn activation checkpointing of the decoder's layers on or off (the vision tower is left alone)."""
        decoder = self.language_model
        if not enable:
            off = getattr(decoder, "activation_checkpointing_disable", None) or decoder.gradient_checkpointing_disable
            off()
        elif hasattr(decoder, "activation_checkpointing_enable"):  # transformers >= 5.2x
            decoder.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)
        elif hasattr(decoder, "gradient_checkpointing_enable"):
            decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise ValueError(f"the decoder ({type(decoder).__name__}) does not support activation checkpointing")

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The decoder's transformer layers, in order (what decoder stages act between)."""
        return self.language_model.layers

    @property
    def rotary_embedding(self) -> nn.Module | None:
        """The decoder's rotary-embedding module (what position schemes remap), or None if it has none."""
        return getattr(self.language_model, "rotary_emb", None)

    @property
    def rope_kind(self) -> str | None:
        """What positions ``rotary_embedding`` takes: ``"1d"`` ([B, S] position ids), ``"mrope"`` (M-RoPE:
        [3, B, S] (t, h, w) ids) or None (no remappable rotary module)."""
        rotary = self.rotary_embedding
        if not isinstance(rotary, nn.Module) or not callable(getattr(rotary, "forward", None)):
            return None
        text = getattr(self.config, "text_config", self.config)
        rope_type = getattr(rotary, "rope_type", "default")
        if "mrope_section" in (getattr(text, "rope_parameters", None) or {}) or (
                isinstance(rope_type, str) and "mrope" in rope_type):
            return "mrope"
        return "1d"

    def language_inputs(self, batch) -> dict[str, Any]:
        """Extra keyword arguments the decoder needs for an ``AssembledBatch`` (default: none).

        Qwen2.5-VL returns its 3-D M-RoPE ``position_ids`` here: they depend on where every kept visual
        token came from, which only the assembled batch knows.
        """
        return {}

    def language_context(self, batch):
        """A context manager the wrapper enters around every language-model call sequence on the ``AssembledBatch``
        ``batch`` (``forward``, the whole ``generate``), before the stages' contexts: the family's own decoder-time
        hooks, e.g. Qwen3-VL's DeepStack features added to the kept visual tokens. Default: nothing."""
        import contextlib

        return contextlib.nullcontext()

    def mrope_positions(self, batch, layout=None) -> torch.Tensor:
        """M-RoPE families (capability ``mrope``): the (t, h, w) positions [3, B, L] of an ``AssembledBatch``, by the
        model's own rule (``layout=None``) or with each image's offsets mapped by ``layout(image, offsets)``
        (position stages; see ``Qwen2_5_VLFamily.mrope_positions``)."""
        self.require("mrope", "mrope_positions")
        raise NotImplementedError

    def mrope_input(self, text_positions: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """M-RoPE families: the ``position_ids`` argument of the decoder for integer text positions [B, L] and M-RoPE
        positions [3, B, L] (of one dtype)."""
        self.require("mrope", "mrope_input")
        raise NotImplementedError

    # --- decoder attention (decoder-side pruning) ---
    def decoder_attention(self, layer_index: int) -> nn.Module:
        """The self-attention module of ``decoder_layers[layer_index]``."""
        return self.decoder_layers[layer_index].self_attn

    def decoder_sliding_window(self, layer_index: int) -> int | None:
        """Sliding window W of ``decoder_layers[layer_index]``: a query attends only to keys less than W slots before
        it (and its KV cache keeps the last W − 1); None (default) for a layer that attends to the whole sequence.
        Decoder-side pruning builds its masks and scores by it (Gemma 3's local layers)."""
        return None

    def decoder_attention_blocks(self, visual: torch.Tensor) -> torch.Tensor | None:
        """Block id [B, S] of every slot of a decoder input whose visual slots are ``visual`` [B, S] bool: slots of one
        block (id ≥ 0) attend to each other in both directions on top of the causal mask (Gemma 3's images); None
        (default): causal attention only. Decoder-side pruning rebuilds the blocks on its re-packed layout by it."""
        return None

    @property
    def decoder_final_norm(self) -> nn.Module:
        """The decoder's final norm (what the model applies to the last layer's output before the LM head);
        maps hidden states [B, S, D] to [B, S, D] (DART compares tokens by it on an earlier layer's output)."""
        return self.language_model.norm

    def decoder_attention_implementation(self, layer_index: int = 0) -> str:
        """The attention kernel ``decoder_layers[layer_index]`` runs (``"eager"``, ``"sdpa"``, ``"flash_attention_2"``…);
        it fixes the format of the 4-D masks the layer takes (eager: additive float, sdpa: bool or None)."""
        return str(self.decoder_attention(layer_index).config._attn_implementation)

    def decoder_qk(self, layer_index: int, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                   query_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Queries and keys of decoder layer ``layer_index`` for the hidden states ``hidden`` [B, S, D] that
        *enter* the layer, computed with its own input norm, projections, q/k norms (if any) and RoPE
        (``position_embeddings`` = the ``(cos, sin)`` the layer receives, [1 or B, S, d]; M-RoPE's are already per
        token): ``(q [B, H, n, d], k [B, H, S, d], scale)``, keys repeated to the H query heads (GQA), so
        ``softmax(q kᵀ · scale + mask)`` are that layer's attention probabilities. ``query_index`` [B, n] picks
        the query rows (default: all S)."""
        import sys

        layer = self.decoder_layers[layer_index]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        B, S, D = x.shape
        d = int(attn.head_dim)
        cos, sin = position_embeddings
        cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)
        xq, cq, sq = x, cos, sin
        if query_index is not None:
            idx = query_index.to(x.device)
            xq = x.gather(1, idx[..., None].expand(-1, -1, D))
            cq = cos.gather(1, idx[..., None].expand(-1, -1, cos.shape[-1]))
            sq = sin.gather(1, idx[..., None].expand(-1, -1, sin.shape[-1]))
        q = attn.q_proj(xq).view(B, xq.shape[1], -1, d)
        k = attn.k_proj(x).view(B, S, -1, d)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head q/k norms
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # what the layer's own forward calls
        q = rope(q, q, cq, sq)[0]
        k = rope(k, k, cos, sin)[1]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        return q, k, float(attn.scaling)

    # --- vision -------------------------------------------------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        """The vision encoder module (what the model runs on ``pixel_values`` before its projector)."""
        return self.model.model.vision_tower

    @property
    def vision_layers(self) -> nn.ModuleList:
        """The vision encoder's transformer layers (for hooks: FoPru scores, PVC temporal blocks)."""
        tower = self.vision_tower  # CLIPVisionModel / SiglipVisionModel keep the encoder in .vision_model
        return getattr(tower, "vision_model", tower).encoder.layers

    @property
    def feature_layer(self) -> int:
        """The model's ``vision_feature_layer``: an index into the tower's hidden states (0 = embeddings, -1 =
        last layer's output), or a list of them for models that concatenate several."""
        return self.config.vision_feature_layer

    @property
    def feature_layer_index(self) -> int | None:
        """0-based index into ``vision_layers`` of the layer whose *output* the model takes as its visual
        features (hidden state i is the output of layer i-1), or None when the features are not one layer's
        output (a list of layers, or the embeddings). ValueError when the index is out of range."""
        fl, n = self.feature_layer, len(self.vision_layers)
        if not isinstance(fl, int) or isinstance(fl, bool) or fl == 0:
            return None
        layer = fl if fl < 0 else fl - 1
        if not -n <= layer < n:
            raise ValueError(f"vision_feature_layer={fl} is out of range for the {n} vision layers of this "
                             f"{self.model_type} model")
        return layer % n

    def patch_pooling(self, stage: str) -> tuple[tuple[int, int], int]:
        """``((ph, pw), f)``: one tile's patch grid and the f×f patches each visual token pools (f = 1: a token per
        patch); ValueError naming ``stage`` when the visual tokens are not a pooled patch grid."""
        (H, W), (p1, p2) = self.image_size, self.patch_size
        patch_grid, (h, w) = (H // p1, W // p2), self.grid
        factor = patch_grid[0] // h if h else 0
        if not factor or patch_grid != (h * factor, w * factor):
            raise ValueError(
                f"{stage} scores patch tokens, but this {self.model_type} model's visual tokens (grid {h}×{w}) are not "
                f"a pooled {patch_grid[0]}×{patch_grid[1]} patch grid (vision_feature_select_strategy must be 'default')")
        return patch_grid, factor

    @property
    def vision_width(self) -> int:
        """Hidden size C of the vision tower's layers (width of their hidden states [B, S, C])."""
        return int(self.config.vision_config.hidden_size)

    @property
    def vision_heads(self) -> int:
        """Number of attention heads H of the vision tower's layers."""
        return int(self.config.vision_config.num_attention_heads)

    def vision_attention(self, layer_index: int) -> nn.Module:
        """The self-attention module of ``vision_layers[layer_index]``; what it receives (first argument or
        ``hidden_states``) is its layer's layer-normed hidden states [B, S, C] (for hooks; ``vision_qk``)."""
        layer = self.vision_layers[layer_index]
        for module in layer.modules():
            if all(hasattr(module, a) for a in ("q_proj", "k_proj", "num_heads", "head_dim", "scale")):
                return module
        raise ValueError(f"{type(layer).__name__} has no attention module with q_proj/k_proj/num_heads/head_dim/scale")

    def vision_qk(self, layer_index: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Queries and keys of vision layer ``layer_index`` for its attention input ``hidden`` [B, S, C]:
        ``(q [B, H, S, d], k [B, H, S, d], scale)`` in the model's dtype, computed with the layer's own
        projections (and q/k norms), so ``softmax(q kᵀ · scale)`` are that layer's attention probabilities."""
        attn = self.vision_attention(layer_index)
        B, S, _ = hidden.shape
        q, k = attn.q_proj(hidden), attn.k_proj(hidden)
        if hasattr(attn, "q_norm"):  # InternViT-6B style q/k norms (Identity when unused)
            q, k = attn.q_norm(q), attn.k_norm(k)
        H, d = attn.num_heads, attn.head_dim
        return q.reshape(B, S, H, d).transpose(1, 2), k.reshape(B, S, H, d).transpose(1, 2), attn.scale

    @property
    def global_vision_layers(self) -> list[int]:
        """0-based indices of the vision layers whose attention spans a whole tile / image (default: all; a
        windowed tower lists only its full-attention layers)."""
        return list(range(len(self.vision_layers)))

    def check_vision_attention(self, layer_index: int, stage: str) -> None:
        """ValueError naming ``stage`` unless ``on_vision_attention(layer_index)`` can run on this model (``wrap()``
        time): here, the visual tokens must pool a patch grid and the layer must have a q/k attention module."""
        self.patch_pooling(stage)
        self.vision_attention(layer_index)

    def vision_attention_groups(self, layer_index: int, hidden: torch.Tensor, **attention_kwargs) -> list[AttentionGroup]:
        """The attention of vision layer ``layer_index`` as independent groups, from what its attention module
        receives (``hidden``: the layer-normed hidden states [B, S, C], one tile per row, and the module's other
        keyword arguments): one ``AttentionGroup`` per tile, prefix 1 for a CLS token (S = patches + 1), token =
        the pooled f×f block each patch feeds (``patch_pooling``), row-major."""
        (ph, pw), f = self.patch_pooling("vision_attention_groups")
        q, k, scale = self.vision_qk(layer_index, hidden)
        S = hidden.shape[1]
        prefix = S - ph * pw
        if prefix not in (0, 1):
            raise ValueError(f"{S} vision tokens do not match the {ph}×{pw} patch grid (+ optional CLS)")
        r = torch.arange(ph, device=hidden.device)[:, None] // f
        c = torch.arange(pw, device=hidden.device)[None, :] // f
        token = (r * (pw // f) + c).reshape(-1)
        n = (ph // f) * (pw // f)
        return [AttentionGroup(q[b], k[b], scale, prefix, token, n) for b in range(hidden.shape[0])]

    def on_vision_attention(self, layer_index: int, hook) -> Any:
        """Call ``hook(groups)`` (``vision_attention_groups``) whenever vision layer ``layer_index``'s attention runs,
        without changing what it computes (the tower keeps its own attention kernel); returns a handle whose
        ``remove()`` stops it."""
        def pre(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            hook(self.vision_attention_groups(layer_index, hidden))

        return self.vision_attention(layer_index).register_forward_pre_hook(pre, with_kwargs=True)

    def vision_mlp(self, layer_index: int) -> nn.Module:
        """The MLP module of ``vision_layers[layer_index]`` (input and output [B, S, C], for hooks)."""
        layer = self.vision_layers[layer_index]
        for module in layer.modules():
            if hasattr(module, "fc1") and hasattr(module, "fc2"):
                return module
        raise ValueError(f"{type(layer).__name__} has no MLP submodule with fc1/fc2")

    def vision_hidden_states(self, pixel_values: torch.Tensor, index: int) -> torch.Tensor:
        """The vision tower's hidden state ``index`` (0 = embeddings, -1 = last layer's output) for one tile
        per row of ``pixel_values`` [N, C, H, W] (cast to the tower's dtype): [N, S, C], CLS / prefix tokens
        included, before any projector."""
        tower = self.vision_tower
        dtype = next(tower.parameters()).dtype
        return tower(pixel_values.to(dtype), output_hidden_states=True).hidden_states[index]

    def on_vision_input(self, hook) -> Any:
        """Call ``hook(pixel_values)`` whenever the vision tower is about to run (whatever runs it); returns a
        handle whose ``remove()`` stops it."""
        def pre(module, args, kwargs):
            hook(args[0] if args else kwargs["pixel_values"])

        return self.vision_tower.register_forward_pre_hook(pre, with_kwargs=True)

    def on_resized_vision(self, resize, restore) -> Any:
        """Run the vision tower on resized tiles while the returned handle lives (capability ``vision_resize``):
        ``resize(pixel_values [N, C, H, W]) -> [N, C, H', W']`` replaces the tower's input (H', W' multiples of the
        pixels per visual token), the tower interpolates its position embeddings to the smaller patch grid
        (``interpolate_pos_encoding``, as CLIP / SigLIP in transformers do), and ``restore(features [N, n', D]) ->
        [N, n, D]`` replaces the projector's output (n' the small grid's tokens per tile, n = ``tokens_per_tile``),
        so the model's code after the projector sees a full tile. ``remove()`` on the handle stops both."""
        self.require("vision_resize", "on_resized_vision")

        def pre(module, args, kwargs):
            if args:
                args = (resize(args[0]), *args[1:])
            else:
                kwargs = {**kwargs, "pixel_values": resize(kwargs["pixel_values"])}
            return args, {**kwargs, "interpolate_pos_encoding": True}

        def post(module, args, output):
            return restore(output)

        return HookHandles([self.vision_tower.register_forward_pre_hook(pre, with_kwargs=True),
                            self.projector.register_forward_hook(post)])

    # --- vision attention rows (pre-LLM pruners) ---
    @property
    def projector(self) -> nn.Module:
        """The module that maps pre-projector visual features to language-model embeddings
        (``part_paths["projector"]``)."""
        return self.model.get_submodule(self.part_paths["projector"])

    def on_projector_input(self, hook) -> Any:
        """Call ``hook(features)`` with the projector's input whenever it runs (families with
        ``token_projector``: [tiles, tokens_per_tile, C'], one row per visual token, tile-major in the order
        the tower ran the tiles); returns a handle whose ``remove()`` stops it."""
        def pre(module, args, kwargs):
            hook(args[0] if args else next(iter(kwargs.values())))

        return self.projector.register_forward_pre_hook(pre, with_kwargs=True)

    def project_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-projector features of visual tokens [..., C'] (what ``on_projector_input`` sees) -> their
        language-model embeddings [..., D] through the model's own projector (``token_projector``: it acts
        on each token on its own)."""
        self.require("token_projector", "project_tokens")
        return self.projector(features)

    @property
    def image_size(self) -> tuple[int, int]:
        return _as_pair(self.config.vision_config.image_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return _as_pair(self.config.vision_config.patch_size)

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the visual-token grid of one tile, as the language model sees it uncompressed."""
        (H, W), (ph, pw) = self.image_size, self.patch_size
        return H // ph, W // pw

    @property
    def tokens_per_tile(self) -> int:
        h, w = self.grid
        return h * w

    def check_pixel_values(self, pixel_values: Any) -> None:
        """Raise ValueError unless ``pixel_values`` is a float tensor [N, C, H, W] of the tower's size."""
        self._check_pixel_shape(pixel_values, ("num_images",))

    def _check_pixel_shape(self, pixel_values: Any, leading: tuple[str, ...]) -> None:
        """TypeError unless a tensor; ValueError unless its shape is [*leading, C, H, W] of the tower."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        C = self.config.vision_config.num_channels
        H, W = self.image_size
        n = len(leading)
        if pixel_values.dim() != n + 3 or tuple(pixel_values.shape[n:]) != (C, H, W):
            raise ValueError(
                f"pixel_values must be [{', '.join(leading)}, {C}, {H}, {W}] for this {self.model_type} model, "
                f"got shape {tuple(pixel_values.shape)}"
            )

    def tiles_per_image(self, input_ids: torch.Tensor | None, num_tiles: int) -> list[int]:
        """How many rows of ``pixel_values`` make up each image (one each unless a family tiles)."""
        return [1] * num_tiles

    def image_features(self, pixel_values: torch.Tensor, **image_kwargs) -> list[torch.Tensor]:
        """Per-tile projected features through the model's own tower and projector: list of [N, D]."""
        out = self.model.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            **image_kwargs,
        )
        return list(out.pooler_output)

    def encode_images(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None, **image_kwargs
    ) -> list[VisualTokens]:
        """One uncompressed ``VisualTokens`` per image (tiles of one image are concatenated, ``frame`` = tile)."""
        self.check_pixel_values(pixel_values)
        feats = self.image_features(pixel_values, **image_kwargs)
        tiles = self.tiles_per_image(input_ids, len(feats))
        if sum(tiles) != len(feats):
            raise ValueError(
                f"pixel_values holds {len(feats)} image tile(s) but the image placeholder runs in input_ids "
                f"need {sum(tiles)} (tiles per image: {tiles})"
            )
        out, start = [], 0
        for n in tiles:
            embeds = torch.cat(feats[start : start + n], dim=0)
            out.append(VisualTokens.full(embeds, self.grid, frames=n))
            start += n
        return out
