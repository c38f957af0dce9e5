"""The CPU decode-attention kernel (``paged_attention.c`` via ``cpu_kernel.py``).

It must equal ``scaled_dot_product_attention`` over each request's gathered KV, for grouped
and plain heads, scattered slots, lengths from 1 up, and any thread count; refuse tensors
it cannot read; and fall back to ``None`` (the torch path) when it cannot be built.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dpinfer.runner import cpu_kernel
from dpinfer.runner.cpu_kernel import DecodeKernel, load_decode_kernel


@pytest.fixture(scope="module")
def kernel() -> DecodeKernel:
    k = load_decode_kernel()
    if k is None:
        pytest.skip("no C compiler here: the CPU decode kernel is not built")
    return k


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The kernel loader's warnings (dpinfer's loggers do not propagate to the root)."""
    cpu_kernel.logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    yield caplog
    cpu_kernel.logger.removeHandler(caplog.handler)


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _case(
    seed: int, num_reqs: int, num_heads: int, num_kv: int, head_dim: int, max_len: int
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    num_slots = num_reqs * max_len + 1
    k = torch.randn(num_slots + 1, num_kv, head_dim, generator=g)
    v = torch.randn(num_slots + 1, num_kv, head_dim, generator=g)
    lens = torch.randint(1, max_len + 1, (num_reqs,), generator=g)
    lens[0] = 1  # a request that sees only its own token
    table = torch.zeros(num_reqs + 3, max_len + 5, dtype=torch.int64)
    slots = torch.randperm(num_slots, generator=g) + 1  # scattered, never slot 0
    rows = torch.randperm(num_reqs + 3, generator=g)[:num_reqs]
    at = 0
    for row, n in zip(rows.tolist(), lens.tolist(), strict=True):
        table[row, :n] = slots[at : at + n]
        at += n
    q = torch.randn(num_reqs, num_heads, head_dim, generator=g)
    return q, k, v, table, rows, lens


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
               rows: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:  # fmt: skip
    out = torch.empty_like(q)
    for b, (row, n) in enumerate(zip(rows.tolist(), lens.tolist(), strict=True)):
        slots = table[row, :n]
        kk = k.index_select(0, slots).transpose(0, 1).unsqueeze(0)
        vv = v.index_select(0, slots).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            q[b].unsqueeze(0).unsqueeze(2), kk, vv, scale=scale, enable_gqa=True
        )
        out[b] = o[0, :, 0]
    return out


@pytest.mark.parametrize(
    ("num_heads", "num_kv", "head_dim", "num_threads"),
    [(4, 2, 64, 1), (9, 3, 64, 1), (4, 4, 128, 1), (8, 1, 16, 2), (6, 2, 48, 2), (4, 2, 20, 1)],
)
def test_kernel_equals_sdpa(
    kernel: DecodeKernel, threads: None, num_heads: int, num_kv: int, head_dim: int, num_threads: int
) -> None:
    torch.set_num_threads(num_threads)
    q, k, v, table, rows, lens = _case(num_heads + head_dim, 17, num_heads, num_kv, head_dim, 300)
    scale = head_dim**-0.5 * 1.3
    out = torch.full_like(q, float("nan"))
    kernel(q, k, v, table, rows, lens, scale, out)
    torch.testing.assert_close(out, _reference(q, k, v, table, rows, lens, scale), rtol=1e-5, atol=1e-5)


def test_kernel_reads_a_bfloat16_pool(kernel: DecodeKernel) -> None:
    """A bf16 pool is widened exactly (bf16 is the top half of an fp32), so the kernel equals
    fp32 attention over the same, widened values."""
    q, k, v, table, rows, lens = _case(7, 11, 8, 2, 64, 200)
    k16, v16 = k.bfloat16(), v.bfloat16()
    out = torch.full_like(q, float("nan"))
    kernel(q, k16, v16, table, rows, lens, 0.125, out)
    expected = _reference(q, k16.float(), v16.float(), table, rows, lens, 0.125)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bfloat16"):
        kernel(q, k16, v, table, rows, lens, 0.125, out)  # mixed pool dtypes
    with pytest.raises(ValueError, match="bfloat16"):
        kernel(q, k.half(), v.half(), table, rows, lens, 0.125, out)


def test_kernel_refuses_what_it_cannot_read(kernel: DecodeKernel) -> None:
    q, k, v, table, rows, lens = _case(1, 3, 4, 2, 16, 20)
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match="float32"):
        kernel(q.double(), k, v, table, rows, lens, 1.0, out)
    with pytest.raises(ValueError, match="float32"):
        kernel(q.bfloat16(), k, v, table, rows, lens, 1.0, out)
    with pytest.raises(ValueError, match="contiguous"):
        kernel(q.transpose(0, 1), k, v, table, rows, lens, 1.0, out)
    with pytest.raises(ValueError, match="int64"):
        kernel(q, k, v, table.int(), rows, lens, 1.0, out)
    with pytest.raises(ValueError, match="rows"):
        kernel(q, k, v, table, rows[:2], lens, 1.0, out)
    with pytest.raises(ValueError, match="k/v"):
        kernel(q, k[:, :, :8].contiguous(), v[:, :, :8].contiguous(), table, rows, lens, 1.0, out)


def test_built_once_then_loaded(tmp_path: Path) -> None:
    first = load_decode_kernel.__wrapped__(str(tmp_path))
    if first is None:
        pytest.skip("no C compiler here: the CPU decode kernel is not built")
    built = list((tmp_path / "kernels").glob("*.so"))
    assert built == [first.path]
    mtime = os.stat(first.path).st_mtime_ns
    second = load_decode_kernel.__wrapped__(str(tmp_path))
    assert second is not None and second.path == first.path
    assert os.stat(first.path).st_mtime_ns == mtime, "the cached library is loaded, not rebuilt"
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [first.path.name], "no build leftovers"


def test_switched_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
    assert load_decode_kernel.__wrapped__(str(tmp_path)) is None
    assert not (tmp_path / "kernels").exists()


def test_no_compiler_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warnings: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert load_decode_kernel.__wrapped__(str(tmp_path)) is None
    assert "no C compiler" in warnings.text


def test_failed_build_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warnings: pytest.LogCaptureFixture
) -> None:
    fake = tmp_path / "bad-cc"
    fake.write_text(
        "#!/bin/sh\necho 'bad-cc 1.0'\n[ \"$1\" = --version ] && exit 0\necho 'error: nope' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    assert load_decode_kernel.__wrapped__(str(tmp_path)) is None
    assert "error: nope" in warnings.text
    assert not list((tmp_path / "kernels").glob("*.so"))


def test_unwritable_cache_falls_back(tmp_path: Path, warnings: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder would go")
    assert load_decode_kernel.__wrapped__(str(blocker)) is None
    assert "using the torch path" in warnings.text
