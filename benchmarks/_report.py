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
