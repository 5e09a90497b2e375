"""File names of the default model's assets (``pjd/fashion/assets/``) and its shared ``meta.json``."""
from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
VQ_FILE = "vq.safetensors"             # VQTokenizer state dict, fp16
GPT_FILE = "gpt.pt"                    # LlamaGen release layout: {"model": state dict}, fp16
CLASSIFIER_FILE = "classifier.safetensors"
REF_STATS_FILE = "fid_ref_test.npz"    # mean and covariance of the test split's classifier features
META_FILE = "meta.json"                # configs and the training reports of each part


def read_meta(folder: str | Path = ASSETS) -> dict:
    path = Path(folder) / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def update_meta(folder: str | Path, **sections) -> None:
    """Replace the given top-level sections of ``meta.json`` (each training script owns one)."""
    meta = read_meta(folder)
    meta.update(sections)
    (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
