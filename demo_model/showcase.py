"""The demo model's pictures for docs/images: graphs/txt2img.json, img2img.json and inpaint.json as shipped, a
sheet of prompts, and the inpainting check (how many pixels outside the mask changed).

    .venv/bin/python -m demo_model.showcase [--out docs/images]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ZOOM = 4  # the 64x64 pictures are shown 256x256 (nearest neighbour) in the docs
SHEET_PROMPTS = (
    "a large red circle in the centre on a blue background",
    "a small yellow square on the left on a black background",
    "a large green triangle on the right on a white background",
    "a small blue star at the top on a yellow background",
    "a large purple square at the bottom on an orange background",
    "a large white star in the centre on a purple background",
    "a small orange triangle at the bottom on a green background",
    "a large black circle on the left on a red background",
)


def run_graph(api: dict, base: Path, targets: list[str]) -> dict[str, tuple]:
    """Run an API graph (only `targets` and what they need) with the engine; returns each target's outputs."""
    from engine import Executor, validate
    from nodes import build_registry
    from nodes.folders import Folders
    from nodes.runtime import Runtime

    registry = build_registry(entry_points=False)
    runtime = Runtime(Folders.at(base))
    result = validate(api, registry, targets=targets, resources=runtime)
    if not result.ok:
        raise ValueError("; ".join(str(e) for e in result.errors))
    report = Executor(registry, resources=runtime).run(result.graph)
    if report.error is not None:
        raise RuntimeError(report.error.traceback)
    return {t: report.outputs[t] for t in targets}


def to_uint8(image) -> np.ndarray:
    """First picture of an IMAGE batch [B, H, W, C] as uint8, rounded as SaveImage rounds."""
    return np.clip(image[0].numpy() * 255.0, 0, 255).round().astype(np.uint8)


def zoom(pixels: np.ndarray) -> Image.Image:
    image = Image.fromarray(pixels)
    return image.resize((image.width * ZOOM, image.height * ZOOM), Image.NEAREST)


def strip(pictures: list[np.ndarray]) -> Image.Image:
    tiles = [zoom(p if p.ndim == 3 else np.repeat(p[..., None], 3, axis=-1)) for p in pictures]
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), tiles[0].height), (255, 255, 255))
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width + 4
    return sheet


def inpaint_check(api: dict, base: Path) -> dict[str, float]:
    """Run graphs/inpaint.json; compare its result with its 64x64 input where the (resized) mask is 0."""
    outputs = run_graph(api, base, ["14", "15", "12"])
    source, result = to_uint8(outputs["14"][0][0]), to_uint8(outputs["15"][0][0])
    import torch

    mask = outputs["12"][0][0].reshape(1, 1, *outputs["12"][0][0].shape[-2:]).float()
    mask = torch.nn.functional.interpolate(mask, size=source.shape[:2], mode="bilinear")[0, 0].numpy()
    outside, inside = mask == 0, mask >= 0.5
    return {
        "outside_pixels": int(outside.sum()),
        "outside_changed": int((source[outside] != result[outside]).any(axis=-1).sum()),
        "inside_pixels": int(inside.sum()),
        "inside_changed": int((source[inside] != result[inside]).any(axis=-1).sum()),
        "source": source, "result": result, "mask": (mask * 255).round().astype(np.uint8),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--base", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    graphs = {name: json.loads((ROOT / "graphs" / f"{name}.json").read_text()) for name in
              ("txt2img", "img2img", "inpaint")}

    # 1. txt2img as shipped, and a sheet of other prompts (same graph, prompt and seed changed).
    txt = to_uint8(run_graph(graphs["txt2img"], args.base, ["8"])["8"][0][0])
    zoom(txt).save(args.out / "demo-txt2img.png")
    sheet = []
    for i, prompt in enumerate(SHEET_PROMPTS):
        api = json.loads(json.dumps(graphs["txt2img"]))
        api["6"]["inputs"]["text"] = prompt
        api["3"]["inputs"]["seed"] = i
        sheet.append(to_uint8(run_graph(api, args.base, ["8"])["8"][0][0]))
    strip(sheet[:4]).save(args.out / "demo-prompts-1.png")
    strip(sheet[4:]).save(args.out / "demo-prompts-2.png")

    # 2. img2img: the scaled input and the result.
    outputs = run_graph(graphs["img2img"], args.base, ["14", "8"])
    strip([to_uint8(outputs["14"][0][0]), to_uint8(outputs["8"][0][0])]).save(args.out / "demo-img2img.png")

    # 3. inpaint: input, mask, result; and the count of changed pixels outside the mask.
    check = inpaint_check(graphs["inpaint"], args.base)
    strip([check["source"], check["mask"], check["result"]]).save(args.out / "demo-inpaint.png")
    print(f"inpaint: {check['outside_changed']} of {check['outside_pixels']} pixels outside the mask changed; "
          f"{check['inside_changed']} of {check['inside_pixels']} inside it did")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
