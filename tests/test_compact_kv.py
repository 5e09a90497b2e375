"""pjd.ops.compact_kv: every implementation equals the contract written as a per-sample Python loop."""
import subprocess
import sys
import warnings

import pytest
import torch

from pjd.ops import compact_kv, compact_kv_backend
from pjd.ops.compact_kv import _native_unavailable

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def loop_reference(caches, keep, tail_start, dst_start, meta):
    """The contract, literally: for each sample, the i-th kept tail entry goes to dst_start[b] + i."""
    old = [x.clone() for x in caches]
    old_meta = [m.clone() for m in meta]
    caches = [x.clone() for x in caches]
    meta = [m.clone() for m in meta]
    new_lengths = []
    for b in range(keep.shape[0]):
        i = 0
        for t in range(keep.shape[1]):
            if keep[b, t]:
                dst, src = int(dst_start[b]) + i, tail_start + t
                for x, x_old in zip(caches, old):
                    x[b, :, dst] = x_old[b, :, src]
                for m, m_old in zip(meta, old_meta):
                    m[b, dst] = m_old[b, src]
                i += 1
        new_lengths.append(int(dst_start[b]) + i)
    return caches, meta, torch.tensor(new_lengths, dtype=torch.int32)


def random_case(B, H, S, D, T, tail_start, dst_mode, layers, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        caches = [torch.randn(B, H, S, D, generator=g).to(dtype) for _ in range(2 * layers)]
    else:
        caches = [torch.randint(-100, 100, (B, H, S, D), generator=g).to(dtype) for _ in range(2 * layers)]
    # Per-sample keep rate: some samples keep nothing, some everything, the rest are ragged.
    rates = torch.tensor([0.0, 1.0, 0.5, 0.3, 0.8])[torch.randperm(5, generator=g)[:B]]
    keep = torch.rand(B, T, generator=g) < rates[:, None]
    if dst_mode == "equal":  # nothing rejected before the tail: kept entries stay or shift inside it
        dst = torch.full((B,), tail_start)
    elif dst_mode == "near":  # overlapping source and destination ranges
        dst = (tail_start - torch.randint(0, 4, (B,), generator=g)).clamp(min=0)
    else:  # "far": the kept entries move a long way down
        dst = torch.randint(0, max(1, tail_start // 3), (B,), generator=g)
    positions = torch.randint(0, 10_000, (B, S), generator=g, dtype=torch.int32)
    groups = torch.randint(-2, 8, (B, S), generator=g, dtype=torch.int32)
    wide = torch.randint(-(2**40), 2**40, (B, S), generator=g, dtype=torch.int64)
    move = lambda t: t.to(device)  # noqa: E731
    return ([move(x) for x in caches], move(keep), tail_start, move(dst.to(torch.int32)),
            [move(positions), move(groups), move(wide)])


CASES = [  # B, H, S, D, T, tail_start, dst_mode, layers
    (1, 1, 8, 1, 3, 5, "equal", 1),
    (2, 4, 40, 16, 10, 25, "near", 2),
    (3, 2, 67, 7, 13, 50, "far", 3),
    (3, 5, 140, 128, 60, 70, "near", 2),  # big enough for the CPU op to split across threads
    (2, 3, 30, 3, 30, 0, "equal", 1),  # the whole cache is the tail
    (2, 2, 16, 8, 0, 9, "far", 1),  # empty tail
    (3, 1, 300, 5, 101, 199, "far", 2),  # tail ends at S; rows of 5 elements (unaligned)
    (2, 1, 12, 4, 5, 6, "near", 121),  # 245 tensors: more than one CUDA launch takes (240)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}H{c[1]}S{c[2]}D{c[3]}T{c[4]}-{c[6]}" for c in CASES])
def test_matches_loop_reference(case, dtype, backend, device):
    caches, keep, tail_start, dst_start, meta = random_case(*case, dtype, device, seed=CASES.index(case))
    want_caches, want_meta, want_lengths = loop_reference(caches, keep, tail_start, dst_start, meta)
    keep_before, dst_before = keep.clone(), dst_start.clone()

    new_lengths = compact_kv(caches, keep, tail_start, dst_start, meta=meta, backend=backend)

    assert new_lengths.dtype == torch.int32 and new_lengths.device == caches[0].device
    assert torch.equal(new_lengths.cpu(), want_lengths)
    for i, (got, want) in enumerate(zip(caches + meta, want_caches + want_meta)):
        assert torch.equal(got, want), f"tensor {i} differs from the loop reference"
    assert torch.equal(keep, keep_before) and torch.equal(dst_start, dst_before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay():
    """The CUDA op captured in a CUDA graph compacts what the tensors hold at replay time: the graph
    reads nothing from host memory (the descriptors are kernel parameters)."""
    static = random_case(2, 4, 40, 16, 10, 25, "near", 2, torch.float16, "cuda", seed=20)
    caches, keep, tail_start, dst_start, meta = static
    compact_kv(caches, keep, tail_start, dst_start, meta=meta, backend="native")  # loads the kernel
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        new_lengths = compact_kv(caches, keep, tail_start, dst_start, meta=meta, backend="native")
    for seed in (21, 22):
        fresh = random_case(2, 4, 40, 16, 10, 25, "near", 2, torch.float16, "cuda", seed=seed)
        for x, y in zip([*caches, keep, dst_start, *meta], [*fresh[0], fresh[1], fresh[3], *fresh[4]]):
            x.copy_(y)
        want_caches, want_meta, want_lengths = loop_reference(caches, keep, tail_start, dst_start, meta)
        graph.replay()
        assert torch.equal(new_lengths.cpu(), want_lengths)
        for i, (got, want) in enumerate(zip(caches + meta, want_caches + want_meta)):
            assert torch.equal(got, want), f"replay with seed {seed}: tensor {i} differs from the loop reference"


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float64], ids=str)
def test_other_element_sizes(dtype, backend):
    caches, keep, tail_start, dst_start, meta = random_case(2, 3, 50, 5, 17, 30, "near", 2, dtype, "cpu", 7)
    want_caches, want_meta, want_lengths = loop_reference(caches, keep, tail_start, dst_start, meta)
    new_lengths = compact_kv(caches, keep, tail_start, dst_start, meta=meta, backend=backend)
    assert torch.equal(new_lengths, want_lengths)
    assert all(torch.equal(got, want) for got, want in zip(caches + meta, want_caches + want_meta))


def test_cpu_extension_is_built():
    # The install builds pjd._C; if this fails, see the "pjd: building the optional extension" warning.
    assert compact_kv_backend(torch.device("cpu")) == "cpp", _native_unavailable(torch.device("cpu"))
    assert compact_kv_backend("cpu") == "cpp"


def test_backend_report_without_native_device():
    assert compact_kv_backend("meta") == "torch"
    if not torch.cuda.is_available():
        assert compact_kv_backend("cuda") == "torch"


def test_backend_report_with_cuda_extension_but_no_driver(monkeypatch):
    """A CUDA build of torch (pjd._C_cuda built) on a machine without a driver: the torch fallback is
    reported, and native names the reason, instead of torch.cuda raising "Found no NVIDIA driver"."""
    from pjd.ops.compact_kv import _use_native

    module = sys.modules["pjd.ops.compact_kv"]

    def no_driver(*args):
        raise RuntimeError("Found no NVIDIA driver on your system")

    monkeypatch.setattr(module, "_extension_unavailable", lambda device_type: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", no_driver)
    monkeypatch.setattr(module, "_no_kernel_image", no_driver)
    assert compact_kv_backend("cuda") == "torch"
    assert compact_kv_backend("cuda:1") == "torch"
    with pytest.raises(RuntimeError, match=r"backend='native': no CUDA device is available"):
        _use_native("native", torch.device("cuda"))


class _FakeCudaExtension:
    """pjd._C_cuda as its binary answers on a GPU of ``capability`` (sm_80 / sm_90 SASS, compute_90 PTX)."""

    def __init__(self, capability):
        self.capability, self.asked = capability, []

    def kernel_image_error(self, index):
        self.asked.append(index)
        if self.capability >= (8, 0):
            return None
        return "cudaErrorNoKernelImageForDevice: no kernel image is available for execution on the device"


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(name, capability) -> the fake pjd._C_cuda: CUDA device 0 (current) and 1, CUDA op built."""
    module = sys.modules["pjd.ops.compact_kv"]  # pjd.ops.compact_kv is also the name of the function

    def make(name, capability):
        extension = _FakeCudaExtension(capability)
        monkeypatch.setattr(module, "_extension_unavailable", lambda device_type: None)
        monkeypatch.setitem(sys.modules, "pjd._C_cuda", extension)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: name)
        return extension

    caches = (module._no_kernel_image, module._warn_fallback)
    for cache in caches:
        cache.cache_clear()
    yield make
    for cache in caches:
        cache.cache_clear()


def test_cuda_op_falls_back_where_it_has_no_kernel_image(fake_gpu):
    """A T4 (7.5) is older than the gencode list: auto warns once and runs torch, native raises."""
    from pjd.ops.compact_kv import _use_native

    extension = fake_gpu("Tesla T4", (7, 5))
    assert compact_kv_backend("cuda") == "torch"
    assert extension.asked == [0]  # the current device
    with pytest.warns(RuntimeWarning, match=r"fallback because pjd._C_cuda has no kernel image for cuda:1 "
                                            r"\(Tesla T4, compute capability 7.5\): cudaErrorNoKernelImageForDevice"):
        assert not _use_native("auto", torch.device("cuda", 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device
        assert not _use_native("auto", torch.device("cuda", 1))
        assert not _use_native("torch", torch.device("cuda", 1))
    with pytest.raises(RuntimeError, match=r"backend='native': .*cuda:1 \(Tesla T4, compute capability 7.5\)"):
        _use_native("native", torch.device("cuda", 1))
    assert extension.asked == [0, 1]  # asked once per device


def test_cuda_op_runs_where_it_has_a_kernel_image(fake_gpu):
    from pjd.ops.compact_kv import _use_native

    fake_gpu("NVIDIA H100", (9, 0))
    assert compact_kv_backend("cuda:0") == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _use_native("auto", torch.device("cuda", 0)) and _use_native("native", torch.device("cuda", 0))
        assert not _use_native("torch", torch.device("cuda", 0))


def _strided(t):
    """t's values in every other element of a buffer twice its size (non-contiguous)."""
    return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]


OPCHECK_INPUTS = {  # edits of (caches, keep, tail_start, dst_start, meta) that the ops accept
    "contiguous": lambda a: a,
    "strided_keep_and_dst_start": lambda a: (a[0], _strided(a[1]), a[2], _strided(a[3]), a[4]),
    "transposed_keep": lambda a: (a[0], a[1].t().contiguous().t(), *a[2:]),
    "int64_dst_start": lambda a: (*a[:3], a[3].long(), a[4]),  # the fallback's schema takes it; the C++ op refuses
}
OPCHECK_CASES = [(op, inputs) for op in ("pjd::compact_kv", "pjd::compact_kv_torch") for inputs in OPCHECK_INPUTS
                 if (op, inputs) != ("pjd::compact_kv", "int64_dst_start")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,inputs", OPCHECK_CASES)
def test_opcheck(op, inputs, dtype):
    """Schema (in-place mutation of caches and meta only), fake kernel (contiguous int32 [B]), AOT dispatch."""
    if op == "pjd::compact_kv" and compact_kv_backend("cpu") != "cpp":  # also loads pjd._C and its fake kernel
        pytest.skip("the C++ op is not built (test_cpu_extension_is_built fails)")
    args = OPCHECK_INPUTS[inputs](random_case(2, 2, 20, 4, 6, 12, "near", 1, dtype, "cpu", 3))
    packet = getattr(torch.ops.pjd, op.split("::")[1])
    new_lengths = packet(*[[x.clone() for x in a] if isinstance(a, list) else a for a in args])
    assert new_lengths.dtype == torch.int32 and new_lengths.shape == (2,) and new_lengths.is_contiguous()
    torch.library.opcheck(packet.default, args)


def _valid():
    return random_case(2, 2, 20, 4, 6, 12, "near", 1, torch.float32, "cpu", 5)


def _set(i, value):
    def edit(args):
        args = list(args)
        args[i] = value(args) if callable(value) else value
        return args
    return edit


def _set_cache(j, value):
    return _set(0, lambda a: [value(x) if k == j else x for k, x in enumerate(a[0])])


BAD_INPUTS = [  # edit of (caches, keep, tail_start, dst_start, meta), error, message
    (_set(0, lambda a: a[0][0]), TypeError, "caches must be a list"),
    (_set(0, []), ValueError, "caches must hold at least one"),
    (_set(0, lambda a: [a[0][0], "k"]), TypeError, r"caches\[1\] must be a torch.Tensor"),
    (_set_cache(0, lambda x: x[0]), ValueError, r"caches\[0\] must be \[B, H, S, D\]"),
    (_set_cache(0, lambda x: x[:, :0]), ValueError, r"caches\[0\] must be \[B, H, S, D\] with H, D >= 1"),
    (_set_cache(1, lambda x: x[:, :, :-1]), ValueError, r"caches\[1\] has shape"),
    (_set_cache(1, lambda x: x.half()), TypeError, r"caches\[1\] is torch.float16"),
    (_set_cache(1, lambda x: x.transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
     r"caches\[1\] must be contiguous"),
    (_set(1, lambda a: a[1].to(torch.uint8)), TypeError, "keep must be bool"),
    (_set(1, lambda a: a[1][:1]), ValueError, r"keep must be \[B=2, T\]"),
    (_set(1, lambda a: a[1].to("meta")), ValueError, "keep is on meta"),
    (_set(2, 12.0), TypeError, "tail_start must be a python int"),
    (_set(2, torch.tensor(12)), TypeError, "tail_start must be a python int"),
    (_set(2, 15), ValueError, "tail_start \\+ T <= S"),
    (_set(2, -1), ValueError, "0 <= tail_start"),
    (_set(3, lambda a: a[3].long()), TypeError, "dst_start must be int32"),
    (_set(3, lambda a: a[3][:1]), ValueError, r"dst_start must be \[B=2\]"),
    (_set(3, torch.tensor([12, 13], dtype=torch.int32)), ValueError, r"dst_start must lie in \[0, tail_start=12\]"),
    (_set(3, torch.tensor([-1, 3], dtype=torch.int32)), ValueError, r"dst_start must lie in"),
    (_set(4, lambda a: a[4][0]), TypeError, "meta must be a list"),
    (_set(4, lambda a: [a[4][0][:, :-1]]), ValueError, r"meta\[0\] must be \[B=2, S=20\]"),
    (_set(4, lambda a: [a[4][0], a[4][1].t().contiguous().t()]), ValueError, r"meta\[1\] must be contiguous"),
]


@pytest.mark.parametrize("backend", ["auto", "native", "torch"])
@pytest.mark.parametrize("edit,error,message", BAD_INPUTS)
def test_bad_inputs(edit, error, message, backend):
    args = edit(_valid())
    with pytest.raises(error, match=message):
        compact_kv(*args[:4], meta=args[4], backend=backend)


def test_bad_backend():
    caches, keep, tail_start, dst_start, meta = _valid()
    with pytest.raises(ValueError, match="backend must be one of"):
        compact_kv(caches, keep, tail_start, dst_start, meta=meta, backend="triton")


@pytest.mark.parametrize("edit,message", [
    (_set_cache(1, lambda x: x.transpose(1, 2).contiguous().transpose(1, 2)), r"caches\[1\] must be contiguous"),
    (_set(3, torch.tensor([3, 13], dtype=torch.int32)), r"dst_start\[1\] = 13 is outside \[0, tail_start=12\]"),
    (_set(2, 15), "tail_start \\+ T <= S"),
])
def test_cpp_op_checks_its_arguments(edit, message):
    """Direct torch.ops calls skip the Python wrapper; the C++ op must still refuse bad input."""
    compact_kv_backend("cpu")
    with pytest.raises(ValueError, match=message):
        torch.ops.pjd.compact_kv(*edit(_valid()))


def test_works_without_the_extension():
    """pjd imports and compacts through the torch fallback when pjd._C cannot be imported."""
    code = """
import sys
sys.modules["pjd._C"] = None  # any `import pjd._C` now raises ImportError
import torch, pjd
assert pjd.ops.compact_kv_backend("cpu") == "torch"
caches = [torch.arange(24.0).reshape(1, 1, 8, 3)]
keep = torch.tensor([[True, False, True]])
n = pjd.ops.compact_kv(caches, keep, 5, torch.tensor([4], dtype=torch.int32))
assert n.tolist() == [6], n
assert caches[0][0, 0, 4:6, 0].tolist() == [15.0, 21.0], caches[0]
try:
    pjd.ops.compact_kv(caches, keep, 5, torch.tensor([4], dtype=torch.int32), backend="native")
except RuntimeError as err:
    assert "not available" in str(err), err
else:
    raise AssertionError("backend='native' must fail without the extension")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
