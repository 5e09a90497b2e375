"""Checkpoint loading never runs code from the file unless asked (``trust_checkpoint=True``).

A pickle can call any importable function while it is read. The payload below creates a marker
directory through ``os.mkdir`` when unpickled; every loader must refuse it with an error naming
``trust_checkpoint`` and leave no marker. The opt-in test proves the payload is live (the full
unpickler does create the marker), so the refusals are not vacuous.
"""
import argparse
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from pjd.models import load_llamagen, load_lumina_mgpt
from pjd.models.base import UntrustedCheckpointError, load_checkpoint
from pjd.models.vq import load_chameleon_vqgan, load_llamagen_vq


class Payload:
    """Unpickles as os.mkdir(marker): stands for any code an attacker's checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def malicious(path, marker, *, key="model", legacy=False):
    """A checkpoint in a release's layout whose pickle also carries the payload."""
    weight = [0.0] if legacy == "pickle" else torch.zeros(2, 2)  # a plain pickle of a tensor is refused first
    ckpt = {key: {"tok_embeddings.weight": weight}, "args": Payload(marker)}
    if legacy == "pickle":
        with open(path, "wb") as f:
            pickle.dump(ckpt, f, protocol=2)  # torch's weights-only reader refuses newer framing outright
    else:
        torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("legacy", [False, True, "pickle"], ids=["zip", "legacy-torch", "plain-pickle"])
def test_malicious_pickle_runs_nothing(tmp_path, legacy):
    marker = tmp_path / "pwned"
    gpt = malicious(tmp_path / "gpt.pt", marker, legacy=legacy)
    vqgan = malicious(tmp_path / "vqgan.ckpt", marker, key="state_dict", legacy=legacy)
    loads = {
        "gpt_checkpoint": lambda: load_llamagen(gpt, gpt_model="GPT-B", image_size=256),
        "vq_checkpoint": lambda: load_llamagen_vq(gpt, downsample=16),
        "vqgan_checkpoint": lambda: load_chameleon_vqgan(vqgan, None),
    }
    for what, load in loads.items():
        with pytest.raises(UntrustedCheckpointError, match=rf"{what} .*mkdir.*trust_checkpoint=True"):
            load()
        assert not marker.exists(), f"{what}: the checkpoint's code ran"
    (tmp_path / "lumina").mkdir()
    (tmp_path / "lumina" / "config.json").write_text("{}")
    with pytest.raises(UntrustedCheckpointError, match="vqgan_checkpoint"):
        load_lumina_mgpt(tmp_path / "lumina", vqgan_checkpoint=vqgan)
    assert not marker.exists()


def test_trust_checkpoint_is_the_only_way_in(tmp_path):
    """The opt-in reads the same file with the full unpickler (and so runs the payload: it is live)."""
    marker = tmp_path / "ran"
    path = malicious(tmp_path / "gpt.pt", marker)
    with pytest.raises(TypeError, match="trust_checkpoint"):
        load_checkpoint(path, "gpt_checkpoint", trust_checkpoint="yes")
    assert not marker.exists()
    load_checkpoint(path, "gpt_checkpoint", trust_checkpoint=True)
    assert marker.is_dir()


def test_release_layouts_load_without_trust(tmp_path):
    """What LlamaGen's trainers write (tensors, optimizer state, steps, an argparse.Namespace) and
    safetensors files load with the default; a missing file names the argument."""
    sd = {"w": torch.arange(6.0).view(2, 3)}
    args = argparse.Namespace(gpt_model="GPT-XL", lr=1e-4, ema=False, data_path=None)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]).state_dict()
    torch.save({"model": sd, "optimizer": opt, "steps": 10, "args": args}, tmp_path / "c2i.pt")
    ckpt = load_checkpoint(tmp_path / "c2i.pt", "gpt_checkpoint")
    assert torch.equal(ckpt["model"]["w"], sd["w"]) and ckpt["args"] == args
    save_file(sd, tmp_path / "model.safetensors")
    assert torch.equal(load_checkpoint(tmp_path / "model.safetensors", "gpt_checkpoint")["w"], sd["w"])
    with pytest.raises(FileNotFoundError, match="vq_checkpoint"):
        load_checkpoint(tmp_path / "nope.pt", "vq_checkpoint")
