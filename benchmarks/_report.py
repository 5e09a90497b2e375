"""Report helpers of the benchmark scripts: PIL bar charts (pillow is a pjd dependency, matplotlib
is not) and regenerated blocks of docs/performance.md."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def bar_chart(bars: list[tuple[str, float]], path: Path, *, title: str, unit: str,
              colors: list[int] | None = None) -> None:
    """One bar per (label, value); `colors` indexes PALETTE per bar (e.g. one colour per variant)."""
    font = ImageFont.load_default()
    row_h, label_w, bar_w, pad = 18, max(8 * max((len(b[0]) for b in bars), default=1), 80), 420, 10
    width, height = label_w + bar_w + 110, 40 + row_h * len(bars) + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), title, fill="black", font=font)
    top = max((v for _, v in bars if v == v), default=1.0) or 1.0  # skip NaN (not measured)
    for i, (label, value) in enumerate(bars):
        y = 34 + i * row_h
        draw.text((pad, y + 2), label, fill="black", font=font)
        color = PALETTE[(colors[i] if colors else 0) % len(PALETTE)]
        if value == value:
            draw.rectangle([label_w, y, label_w + int(bar_w * value / top), y + row_h - 4], fill=color)
            draw.text((label_w + int(bar_w * value / top) + 4, y + 2), f"{value:.3g} {unit}",
                      fill="black", font=font)
        else:
            draw.text((label_w, y + 2), "not measured", fill="gray", font=font)
    img.save(path)


DOCS = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def update_docs(block_name: str, text: str, path: Path = DOCS) -> None:
    """Replace the text between `<!-- {block_name}:begin/end -->` (append the block if absent)."""
    begin, end = f"<!-- {block_name}:begin -->", f"<!-- {block_name}:end -->"
    block = f"{begin}\n{text}{end}"
    doc = path.read_text() if path.exists() else ""
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc += f"\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)


def line_chart(series: dict[str, list[tuple[float, float]]], path: Path, *, title: str, xlabel: str,
               ylabel: str, log_x: bool = False) -> None:
    """One polyline with markers per named series of (x, y) points, axes with min/max ticks."""
    import math

    font = ImageFont.load_default()
    width, height, left, right, top, bottom = 560, 350, 60, 130, 40, 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 4), title, fill="black", font=font)
    points = [p for pts in series.values() for p in pts if p[1] == p[1]]
    fx = (lambda x: math.log2(x)) if log_x else (lambda x: x)
    xs, ys = [fx(p[0]) for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), max(ys) * 1.08 or 1.0
    x1 = x1 if x1 > x0 else x0 + 1

    def to_px(x, y):
        return (left + (fx(x) - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    ticks = sorted({p[0] for p in points})
    if len(ticks) > 8:  # label a few evenly spaced values, not every point
        ticks = [ticks[round(i * (len(ticks) - 1) / 7)] for i in range(8)]
    for value in ticks:
        px, _ = to_px(value, y0)
        draw.text((px - 6, height - bottom + 4), f"{value:g}", fill="black", font=font)
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        _, py = to_px(x0 if not log_x else 2 ** x0, y)
        draw.text((4, py - 6), f"{y:.3g}", fill="black", font=font)
    draw.text((left + 150, height - 16), xlabel, fill="black", font=font)
    draw.text((4, top - 16), ylabel, fill="black", font=font)
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        pix = [to_px(x, y) for x, y in pts if y == y]
        if len(pix) > 1:
            draw.line(pix, fill=color, width=2)
        for px, py in pix if len(pix) <= 60 else ():  # markers only where they stay readable
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        draw.text((width - right + 10, top + 14 * i), name, fill=color, font=font)
    img.save(path)
