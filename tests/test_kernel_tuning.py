"""Tile configs per Triton release (issue 19): which table a Triton version gets, and that the table of
our pin (3.9) is the one shipped and gated before tables per release existed. No compile: the dry-run
gate (tests/test_dryrun.py, benchmarks/kernel_report.py) checks the installed release's table."""
from __future__ import annotations

import pytest
import torch
import triton

from pjd.kernels import draft_attention, speculative_verify
from pjd.kernels._launch import tuned_for
from pjd.kernels.draft_attention import TileConfig as T


@pytest.mark.parametrize("version,release", [
    ("3.6.0", (3, 6)), ("3.6.1", (3, 6)), ("3.9.0", (3, 9)), ("3.9.0+git1a2b3c4", (3, 9)),
    ("3.7.0", (3, 6)), ("3.8.2", (3, 6)),  # between two tables: the older one
    ("3.10.0.dev20261201", (3, 9)), ("4.0.0", (3, 9)),  # newer than every table: the newest (3.10 > 3.9)
    ("3.5.1", (3, 6)), ("2.3.0", (3, 6)),  # older than every table: the oldest
])
def test_tuned_for_picks_the_release_or_the_newest_older_one(version, release):
    for tables in (draft_attention.TILE_TABLES, speculative_verify.TUNINGS):
        assert tuned_for(tables, version) == release


def test_tuned_for_rejects_a_version_it_cannot_read():
    with pytest.raises(ValueError, match="'main'"):
        tuned_for(draft_attention.TILE_TABLES, "main")


def test_triton_39_tables_are_the_configs_shipped_before_tables_per_release():
    table = draft_attention.TILE_TABLES[(3, 9)]
    assert table.configs == {
        (16, 2): T(64, 64, 4, 3), (32, 2): T(64, 64, 4, 3), (64, 2): T(64, 64, 4, 3),
        (128, 2): T(64, 64, 8, 3), (256, 2): T(32, 32, 8, 2),
        (16, 4): T(32, 32, 4, 2), (32, 4): T(32, 32, 4, 3), (64, 4): T(32, 32, 4, 2),
        (128, 4): T(32, 32, 8, 2), (256, 4): T(16, 16, 4, 2),
    }
    assert table.ragged == {(128, 2): T(32, 64, 8, 3), (256, 2): T(32, 16, 8, 2), (256, 4): T(16, 16, 8, 2)}
    # Shipped as one entry per CONTINUATION value; the coupled variants (COUPLED=True) had the same warps.
    assert speculative_verify.TUNINGS[(3, 9)] == ((1024, 256), {
        "target_probs": 4, "accept": 8, "next_drafts": 4, "next_drafts_coupled": 4,
        "next_drafts_continuation": 8, "next_drafts_continuation_coupled": 8})


def test_the_installed_triton_gets_its_table():
    release = tuned_for(draft_attention.TILE_TABLES, triton.__version__)
    assert draft_attention.TILES is draft_attention.TILE_TABLES[release]
    assert (speculative_verify.GPU_TILES, speculative_verify.NUM_WARPS) == speculative_verify.TUNINGS[release]


@pytest.mark.parametrize("release", sorted(draft_attention.TILE_TABLES))
def test_tile_config_reads_the_selected_table_for_every_head_dim(release, monkeypatch):
    table = draft_attention.TILE_TABLES[release]
    monkeypatch.setattr(draft_attention, "TILES", table)
    for dtype, size in ((torch.float16, 2), (torch.bfloat16, 2), (torch.float32, 4)):
        for head_dim in range(1, draft_attention.MAX_HEAD_DIM + 1):
            key = (draft_attention.block_d(head_dim), size)
            ragged = head_dim != key[0] and key in table.ragged
            assert draft_attention.tile_config(head_dim, dtype) == (table.ragged if ragged else table.configs)[key]
    for config in (*table.configs.values(), *table.ragged.values()):  # tl.dot needs tiles of 16 and up
        assert config.block_m >= 16 and config.block_n >= 16 and config.num_warps in (1, 2, 4, 8, 16)


class _Launches:
    """Stands in for a Triton kernel: records the warps of each launch (nothing compiles or runs)."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, num_warps, **kwargs: self.calls.append((self.name, num_warps))


@pytest.mark.parametrize("continuation,coupled,key", [
    (False, False, "next_drafts"), (False, True, "next_drafts_coupled"),
    (True, False, "next_drafts_continuation"), (True, True, "next_drafts_continuation_coupled"),
])
def test_each_verification_launch_takes_its_own_warps(continuation, coupled, key, monkeypatch):
    names = speculative_verify.TUNINGS[(3, 9)].num_warps
    warps = {name: 2 ** i for i, name in enumerate(names)}  # a distinct count per entry
    monkeypatch.setattr(speculative_verify, "NUM_WARPS", warps)
    calls = []
    for kernel in ("_target_probs_kernel", "_accept_kernel", "_next_drafts_kernel"):
        monkeypatch.setattr(speculative_verify, kernel, _Launches(kernel, calls))
    B, L, W, V = 1, 1, 3, 16
    lanes = [torch.tensor([[v]], dtype=torch.int32) for v in (0, W, 0, 0, 8)]  # start, drafts, rule, slot, room
    noise = torch.rand(B, L, W + 1, V) if coupled else None
    speculative_verify.speculative_verify_triton(
        torch.randn(B, W + 1, V), *lanes, torch.zeros(B, L, W, dtype=torch.long), torch.full((B, L, W, V), 1 / V),
        torch.rand(B, L, W), torch.rand(B, L, W + 1), torch.zeros(B, L, W, dtype=torch.long),
        1.0, (0, V), 1.0, 0, 1.0, -1.0, "random", -1, 8, 4, continuation=continuation, coupled_noise=noise)
    assert calls == [("_target_probs_kernel", warps["target_probs"]), ("_accept_kernel", warps["accept"]),
                     ("_next_drafts_kernel", warps[key])]
