"""Test-wide settings (one intra-op thread per test process) and the compile_on_first_call fixture.

pytest runs with -n 2 on 2-core machines; two workers each spinning two OpenMP threads make tiny
matmuls over 100x slower than one thread each.
"""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


COMPILE_SECONDS = 1000.0  # what a first call "costs" under the fixture below


@pytest.fixture
def compile_on_first_call(monkeypatch) -> float:
    """``pjd.generate`` and ``pjd.baseline.hf_generate`` as on a GPU, where the first call of each
    configuration compiles kernels: that call reports COMPILE_SECONDS as its time (later calls their
    real time) and counts as a compiled kernel variant (``pjd.timing.compiled_variants``). A
    configuration: every argument but ``seed``, ``progress`` and ``image_index``, tensors by shape,
    models by identity. A reported time below the returned COMPILE_SECONDS therefore comes from a
    call whose configuration had been warmed up."""
    import pjd
    from pjd import baseline, timing

    def config(args, kwargs):
        def desc(v):
            return ("tensor", tuple(v.shape)) if isinstance(v, torch.Tensor) else \
                ("module", id(v)) if isinstance(v, torch.nn.Module) else repr(v)
        return (tuple(desc(a) for a in args),
                tuple(sorted((k, desc(v)) for k, v in kwargs.items() if k not in ("seed", "progress", "image_index"))))

    compiled = []

    def first_call_compiles(real, report):
        seen = set()

        def wrapped(*args, **kwargs):
            out, key = real(*args, **kwargs), (real, config(args, kwargs))
            first = key not in seen
            seen.add(key)
            if first:
                compiled.append(key)
            return report(out) if first else out
        return wrapped

    def generate_report(result):
        result.wall_seconds = COMPILE_SECONDS
        return result

    monkeypatch.setattr(timing, "compiled_variants", lambda: len(compiled))
    monkeypatch.setattr(pjd, "generate", first_call_compiles(pjd.generate, generate_report))
    monkeypatch.setattr(baseline, "hf_generate",
                        first_call_compiles(baseline.hf_generate, lambda out: (out[0], COMPILE_SECONDS, out[2])))
    return COMPILE_SECONDS
