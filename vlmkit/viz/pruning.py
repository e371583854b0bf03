"""Pruning maps: which visual tokens a compressor kept, drawn on the image (``vlmkit prune-viz``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..cli import command
from .annotate import save_png

if TYPE_CHECKING:
    from PIL import Image

    from ..tokens import VisualTokens

KEPT_OUTLINE = (255, 210, 0)


def pruning_map(image: "Image.Image", visual_tokens: "VisualTokens", frame: int = 0, dim: float = 0.25,
                min_size: int = 336, *, method: str | None = None, keep_ratio: float | None = None,
                caption: bool | None = None) -> "Image.Image":
    """The image with kept tokens' cells at full brightness (outlined) and pruned cells dimmed to ``dim``.

    The token grid ``visual_tokens.grid`` is stretched over the whole image (pass the tile the model saw);
    for tiled/multi-frame tokens only those of ``frame`` are drawn. Small images are upscaled to ``min_size``.

    ``caption`` (default: on when ``method`` or ``keep_ratio`` is given) adds a title band above the map:
    ``"<method>, keep ratio <r>: <k> of <n> visual tokens kept"`` and a legend (outlined = kept, dimmed =
    pruned); ``info["Title"]`` / ``info["Legend"]`` hold the texts (``vlmkit.viz.annotate.save_png`` writes
    them into the PNG). Without a caption the map has the image's (upscaled) size.
    """
    from PIL import Image, ImageDraw

    h, w = visual_tokens.grid
    cells = visual_tokens.cell.tolist()
    if visual_tokens.frame is not None:
        frames = visual_tokens.frame.tolist()
        cells = [c for c, f in zip(cells, frames) if f == frame]
    base = image.convert("RGB")
    if min(base.size) < min_size:
        scale = -(-min_size // min(base.size))
        base = base.resize((base.width * scale, base.height * scale), Image.NEAREST)
    W, H = base.size
    out = Image.blend(Image.new("RGB", base.size), base, dim)
    draw = ImageDraw.Draw(out)
    for c in cells:
        r, col = divmod(c, w)
        box = (col * W // w, r * H // h, (col + 1) * W // w, (r + 1) * H // h)
        out.paste(base.crop(box), box[:2])
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=KEPT_OUTLINE, width=max(1, W // 300))
    if caption is None:
        caption = method is not None or keep_ratio is not None
    if not caption:
        return out
    from .annotate import caption as add_caption

    head = ", ".join(p for p in (method, None if keep_ratio is None else f"keep ratio {keep_ratio:g}") if p)
    title = f"{head + ': ' if head else ''}{len(set(cells))} of {h * w} visual tokens kept ({h}x{w} grid)"
    legend = [(KEPT_OUTLINE, "outline", "kept token (its cell)"), ((40, 40, 40), "fill", "pruned token (dimmed)")]
    return add_caption(out, title, legend)


def _seen_image(pixel_values, image_processor) -> "Image.Image":
    """The tile the vision tower saw: un-normalise pixel_values [C, H, W] back to a PIL image."""
    import numpy as np
    from PIL import Image

    x = pixel_values.float().numpy().transpose(1, 2, 0)
    mean = np.asarray(getattr(image_processor, "image_mean", None) or [0.0] * 3, dtype=np.float32)
    std = np.asarray(getattr(image_processor, "image_std", None) or [1.0] * 3, dtype=np.float32)
    return Image.fromarray(np.clip((x * std + mean) * 255.0, 0, 255).round().astype(np.uint8))


def _load_model(spec: str | None):
    """(model, processor, description) of ``--model``: a local checkpoint folder, ``tiny:<family>`` (a random-weight
    test model), or None: the shipped shapes model (``vlmkit/assets/shapes-llava-tiny``)."""
    from ..demo import SHIPPED

    if spec is not None and spec.startswith("tiny:"):
        from ..testing import tiny_vlm

        model, processor = tiny_vlm(spec[len("tiny:"):])
        return model, processor, f"{spec} (random weights: the map shows the mechanism, not a trained choice)"
    path = spec if spec is not None else str(SHIPPED)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor, path + (" (the shipped shapes model)" if spec is None else "")


@command("vlmkit prune-viz")
def cli_main(argv: list[str]) -> int:
    """``vlmkit prune-viz --image FILE --keep 0.25 --strategy row --out map.png [--layer -2] [--model PATH]``."""
    from ..cli import ArgumentParser, keep_ratio, user_input

    parser = ArgumentParser(prog="vlmkit prune-viz", description="Draw the visual tokens FoPru keeps on an image: "
                            "kept cells outlined, pruned cells dimmed, with a title (method, keep ratio, tokens "
                            "kept) and a legend.")
    parser.add_argument("--image", required=True, help="input image file")
    parser.add_argument("--keep", type=keep_ratio, default=0.25, help="keep ratio in (0, 1]")
    parser.add_argument("--strategy", choices=["rank", "row"], default="rank",
                        help="FoPru's selection: rank (top scores overall) or row (top scores of each row)")
    parser.add_argument("--layer", type=int, default=None,
                        help="vision layer to score (default: the model's feature layer)")
    parser.add_argument("--model", default=None, help="local checkpoint folder, or tiny:<family> for a random-weight "
                        "test model (default: the shipped shapes model, vlmkit/assets/shapes-llava-tiny)")
    parser.add_argument("--out", required=True, help="output PNG file (its folder must exist)")
    args = parser.parse_args(argv)

    import vlmkit

    from ..data.images import open_image, verify_image

    with user_input():  # everything checked before the model loads
        if args.model is not None and not args.model.startswith("tiny:") and not os.path.isfile(
                os.path.join(args.model, "config.json")):
            raise ValueError(f"--model {args.model!r}: not a checkpoint folder (no config.json; nothing is "
                             "downloaded); expected a local folder or tiny:<family>")
        verify_image(args.image, where="--image")
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise ValueError(f"--out {args.out!r}: folder {out_dir!r} does not exist")
        if os.path.isdir(args.out):
            raise ValueError(f"--out {args.out!r} is a folder; expected a PNG file name")
        config = vlmkit.FoPruConfig(keep_ratio=args.keep, strategy=args.strategy, layer=args.layer)
        model, processor, description = _load_model(args.model)
        print(f"model: {description}")
        wrapped = vlmkit.wrap(model, config)
        image = open_image(args.image, where="--image")
    tokens = vlmkit.Predictor(wrapped, processor, prompt_style="plain").visual_tokens([image])
    pixel_values = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    seen = _seen_image(pixel_values.reshape(-1, *pixel_values.shape[-3:])[0], processor.image_processor)
    picture = pruning_map(seen, tokens[0], method=f"FoPru {args.strategy}", keep_ratio=args.keep)
    picture.info["Model"] = description
    save_png(picture, args.out)
    print(f"kept {tokens[0].num_tokens} of {tokens[0].num_uncompressed} visual tokens "
          f"(FoPru {args.strategy}, keep ratio {args.keep:g}, grid {tokens[0].grid}) -> {args.out}")
    return 0
