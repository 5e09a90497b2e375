"""Test-wide settings (one intra-op thread per test process, one Triton cache per session, the
slowest tests first) and the compile_on_first_call fixture.

pytest runs with -n 2 on 2-core machines; two workers each spinning two OpenMP threads make tiny
matmuls over 100x slower than one thread each.
"""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test of a minute or more (compiles, the interpreter, subprocesses); "
                                       "run first")


def pytest_collection_modifyitems(items):
    """Tests marked slow start first (stable order otherwise): with -n 2 they spread over both workers
    from the start and the many short tests fill the end, instead of one long test starting last and
    keeping one worker busy while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def _session_triton_cache(tmp_path_factory):
    """One Triton cache for the whole test session, shared by the xdist workers (and by any subprocess
    a test starts): a kernel variant compiled once is loaded, not compiled again, by every later test
    on either worker that launches it. It starts empty, so every variant the session checks is
    compiled in this session, never taken from an earlier run's cache (Triton keys each entry by the
    kernel's source, its specialisation, the target and Triton's version)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder; each worker's basetemp is a child of it
    cache = root / "triton-cache"
    cache.mkdir(exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(cache)


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
