"""Pruning maps: which visual tokens a compressor kept, drawn on the image (``vlmkit prune-viz``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

    from ..tokens import VisualTokens

KEPT_OUTLINE = (255, 210, 0)


def pruning_map(image: "Image.Image", visual_tokens: "VisualTokens", frame: int = 0, dim: float = 0.25,
                min_size: int = 336) -> "Image.Image":
    """The image with kept tokens' cells at full brightness (outlined) and pruned cells dimmed to ``dim``.

    The token grid ``visual_tokens.grid`` is stretched over the whole image (pass the tile the model saw);
    for tiled/multi-frame tokens only those of ``frame`` are drawn. Small images are upscaled to ``min_size``.
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
    return out


def _seen_image(pixel_values, image_processor) -> "Image.Image":
    """The tile the vision tower saw: un-normalise pixel_values [C, H, W] back to a PIL image."""
    import numpy as np
    from PIL import Image

    x = pixel_values.float().numpy().transpose(1, 2, 0)
    mean = np.asarray(getattr(image_processor, "image_mean", None) or [0.0] * 3, dtype=np.float32)
    std = np.asarray(getattr(image_processor, "image_std", None) or [1.0] * 3, dtype=np.float32)
    return Image.fromarray(np.clip((x * std + mean) * 255.0, 0, 255).round().astype(np.uint8))


def cli_main(argv: list[str]) -> int:
    """``vlmkit prune-viz --image FILE --keep 0.25 --strategy row --out map.png [--layer -2] [--model PATH]``."""
    parser = argparse.ArgumentParser(prog="vlmkit prune-viz", description="draw the visual tokens FoPru keeps")
    parser.add_argument("--image", required=True, help="input image file")
    parser.add_argument("--keep", type=float, default=0.25, help="keep ratio in (0, 1] (default 0.25)")
    parser.add_argument("--strategy", choices=["rank", "row"], default="rank")
    parser.add_argument("--layer", type=int, default=None, help="vision layer to score (default: the feature layer)")
    parser.add_argument("--model", default=None, help="local model directory (default: the tiny test LLaVA)")
    parser.add_argument("--out", required=True, help="output PNG")
    args = parser.parse_args(argv)

    from PIL import Image

    import vlmkit
    from vlmkit.testing import tiny_vlm

    if args.model:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
        processor = AutoProcessor.from_pretrained(args.model)
    else:
        model, processor = tiny_vlm("llava")
    try:
        config = vlmkit.FoPruConfig(keep_ratio=args.keep, strategy=args.strategy, layer=args.layer)
        wrapped = vlmkit.wrap(model, config)
    except ValueError as err:
        parser.error(str(err))
    image = Image.open(args.image).convert("RGB")
    tokens = vlmkit.Predictor(wrapped, processor, prompt_style="plain").visual_tokens([image])
    pixel_values = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    seen = _seen_image(pixel_values.reshape(-1, *pixel_values.shape[-3:])[0], processor.image_processor)
    pruning_map(seen, tokens[0]).save(args.out)
    print(f"kept {tokens[0].num_tokens} of {tokens[0].num_uncompressed} visual tokens "
          f"({args.strategy}, grid {tokens[0].grid}) -> {args.out}")
    return 0
