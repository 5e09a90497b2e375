"""`pjd sample`: N images of a class-conditional model, in batches, on one process or under torchrun.

Output directory (docs/distributed.md):

    run.json              the run's settings; a re-run with other settings is refused
    images/000123.png     image 123, written once (temp file + os.replace), its record in a tEXt chunk
    manifest.json         image index -> class, file, steps; the settings (rank 0, at the end)
    samples.npz           arr_0: uint8 [N, H, W, 3] in index order (the ADM / LlamaGen FID layout)
    summary.json          images, steps, wall time, step compression, per rank

How work is split: image i has class ``classes[i % len(classes)]`` and draws its randomness from
its own stream keyed by ``(seed, i)`` (pjd.rng). Images are cut into chunks of ``batch_size``
consecutive indices, chunk j goes to rank ``j % world``. A chunk is decoded as one batch, so the same
``batch_size`` gives the same batches on any number of ranks (bit-identical results); another batch
size gives the same images up to last-bit differences of the model's forward between batch shapes
(none seen in the tests; docs/distributed.md). A re-run decodes only chunks with a missing image
and writes only the missing files.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import pjd
from pjd import _checks, distributed
from pjd.models.base import adapter_for
from pjd.ops._backend import resolve_backend
from pjd.plan import METHODS, make_plan

FORMAT = 1
RUN_FILE, MANIFEST_FILE, SUMMARY_FILE, NPZ_FILE, IMAGE_DIR = (
    "run.json", "manifest.json", "summary.json", "samples.npz", "images")
PNG_KEY = "pjd"  # tEXt chunk holding an image's record


class SampleError(ValueError):
    """A bad argument or an output directory that belongs to another run."""


@dataclass
class SampleSettings:
    """What a run decodes. Everything here is part of the run's identity (run.json)."""

    num_images: int
    classes: list = field(default_factory=list)  # ints or class names; image i gets classes[i % len]
    model: str = "default"
    method: str = "pjd"
    window: int | None = None
    context: int | None = None
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    cfg_scale: float = 1.0
    reuse_threshold: float | str | None = "auto"  # as pjd.generate: 0.5 for pjd / sjd++, off elsewhere
    draft_init: str = "random"
    row_causal: bool = True
    row0_first: bool | str = "auto"  # as pjd.generate: row 0 decoded first without EOL (pjd / zipar)
    row_lead: str = "row_end"
    seed: int = 0


def load_model(name: str, device: torch.device):
    """``"default"``: the embedded default model; ``"tiny"``: a tiny random-weight model (smoke runs)."""
    if name == "default":
        from pjd.models import default

        return default(device=device)
    if name == "tiny":
        from pjd.models.tiny import TinyClassModel

        return TinyClassModel(device=device)
    raise SampleError(f"model: expected 'default' or 'tiny', got {name!r}")


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a prompts file (for a class-conditional model: class names or ids)."""
    path = Path(path)
    if not path.is_file():
        raise SampleError(f"prompts: no such file {str(path)!r}")
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise SampleError(f"prompts: {str(path)!r} holds no prompt")
    return lines


def resolve_classes(items, class_names) -> list[int]:
    """Class ids (ints or numeric strings) and class names (case-insensitive) -> ids in [0, C)."""
    lookup = {name.lower(): c for c, name in enumerate(class_names)}
    ids = []
    for item in items:
        text = str(item).strip()
        if text.lstrip("-").isdigit():
            c = int(text)
            if not 0 <= c < len(class_names):
                raise SampleError(f"classes: unknown class id {c}; expected an id in [0, {len(class_names)})")
        elif text.lower() in lookup:
            c = lookup[text.lower()]
        else:
            raise SampleError(f"classes: unknown class {text!r}; expected an id in [0, {len(class_names)}) "
                              f"or one of {', '.join(class_names)}")
        ids.append(c)
    return ids


def model_digest(model: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) of the parameters: a run directory is bound to its weights."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_identity(settings: SampleSettings, dm) -> dict:
    """The validated settings as recorded in run.json and manifest.json (no batch size, ranks, device:
    those do not change the images)."""
    if isinstance(settings.num_images, bool) or not isinstance(settings.num_images, int) or settings.num_images < 1:
        raise SampleError(f"num_images: expected an integer >= 1, got {settings.num_images!r}")
    if settings.method not in METHODS:
        raise SampleError(f"method: expected one of {METHODS}, got {settings.method!r}")
    classes = resolve_classes(settings.classes or range(len(dm.class_names)), dm.class_names)
    try:
        # pjd.generate's own checks, so that a setting it would refuse fails before run.json is written.
        _checks.check_settings(method=settings.method, height=dm.height, width=dm.width, window=settings.window,
                               context=settings.context, top_k=settings.top_k, top_p=settings.top_p,
                               temperature=settings.temperature, cfg_scale=settings.cfg_scale,
                               image_token_range=dm.image_token_range, eol_token_id=None,
                               draft_init=settings.draft_init, reuse_threshold=settings.reuse_threshold,
                               generator=None, seed=settings.seed, progress=False, row_causal=settings.row_causal)
        seed = int(settings.seed)  # checked above (pjd.rng.check_seed)
        plan = make_plan(method=settings.method, height=dm.height, width=dm.width, window=settings.window,
                         context=settings.context, top_k=settings.top_k, top_p=settings.top_p,
                         temperature=settings.temperature, cfg_scale=settings.cfg_scale,
                         image_token_range=dm.image_token_range, eol_token_id=None, draft_init=settings.draft_init,
                         reuse_threshold=settings.reuse_threshold, cache="slot",
                         vocab_size=adapter_for(dm.model).vocab_size, row_causal=settings.row_causal,
                         row0_first=settings.row0_first, row_lead=settings.row_lead)
    except (TypeError, ValueError) as e:
        raise SampleError(str(e)) from e
    return dict(
        format=FORMAT, model=settings.model, model_digest=model_digest(dm.model), height=dm.height,
        width=dm.width, num_images=settings.num_images, classes=classes, method=plan.method,
        window=plan.window, context=plan.context if plan.row_lanes else None, top_k=settings.top_k,
        top_p=float(settings.top_p), temperature=float(settings.temperature), cfg_scale=float(settings.cfg_scale),
        reuse_threshold=plan.reuse_threshold,
        draft_init=settings.draft_init if plan.window else None, row_causal=plan.row_causal, seed=seed,
        row0_first=plan.row0_first if plan.row_lanes else None, row_lead=plan.row_lead if plan.row_lanes else None,
    )


def chunks(num_images: int, batch_size: int) -> list[range]:
    """Chunk j holds image indices [j * batch_size, (j + 1) * batch_size) (the last one may be short)."""
    return [range(s, min(s + batch_size, num_images)) for s in range(0, num_images, batch_size)]


def image_path(out: Path, index: int) -> Path:
    return out / IMAGE_DIR / f"{index:06d}.png"


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then os.replace: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_png(path: Path, pixels: np.ndarray, record: dict) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(record, sort_keys=True))
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG", pnginfo=info))


def _read_png(path: Path) -> tuple[np.ndarray, dict]:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return np.asarray(img.convert("RGB")), json.loads(img.text[PNG_KEY])


def _rgb(images: torch.Tensor) -> np.ndarray:
    """uint8 ``[B, H, W]`` (grey) or ``[B, H, W, 3]`` -> uint8 ``[B, H, W, 3]`` (the npz layout FID tools read)."""
    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images[..., None].expand(*images.shape, 3)
    return images.contiguous().numpy()


def _json_text(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def _bind_directory(out: Path, identity: dict) -> str | None:
    """Rank 0: create ``out`` for this run or check it holds the same run. Returns an error or None."""
    run_file = out / RUN_FILE
    if run_file.exists():
        old = json.loads(run_file.read_text())
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} there, {identity.get(k)!r} now" for k in diff)
            return (f"out: {str(out)!r} holds another run ({shown}); pick a new directory or the same "
                    f"settings to resume")
    elif out.exists() and any(out.iterdir()):
        return f"out: {str(out)!r} is not empty and holds no {RUN_FILE}; pick a new or empty directory"
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    for stale in (out / IMAGE_DIR).glob(".*.tmp-*"):  # a temp file of a killed run (never a result)
        stale.unlink()
    if not run_file.exists():
        atomic_write(run_file, lambda tmp: tmp.write_text(_json_text(identity)))
    return None


def run_sample(settings: SampleSettings, out: str | Path, *, batch_size: int = 16, device: str = "cpu",
               backend: str = "auto", cache: str = "slot", npz: bool = True, progress: bool = True) -> dict | None:
    """Decode ``settings.num_images`` images into ``out`` (see the module docstring).

    Run once per process: as a plain process, or by every rank of ``torchrun``. Returns the summary
    on rank 0 (None on the others). Raises SampleError on bad input, before any decoding.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SampleError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if cache not in ("slot", "append"):
        raise SampleError(f"cache: expected 'slot' or 'append', got {cache!r}")
    group, dev = distributed.init(device)
    try:
        return _run(group, dev, settings, Path(out), batch_size, backend, cache, npz, progress)
    finally:
        group.close()


def _run(group, dev, settings, out, batch_size, backend, cache, npz, progress):
    t0 = time.perf_counter()
    dm = load_model(settings.model, dev)
    identity = run_identity(settings, dm)
    try:
        resolve_backend(backend, dev)
    except (ValueError, RuntimeError) as e:
        raise SampleError(str(e)) from e
    error = group.broadcast(_bind_directory(out, identity) if group.is_main else None)
    if error:
        raise SampleError(error)

    classes, n = identity["classes"], identity["num_images"]
    mine = [c for j, c in enumerate(chunks(n, batch_size)) if j % group.world == group.rank]
    todo = [c for c in mine if not all(image_path(out, i).exists() for i in c)]
    stats = dict(rank=group.rank, device=_device_name(dev), images=sum(map(len, mine)), generated=0,
                 batches=0, batch_steps=0, decode_seconds=0.0, mismatched=0)
    bar = _bar(progress, group, stats["images"], stats["images"] - sum(map(len, todo)))
    gen_kwargs = dict(height=dm.height, width=dm.width, image_token_range=dm.image_token_range, method=identity["method"],
                      window=identity["window"] or None, context=identity["context"],
                      top_k=identity["top_k"], top_p=identity["top_p"], temperature=identity["temperature"],
                      cfg_scale=identity["cfg_scale"], reuse_threshold=identity["reuse_threshold"],
                      draft_init=identity["draft_init"] or "random", row_causal=identity["row_causal"],
                      **({"row0_first": identity["row0_first"], "row_lead": identity["row_lead"]}
                         if identity["row_lead"] else {}),
                      seed=identity["seed"], cache=cache, backend=backend)
    for chunk in todo:
        index = torch.tensor(list(chunk))
        class_ids = torch.tensor([classes[i % len(classes)] for i in chunk])
        uncond = dm.null_prompt(len(chunk)) if identity["cfg_scale"] != 1.0 else None
        with torch.no_grad():
            result = pjd.generate(dm.model, dm.prompt(class_ids), uncond_input_ids=uncond, image_index=index,
                                  **gen_kwargs)
        pixels = _rgb(dm.decode(result.tokens))
        for b, i in enumerate(chunk):
            path = image_path(out, i)
            if path.exists():  # written before an interruption; decoded again only to keep the batch
                # Same batch, same settings: the same pixels, unless the device or batch size changed
                # and the model's forward is not bit-identical across them (counted, never hidden).
                stats["mismatched"] += int(not np.array_equal(_read_png(path)[0], pixels[b]))
                continue
            record = dict(index=i, class_id=int(class_ids[b]), steps=int(result.steps_per_image[b]))
            _write_png(path, pixels[b], record)
            stats["generated"] += 1
        stats["batches"] += 1
        stats["batch_steps"] += result.steps
        stats["decode_seconds"] += result.wall_seconds
        bar.update(len(chunk))
    bar.close()
    stats["wall_seconds"] = time.perf_counter() - t0
    per_rank = group.gather(stats)
    group.barrier()  # every rank's images are on disk
    if not group.is_main:
        return None
    summary = _finish(out, identity, dm, per_rank, npz, batch_size, time.perf_counter() - t0)
    print_table(summary)
    return summary


def _finish(out: Path, identity: dict, dm, per_rank: list, npz: bool, batch_size: int, wall: float) -> dict:
    """Rank 0: manifest, npz and summary from the images on disk (a shared directory under torchrun)."""
    n = identity["num_images"]
    missing = [i for i in range(n) if not image_path(out, i).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} images missing after every rank finished (first: {missing[0]}); "
                           "under torchrun the output directory must be shared by all nodes")
    pixels, records = [], []
    for i in range(n):
        arr, record = _read_png(image_path(out, i))
        pixels.append(arr)
        records.append(dict(index=i, class_id=record["class_id"], class_name=dm.class_names[record["class_id"]],
                            file=f"{IMAGE_DIR}/{i:06d}.png", steps=record["steps"]))
    atomic_write(out / MANIFEST_FILE, lambda tmp: tmp.write_text(_json_text(dict(settings=identity, images=records))))
    if npz:
        def save(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=np.stack(pixels))
        atomic_write(out / NPZ_FILE, save)
    mean_steps = sum(r["steps"] for r in records) / n
    ar_steps = identity["height"] * identity["width"]
    summary = dict(
        images=n, generated=sum(r["generated"] for r in per_rank), world_size=len(per_rank), batch_size=batch_size,
        mismatched_on_resume=sum(r["mismatched"] for r in per_rank),
        method=identity["method"], mean_steps_per_image=mean_steps, ar_steps_per_image=ar_steps,
        step_compression=ar_steps / mean_steps,
        batch_steps=sum(r["batch_steps"] for r in per_rank), wall_seconds=wall, per_rank=per_rank,
    )
    atomic_write(out / SUMMARY_FILE, lambda tmp: tmp.write_text(_json_text(summary)))
    return summary


def print_table(summary: dict) -> None:
    print(f"\n{'rank':>4} | {'device':<28} | {'images':>6} | {'decoded':>7} | {'batches':>7} | "
          f"{'steps':>7} | {'wall s':>8}")
    for r in summary["per_rank"]:
        print(f"{r['rank']:>4} | {r['device'][:28]:<28} | {r['images']:>6} | {r['generated']:>7} | "
              f"{r['batches']:>7} | {r['batch_steps']:>7} | {r['wall_seconds']:>8.2f}")
    print(f"{summary['images']} images ({summary['generated']} decoded now), {summary['method']}: "
          f"{summary['mean_steps_per_image']:.1f} steps per image vs {summary['ar_steps_per_image']} for ar "
          f"= step compression {summary['step_compression']:.2f}x; wall {summary['wall_seconds']:.1f} s "
          f"on {summary['world_size']} process(es)")
    if summary["mismatched_on_resume"]:
        print(f"warning: {summary['mismatched_on_resume']} image(s) already on disk differ from this run's decode of "
              "them (another device or batch size than the interrupted run?); the files on disk were kept")


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _bar(enabled: bool, group, total: int, done: int):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=f"rank {group.rank}", position=group.rank, unit="img",
                leave=True, dynamic_ncols=True)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


__all__ = ["SampleSettings", "SampleError", "run_sample", "resolve_classes", "read_prompts", "chunks"]


def main(args) -> int:
    """Run `pjd sample` from parsed arguments (raises SampleError on bad input)."""
    if args.prompts is not None:
        classes = read_prompts(args.prompts)
        num_images = len(classes) if args.num_images is None else args.num_images
    else:
        classes = [c for c in args.classes.split(",") if c.strip()] if args.classes else []
        if args.classes is not None and not classes:
            raise SampleError("classes: expected a comma list of class ids or names, got an empty list")
        if args.num_images is None:
            raise SampleError("num_images: --num-images is required without --prompts")
        num_images = args.num_images
    settings = SampleSettings(
        num_images=num_images, classes=classes, model=args.model, method=args.method, window=args.window,
        context=args.context, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
        cfg_scale=args.cfg_scale, reuse_threshold=args.reuse_threshold, draft_init=args.draft_init,
        row_causal=not args.no_row_causal, seed=args.seed,
        row0_first={"auto": "auto", "on": True, "off": False}[args.row0_first], row_lead=args.row_lead)
    run_sample(settings, args.out, batch_size=args.batch_size, device=args.device, backend=args.backend,
               cache=args.cache, npz=not args.no_npz, progress=not args.no_progress)
    return 0
