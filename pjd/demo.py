"""`pjd demo`: the embedded default model decoded with several methods from the same seeds.

Writes a PNG grid (one column per method, one row per image, classes in turn so every class shows
with the default batch of 10), a JSON list of per-method figures, and prints a table: steps, step
compression, wall seconds, speed-up over ar and over "hf" (transformers' own ``model.generate`` on
the same prompts, CFG and sampling: pjd.baseline), NLL, the classifier's accuracy on the requested
classes, and FID against the test split for batches of at least FID_MIN_IMAGES.

Every timed decode (each method, and hf) follows an untimed warm-up of the same method, settings,
seed and batch (pjd.timing.WarmUp: the identical call where Triton kernels compile, one row of the
grid where nothing does), so kernel compilation and first-call costs are never counted; the warmed
configurations are listed under "warm_up" in demo.json.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from pjd.timing import WarmUp

FID_MIN_IMAGES = 100  # below this the FID's small-sample bias swamps differences (docs/default_model.md)


def run_demo(methods=("ar", "sjd", "pjd"), batch=10, seed=0, cfg_scale=3.0, top_k=0, backend="auto",
             out="out/demo", json_file=None, progress=True, device="cpu", model=None, hf=True) -> list[dict]:
    from pjd.models import default
    from pjd.quality import class_accuracy, classifier_features, fid, nll_per_token

    dm = model or default(device=device)
    classes = torch.arange(batch) % len(dm.class_names)
    prompt = dm.prompt(classes)
    settings = dict(height=dm.height, width=dm.width, image_token_range=dm.image_token_range,
                    cfg_scale=cfg_scale, uncond_input_ids=dm.null_prompt(batch) if cfg_scale != 1 else None,
                    top_k=top_k, backend=backend, seed=seed, progress=progress)
    rows, images, warm = [], {}, WarmUp()
    for method in methods:
        with torch.no_grad():
            result = warm.generate(dm.model, prompt, method=method, **settings)
        nll = nll_per_token(dm.model, result.tokens, prompt, image_token_range=dm.image_token_range)
        rows.append(dict(
            method=method, steps=result.steps,
            step_compression=dm.height * dm.width / result.steps,
            per_image_compression=dm.height * dm.width / float(result.steps_per_image.double().mean()),
            seconds=result.wall_seconds, forward_seconds=result.forward_seconds,
            nll_per_token=float(nll.mean()),
            class_accuracy=class_accuracy(dm.decode(result.tokens), classes),
        ))
        if batch >= FID_MIN_IMAGES:
            rows[-1]["fid"] = fid(classifier_features(dm.decode(result.tokens)))
        images[method] = result.tokens
    if hf:
        tokens, seconds, _ = warm.hf_generate(dm.model, prompt, height=dm.height, width=dm.width,
                                              image_token_range=dm.image_token_range, cfg_scale=cfg_scale,
                                              uncond_input_ids=settings["uncond_input_ids"], top_k=top_k, seed=seed)
        nll = nll_per_token(dm.model, tokens, prompt, image_token_range=dm.image_token_range)
        rows.append(dict(method="hf", steps=dm.height * dm.width, step_compression=1.0, per_image_compression=1.0,
                         seconds=seconds, forward_seconds=None, nll_per_token=float(nll.mean()),
                         class_accuracy=class_accuracy(dm.decode(tokens), classes)))
        if batch >= FID_MIN_IMAGES:
            rows[-1]["fid"] = fid(classifier_features(dm.decode(tokens)))
        images["hf"] = tokens
    ar_seconds = next((r["seconds"] for r in rows if r["method"] == "ar"), None)
    hf_seconds = next((r["seconds"] for r in rows if r["method"] == "hf"), None)
    for r in rows:
        r["speedup"] = ar_seconds / r["seconds"] if ar_seconds else None
        r["speedup_vs_hf"] = hf_seconds / r["seconds"] if hf_seconds else None

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid = out / "demo.png"
    save_grid(dm, images, [dm.class_names[c] for c in classes.tolist()], grid)
    payload = dict(device=device_name(dm.device), batch=batch, seed=seed, cfg_scale=cfg_scale, top_k=top_k,
                   grid=f"{dm.height}x{dm.width}", methods=rows, warm_up=warm.log)
    json_path = Path(json_file) if json_file else out / "demo.json"
    json_path.write_text(json.dumps(rows if json_file else payload, indent=2))
    print_table(rows, payload["device"])
    print(f"wrote {grid} and {json_path}")
    return rows


def save_grid(dm, images: dict, labels: list[str], path: Path, scale: int = 3) -> None:
    """One column per method, one row per image, a header with the method names."""
    from PIL import Image, ImageDraw

    methods = list(images)
    cell, pad, head = dm.to_pil(images[methods[0]][:1], scale=scale)[0].width, 4, 14
    label_w = 90
    canvas = Image.new("RGB", (label_w + len(methods) * (cell + pad), head + len(labels) * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, method in enumerate(methods):
        draw.text((label_w + j * (cell + pad) + 2, 1), method, fill="black")
        for i, img in enumerate(dm.to_pil(images[method], scale=scale)):
            canvas.paste(img, (label_w + j * (cell + pad), head + i * (cell + pad)))
    for i, label in enumerate(labels):
        draw.text((2, head + i * (cell + pad) + cell // 2 - 5), label[:14], fill="black")
    canvas.save(path)


def print_table(rows: list[dict], device: str) -> None:
    print(f"\ndevice: {device}; wall s: each method timed after an untimed warm-up of its settings and batch "
          "(pjd.timing.WarmUp)")
    cols = ["method", "steps", "step_compression", "per_image_compression", "seconds", "speedup", "speedup_vs_hf",
            "nll_per_token", "class_accuracy", "fid"]
    header = ["method", "steps", "compression", "per image", "wall s", "vs ar", "vs hf", "NLL/token", "class acc",
              "FID"]
    print(" | ".join(f"{h:>11}" for h in header))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:>11.3f}" if isinstance(v, float) else f"{'-' if v is None else v:>11}")
        print(" | ".join(cells))
    print("steps: forward passes of the batch; compression: grid tokens / steps; per image: grid tokens / the "
          "mean steps each image needed (the paper's figure); vs ar / vs hf: wall-time speed-up over pjd's ar / "
          "transformers' model.generate; class acc: the shipped classifier agrees with the requested class; "
          f"FID: '-' below {FID_MIN_IMAGES} images (--batch {FID_MIN_IMAGES}), where its small-sample bias "
          "swamps differences")


def device_name(device: torch.device) -> str:
    """The device a figure was measured on: GPU name, or CPU model, architecture and torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU ({model}, {platform.machine()}, {torch.get_num_threads()} threads)"


__all__ = ["run_demo", "save_grid", "print_table"]
