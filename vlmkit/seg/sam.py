"""segment-anything helpers shared by the segmentation heads: load SAM from a local checkpoint, a
tiny SAM for tests, and Text4Seg's coarse-mask refinement (arXiv 2410.09855; ``mc-lan/Text4Seg`` @ d6540b6).

Refinement, as ``ms-swift/text4seg/infer_refer_seg.py``: the coarse grid becomes a ±6.9068 logit
prior at SAM's low-res mask size (256² for every released SAM); k positive and k negative points are
drawn from the coarse mask upsampled to the image; ``SamPredictor.predict`` runs once with the prior
and then ``iterations - 1`` more times, each fed the previous call's low-res logits.

Documented choices where the reference is ambiguous:

- Prior resize: ms-swift resizes the logits with ``ResizeLongestSide(256).apply_image``, i.e.
  torchvision ``to_pil_image`` + PIL bilinear resize. With older torchvision a float32 H×W×1 array
  became a PIL ``"F"`` image (real-valued bilinear resize of the logits); current torchvision
  (0.29 here) multiplies float arrays by 255 and casts to uint8 first, which turns the logits into
  wrapped garbage. We implement the intended ``"F"``-mode bilinear resize (the LLaVA branch uses
  bilinear ``F.interpolate`` instead).
- Points: the reference seeds the global RNG once (``seed_everything(42)``) so a sample's points
  depend on its position in the run; here each mask draws from its own ``torch.Generator`` seeded
  with ``seed`` (same draws as the reference after ``torch.manual_seed(seed)``).
- Prior frame: the reference stretches the (square) grid over the whole 256² frame although SAM's
  frame holds the image padded to a square (misaligned for non-square images). ``align_prior=True``
  places it over the image region instead and pads with 0 (a fix; off by default for parity).
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "SAM_BUILDERS", "FG_PROB", "tiny_sam", "load_sam", "make_predictor", "mask_prior", "sample_points",
    "SamRefinement", "refine_with_sam", "sam_refine",
    # prompting helpers for the [SEG] heads (READ / LISA)
    "SamInput", "preprocess_image", "embed_images", "transform_coords", "prompt_sam", "postprocess_masks", "rgb_array",
]

#: Probability whose logit marks foreground cells of the prior (background: 1 - FG_PROB).
FG_PROB = 1 - 1e-3


def _registry_builder(name: str) -> Callable[[], Any]:
    def build():
        from segment_anything import sam_model_registry

        return sam_model_registry[name]()  # no checkpoint: we load the state dict ourselves

    return build


def tiny_sam(seed: int = 0, img_size: int = 64, patch_size: int = 8, dim: int = 32):
    """A small ``segment_anything.modeling.Sam`` with random weights (seeded; the global RNG is untouched).

    Same classes as the released SAMs: ``img_size``² input, ``(img_size / patch_size)``² embedding,
    low-res masks of 4× the embedding side (32² by default; 256² in the released SAMs).
    """
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
    side = img_size // patch_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=img_size, patch_size=patch_size, embed_dim=dim, depth=2, num_heads=2, mlp_ratio=2.0,
                out_chans=dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=True, window_size=max(1, side // 2), global_attn_indexes=(1,),
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=dim, image_embedding_size=(side, side), input_image_size=(img_size, img_size),
                mask_in_chans=8,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=2 * dim, num_heads=2),
                transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=dim,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    return sam.eval()


#: ``sam_type`` → builder of an uninitialised SAM (the ``segment_anything`` registry, plus ``tiny``).
SAM_BUILDERS: dict[str, Callable[[], Any]] = {
    "vit_h": _registry_builder("vit_h"),
    "vit_l": _registry_builder("vit_l"),
    "vit_b": _registry_builder("vit_b"),
    "tiny": tiny_sam,
}


def load_sam(checkpoint: str | os.PathLike, sam_type: str = "vit_h", device: str = "cpu"):
    """Build ``sam_type`` and load the state dict at ``checkpoint`` (``torch.load(weights_only=True)``).

    E.g. ``load_sam("sam_vit_h_4b8939.pth", "vit_h")``. Raises ValueError for an unknown type, a file
    that is not a plain state dict, or keys/shapes that do not match the architecture.
    """
    import torch

    if sam_type not in SAM_BUILDERS:
        raise ValueError(f"unknown sam_type {sam_type!r}; accepted: {sorted(SAM_BUILDERS)}")
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise ValueError(f"SAM checkpoint {path!r} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for anything but tensors and containers
        raise ValueError(f"{path!r} is not a plain SAM state dict loadable with weights_only=True: {err}") from err
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    sam = SAM_BUILDERS[sam_type]()
    try:
        missing, unexpected = sam.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise ValueError(f"{path!r} does not fit sam_type {sam_type!r}: {err}") from err
    if missing or unexpected:
        raise ValueError(
            f"{path!r} does not fit sam_type {sam_type!r}: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    return sam.to(device=device, dtype=torch.float32).eval()


def make_predictor(sam):
    """``segment_anything.SamPredictor`` for ``sam`` (fp32, as the reference)."""
    from segment_anything import SamPredictor

    return SamPredictor(sam)


def _preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """``ResizeLongestSide.get_preprocess_shape``: (H, W) scaled so the long side is ``long_side``."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _resize_logits(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(logits, dtype=np.float32))  # mode "F"
    return np.asarray(img.resize((width, height), Image.BILINEAR), dtype=np.float32)


def mask_prior(
    grid: np.ndarray, size: tuple[int, int] = (256, 256), image_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Coarse grid bool [h, w] → SAM ``mask_input`` float32 [1, *size]: logit(±(1 − 1e-3)) = ±6.9068.

    The logits are computed in float32 as the reference, then resized (PIL ``"F"`` bilinear):
    a square grid to the whole frame, a non-square one to long side ``size[0]`` padded with 0 at the
    bottom/right. With ``image_size`` = (H, W) (``align_prior``) the grid is resized to the image's
    region of SAM's padded frame instead and the rest is 0.
    """
    fg = np.asarray(grid, dtype=bool)
    if fg.ndim != 2:
        raise ValueError(f"grid must be 2-D [h, w], got shape {fg.shape}")
    p = np.where(fg, np.float32(FG_PROB), np.float32(1 - FG_PROB)).astype(np.float32)
    logits = np.log(p / (np.float32(1) - p))  # float32, as the reference
    sh, sw = size
    if image_size is not None:
        th, tw = _preprocess_shape(image_size[0], image_size[1], max(sh, sw))
    elif fg.shape == (sh, sw):
        th, tw = sh, sw
    elif fg.shape[0] == fg.shape[1]:
        th, tw = sh, sw
    else:
        th, tw = _preprocess_shape(fg.shape[0], fg.shape[1], max(sh, sw))
    if fg.shape != (th, tw):
        logits = _resize_logits(logits, th, tw)
    out = np.zeros((sh, sw), dtype=np.float32)
    out[: min(th, sh), : min(tw, sw)] = logits[:sh, :sw]
    return out[None]


def sample_points(mask: np.ndarray, k: int, generator) -> tuple[np.ndarray, np.ndarray]:
    """k random foreground and k random background pixels of bool mask [H, W].

    Returns ``coords`` float64 [N, 2] as (x, y) pixels (positives first) and ``labels`` uint8 [N]
    (1 positive, 0 negative); N ≤ 2k when a side has fewer pixels. Draw order and indexing follow
    the reference's ``masks_sample_points``: ``torch.randperm`` over the row-major pixels, positives
    first.
    """
    import torch

    m = torch.as_tensor(np.asarray(mask, dtype=bool))
    picked = []
    for sel in (m, ~m):
        yx = torch.nonzero(sel)  # row-major, as masked_select over a meshgrid
        idx = torch.randperm(yx.shape[0], generator=generator)[:k]
        picked.append(yx[idx].flip(-1).to(torch.float64))  # (x, y)
    coords = torch.cat(picked).numpy()
    labels = np.concatenate([np.ones(len(picked[0]), np.uint8), np.zeros(len(picked[1]), np.uint8)])
    return coords, labels


@dataclasses.dataclass(eq=False)
class SamRefinement:
    """``mask`` bool [H, W]; ``score``: SAM's IoU estimate (None when SAM was skipped);
    ``point_coords`` [N, 2] (x, y); ``point_labels`` [N]; ``low_res_logits`` [1, 256, 256] or None."""

    mask: np.ndarray
    score: float | None
    point_coords: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    low_res_logits: np.ndarray | None = None

    @property
    def skipped(self) -> bool:
        return self.score is None


def refine_with_sam(
    predictor,
    grid: np.ndarray,
    *,
    points: int = 10,
    iterations: int = 3,
    seed: int = 0,
    align_prior: bool = False,
) -> SamRefinement:
    """Refine coarse grid bool [h, w] on the image already set on ``predictor`` (``set_image``).

    An all-background grid skips SAM and returns an empty mask at the image size.
    """
    import torch

    from vlmkit.seg.rrle import grid_to_mask

    if not predictor.is_image_set:
        raise ValueError("call predictor.set_image(image) before refine_with_sam")
    if iterations < 1 or points < 1:
        raise ValueError(f"iterations and points must be >= 1, got {iterations}, {points}")
    height, width = predictor.original_size
    fg = np.asarray(grid, dtype=bool)
    if not fg.any():
        return SamRefinement(mask=np.zeros((height, width), dtype=bool), score=None)
    coarse = grid_to_mask(fg, (height, width))
    prior = mask_prior(
        fg, tuple(predictor.model.prompt_encoder.mask_input_size),
        image_size=(height, width) if align_prior else None,
    )
    coords, labels = sample_points(coarse, points, torch.Generator().manual_seed(seed))
    mask_input = prior
    for _ in range(iterations):
        masks, scores, low_res = predictor.predict(
            point_coords=coords, point_labels=labels, mask_input=mask_input, multimask_output=False,
        )
        mask_input = low_res
    return SamRefinement(
        mask=np.asarray(masks[0], dtype=bool), score=float(scores[0]), point_coords=coords,
        point_labels=labels, low_res_logits=low_res,
    )


def sam_refine(sam, image: Any, grid: np.ndarray, **kwargs) -> SamRefinement:
    """One-shot :func:`refine_with_sam` on ``image`` (PIL or uint8 [H, W, 3] RGB) with model ``sam``."""
    fg = np.asarray(grid, dtype=bool)
    arr = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    if not fg.any():  # skip SAM entirely, image embedding included
        return SamRefinement(mask=np.zeros(arr.shape[:2], dtype=bool), score=None)
    predictor = make_predictor(sam)
    predictor.set_image(arr)
    return refine_with_sam(predictor, fg, **kwargs)


# ---------------------------------------------------------------------------------------------
# Prompting helpers for the [SEG]-token heads (``vlmkit.seg.read``): the steps of ``SamPredictor``
# as differentiable tensor functions, plus an extra sparse prompt token (LISA's text slot).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class SamInput:
    """One image prepared for SAM: ``pixels`` float32 [1, 3, S, S] (resized so the long side is S =
    ``image_encoder.img_size``, normalised, zero-padded bottom/right), ``input_size`` (h, w) of the
    resized image inside the padded frame, ``original_size`` (H, W) of the image as given."""

    pixels: Any
    input_size: tuple[int, int]
    original_size: tuple[int, int]


def rgb_array(image: Any) -> np.ndarray:
    """PIL image or uint8 array [H, W, 3] → uint8 RGB array [H, W, 3]."""
    if hasattr(image, "convert") and hasattr(image, "size"):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images must be PIL images or uint8 arrays [H, W, 3], got {arr.dtype} {arr.shape}")
    return arr


def preprocess_image(sam, image: Any) -> SamInput:
    """Prepare ``image`` (PIL or uint8 [H, W, 3] RGB) exactly as ``SamPredictor.set_image``:
    ``ResizeLongestSide(img_size).apply_image`` (PIL bilinear on uint8), then ``sam.preprocess``
    (subtract ``pixel_mean``, divide by ``pixel_std``, pad to img_size²). Runs on ``sam``'s device."""
    import torch
    from segment_anything.utils.transforms import ResizeLongestSide

    arr = rgb_array(image)
    resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(arr)
    x = torch.as_tensor(resized, device=sam.pixel_mean.device).permute(2, 0, 1).contiguous()[None].float()
    pixels = sam.preprocess(x)
    return SamInput(pixels=pixels, input_size=tuple(resized.shape[:2]), original_size=tuple(arr.shape[:2]))


def embed_images(sam, inputs: Sequence[SamInput]):
    """Image embeddings [N, C, h', w'] of prepared images, one encoder call per image (frozen: no grad)."""
    import torch

    dtype = next(sam.image_encoder.parameters()).dtype
    with torch.no_grad():
        return torch.cat([sam.image_encoder(inp.pixels.to(dtype)) for inp in inputs], dim=0)


def transform_coords(coords, original_size: tuple[int, int], long_side: int):
    """(x, y) pixel coordinates [..., 2] of the original image → SAM's resized frame
    (``ResizeLongestSide.apply_coords_torch``; differentiable, returns float32)."""
    import torch

    old_h, old_w = original_size
    new_h, new_w = _preprocess_shape(old_h, old_w, long_side)
    coords = torch.as_tensor(coords).to(torch.float32)
    scale = torch.tensor([new_w / old_w, new_h / old_h], dtype=torch.float32, device=coords.device)
    return coords * scale


def prompt_sam(
    sam,
    image_embedding,
    *,
    point_coords=None,
    point_labels=None,
    extra_sparse=None,
    multimask_output: bool = False,
):
    """Run SAM's prompt encoder and mask decoder for one image.

    ``image_embedding`` [1, C, h', w'] (``embed_images``); ``point_coords`` [N, P, 2] (x, y) in SAM's
    resized frame (``transform_coords``) with ``point_labels`` [N, P] (1 positive, 0 negative, -1
    not-a-point); as in the reference prompt encoder, a padding point (label -1) is appended to the
    points because no box is given. ``extra_sparse`` [N, K, C]: embeddings appended after the point
    tokens (LISA / READ put the projected ``[SEG]`` state there). Dense prompt: ``no_mask_embed``.
    Returns ``low_res_logits`` [N, 1 (3 with multimask_output), 4h', 4w'] and ``iou`` [N, 1 (3)].
    """
    import torch

    pe = sam.prompt_encoder
    points = None
    if point_coords is not None:
        if point_labels is None:
            raise ValueError("point_coords need point_labels")
        points = (point_coords, point_labels)
    elif extra_sparse is None:
        raise ValueError("prompt_sam needs point prompts, an extra sparse embedding, or both")
    sparse, dense = pe(points=points, boxes=None, masks=None)
    if extra_sparse is not None:
        if extra_sparse.dim() != 3 or extra_sparse.shape[-1] != pe.embed_dim:
            raise ValueError(
                f"extra_sparse must be [N, K, {pe.embed_dim}] (the prompt dim of this SAM), "
                f"got {tuple(extra_sparse.shape)}"
            )
        if points is None:
            sparse = sparse.expand(extra_sparse.shape[0], -1, -1)
        sparse = torch.cat([sparse, extra_sparse.to(device=sparse.device, dtype=sparse.dtype)], dim=1)
        if dense.shape[0] != sparse.shape[0]:
            dense = dense.expand(sparse.shape[0], -1, -1, -1)
    decoder_dtype = next(sam.mask_decoder.parameters()).dtype
    return sam.mask_decoder(
        image_embeddings=image_embedding.to(decoder_dtype),
        image_pe=pe.get_dense_pe().to(decoder_dtype),
        sparse_prompt_embeddings=sparse.to(decoder_dtype),
        dense_prompt_embeddings=dense.to(decoder_dtype),
        multimask_output=multimask_output,
    )


def postprocess_masks(sam, low_res_logits, input_size: tuple[int, int], original_size: tuple[int, int]):
    """Low-res logits [N, C, h, w] → logits [N, C, H, W] at the original size (``Sam.postprocess_masks``:
    bilinear to img_size², crop the padding, bilinear to (H, W)); float32."""
    return sam.postprocess_masks(low_res_logits.float(), tuple(input_size), tuple(original_size))
