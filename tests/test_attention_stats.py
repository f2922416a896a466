"""Column statistics of a multi-token chunk (H2O's received attention, Scissorhands' below-mean counts).

Both fp32 paths (the fused C++ kernel that takes the statistics in the same pass as the output, and the
PyTorch fallback: flash output + recomputed weights) are checked against a float64 softmax computed here
from the same queries and keys; the bf16 fallback against the fp32 one.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstack.cache import kernels
from kvstack.cache import layer as layer_module
from kvstack.cache.layer import attention_with_stats

NEEDS = {"colsum", "below_mean"}
PATHS = pytest.mark.parametrize("fused_kernel", [
    pytest.param(True, marks=pytest.mark.skipif(not kernels.available(), reason="no C++ compiler here")),
    False,
], ids=["kernel", "pytorch"])


def use_kernel(monkeypatch, fused_kernel: bool) -> None:
    if not fused_kernel:
        monkeypatch.setattr(layer_module.kernels, "available", lambda: False)


def reference(query, keys, values, past, q_len, scaling):
    """float64 softmax attention with a causal tail: output ``[B, q, Hq, D]``, colsum, below-mean, seen."""
    batch, num_q_heads = query.shape[:2]
    heads = keys.shape[1]
    group = num_q_heads // heads
    length = past + q_len
    mask = torch.ones(q_len, length, dtype=torch.bool)
    mask[:, past:] = torch.ones(q_len, q_len, dtype=torch.bool).tril()
    logits = query.double() @ keys.double().repeat_interleave(group, 1).transpose(-1, -2) * scaling
    weights = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    output = (weights @ values.double().repeat_interleave(group, 1)).transpose(1, 2)
    grouped = weights.view(batch, heads, group, q_len, length)
    count = mask.sum(-1).view(1, 1, 1, q_len, 1)
    below = ((grouped < 1.0 / count) & mask).sum(dim=(2, 3)).double()
    seen = (mask.sum(0) * group).double().expand(batch, heads, length)
    return output, grouped.sum(dim=(2, 3)), below, seen


def random_chunk(seed, batch, heads, group, past, q_len, head_dim=16, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads * group, q_len, head_dim, generator=generator) * scale
    keys = torch.randn(batch, heads, past + q_len, head_dim, generator=generator) * scale
    values = torch.randn(batch, heads, past + q_len, head_dim, generator=generator)
    return query, keys, values


@PATHS
@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # the env value is the same for every input
@given(
    seed=st.integers(0, 10_000), batch=st.integers(1, 2), heads=st.integers(1, 3), group=st.sampled_from([1, 3]),
    past=st.integers(0, 300), q_len=st.integers(1, 300),
)
def test_column_statistics_equal_a_float64_softmax(monkeypatch, fused_kernel, seed, batch, heads, group, past, q_len):
    use_kernel(monkeypatch, fused_kernel)
    monkeypatch.setenv(layer_module.STATS_PRECISION_ENV, "fp32")
    query, keys, values = random_chunk(seed, batch, heads, group, past, q_len)
    output, stats = attention_with_stats(query, keys, values, None, None, 0.25, NEEDS, 0)
    ref_out, ref_col, ref_below, ref_seen = reference(query, keys, values, past, q_len, 0.25)
    torch.testing.assert_close(output.double(), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stats.colsum.double(), ref_col, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stats.queries_seen.double(), ref_seen)
    # Below-mean counts may differ only where a weight sits on the threshold within rounding.
    assert (stats.below_mean.double() - ref_below).abs().max() <= 2


@pytest.mark.parametrize("needs", [NEEDS, {"colsum"}], ids=["blockwise", "transposed-flash"])
@pytest.mark.parametrize("past, q_len", [(0, 512), (1024, 512)])
def test_bf16_statistics_track_fp32_and_leave_the_output_exact(monkeypatch, past, q_len, needs):
    use_kernel(monkeypatch, False)  # bf16 applies to the PyTorch fallback; the kernel is exact in fp32
    query, keys, values = random_chunk(7, 1, 3, 3, past, q_len, head_dim=64)
    monkeypatch.setenv(layer_module.STATS_PRECISION_ENV, "fp32")
    exact_out, exact = attention_with_stats(query, keys, values, None, None, 0.125, needs, 0)
    monkeypatch.setenv(layer_module.STATS_PRECISION_ENV, "bf16")
    out, approx = attention_with_stats(query, keys, values, None, None, 0.125, needs, 0)
    assert torch.equal(out, exact_out)  # the attention output never depends on the statistics' precision
    if "below_mean" in needs:
        assert torch.equal(approx.queries_seen, exact.queries_seen)
    heavy = exact.colsum > exact.colsum.mean()  # the entries an eviction decision is about
    relative = ((approx.colsum - exact.colsum).abs() / exact.colsum)[heavy]
    assert relative.mean() < 0.005 and relative.max() < 0.03, (relative.mean(), relative.max())
    budget = exact.colsum.shape[-1] // 4
    top_exact = set(exact.colsum[0, 0].topk(budget).indices.tolist())
    top_approx = set(approx.colsum[0, 0].topk(budget).indices.tolist())
    assert len(top_exact & top_approx) >= 0.95 * budget


def test_stats_precision_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv(layer_module.STATS_PRECISION_ENV, "fp8")
    with pytest.raises(ValueError, match="choose auto, fp32 or bf16"):
        layer_module.stats_precision()


@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler here")
def test_kernel_is_used_unless_bf16_statistics_are_asked_for(monkeypatch):
    query, keys, values = random_chunk(3, 1, 3, 3, 100, 64, head_dim=64)
    calls = []
    original = kernels.attention_with_column_sums
    monkeypatch.setattr(kernels, "attention_with_column_sums", lambda *a: calls.append(1) or original(*a))
    for precision, expected_calls in (("auto", 1), ("fp32", 2), ("bf16", 2)):
        monkeypatch.setenv(layer_module.STATS_PRECISION_ENV, precision)
        attention_with_stats(query, keys, values, None, None, 0.125, {"colsum"}, 0)
        assert len(calls) == expected_calls, precision
    # padding masks go to the PyTorch path
    monkeypatch.setenv(layer_module.STATS_PRECISION_ENV, "auto")
    past_valid = torch.ones(1, 3, 100, dtype=torch.bool)
    attention_with_stats(query, keys, values, None, past_valid, 0.125, {"colsum"}, 0)
    assert len(calls) == 2


@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler here")
def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_load():
    """PyTorch's build ``lock`` file outlives a build killed mid-way; the next process must clear it."""
    import subprocess
    import sys

    stale = kernels.build_directory() / "lock"
    stale.touch()
    loaded = subprocess.run(
        [sys.executable, "-c", "from kvstack.cache import kernels; kernels._module(); print('loaded')"],
        capture_output=True, text=True, timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == "loaded"
    assert not stale.exists()


def test_the_kernel_build_directory_is_keyed_by_the_cpu(monkeypatch, tmp_path):
    """A ``-march=native`` build made on one CPU model must not be found by another sharing the directory."""
    import io

    cpus = {"a": "model name\t: CPU A\nflags\t\t: sse avx2\n\n", "b": "model name\t: CPU B\nflags\t\t: sse avx512f\n\n"}

    def directory_on(cpu: str):
        def fake_open(path, *args, **kwargs):
            assert str(path) == "/proc/cpuinfo"
            return io.StringIO(cpus[cpu])

        monkeypatch.setattr(kernels, "open", fake_open, raising=False)  # shadows the builtin in kernels only
        return kernels.build_directory()

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    on_a, on_b = directory_on("a"), directory_on("b")
    assert on_a != on_b
    assert on_a == directory_on("a")
    assert on_a.parent == tmp_path and torch.__version__ in on_a.name
