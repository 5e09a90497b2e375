"""Report helpers of the benchmark scripts: matplotlib charts (the optional ``bench`` extra:
``pip install -e .[bench]``; without it the scripts print their tables and skip the charts) and
regenerated blocks of docs/performance.md."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a message) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed (pip install -e .[bench]): no charts")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(bars: list[tuple[str, float]], path: Path, *, title: str, unit: str,
              colors: list[int] | None = None) -> None:
    """One horizontal bar per (label, value), value written beside it; NaN = "not measured".
    ``colors`` indexes matplotlib's colour cycle per bar (e.g. one colour per variant)."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 0.8 + 0.28 * len(bars)))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, value) in enumerate(bars):
        if value == value:
            ax.barh(i, value, color=cycle[(colors[i] if colors else 0) % len(cycle)])
            ax.annotate(f"{value:.3g} {unit}", (value, i), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7)
        else:
            ax.annotate("not measured", (0, i), xytext=(3, 0), textcoords="offset points", va="center",
                        fontsize=7, color="gray")
    ax.set_yticks(range(len(bars)), [label for label, _ in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set(title=title, xlabel=unit)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    """One line per named series of (x, y) points (markers while there are at most 60)."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, pts in series.items():
        pts = [(x, y) for x, y in pts if y == y]
        if pts:
            ax.plot(*zip(*pts), marker="o" if len(pts) <= 60 else None, ms=3, label=name)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
