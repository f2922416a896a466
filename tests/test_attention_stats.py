"""Column statistics of a multi-token chunk (H2O's received attention, Scissorhands' below-mean counts).

Both fp32 paths (the fused C++ kernel that takes the statistics in the same pass as the output, and the
PyTorch fallback: flash output + recomputed weights) are checked against a float64 softmax computed here
from the same queries and keys; the bf16 fallback against the fp32 one.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
from filelock import FileLock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils import cpp_extension

from kvstack.cache import attention_stats as stats_module
from kvstack.cache import kernels
from kvstack.cache.attention_stats import attention_with_stats

NEEDS = {"colsum", "below_mean"}
PATHS = pytest.mark.parametrize("fused_kernel", [
    pytest.param(True, marks=pytest.mark.skipif(not kernels.available(), reason="no C++ compiler here")),
    False,
], ids=["kernel", "pytorch"])


def use_kernel(monkeypatch, fused_kernel: bool) -> None:
    if not fused_kernel:
        monkeypatch.setattr(stats_module.kernels, "available", lambda: False)


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
    monkeypatch.setenv(stats_module.STATS_PRECISION_ENV, "fp32")
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
    monkeypatch.setenv(stats_module.STATS_PRECISION_ENV, "fp32")
    exact_out, exact = attention_with_stats(query, keys, values, None, None, 0.125, needs, 0)
    monkeypatch.setenv(stats_module.STATS_PRECISION_ENV, "bf16")
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
    monkeypatch.setenv(stats_module.STATS_PRECISION_ENV, "fp8")
    with pytest.raises(ValueError, match="choose auto, fp32 or bf16"):
        stats_module.stats_precision()


@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler here")
def test_kernel_is_used_unless_bf16_statistics_are_asked_for(monkeypatch):
    query, keys, values = random_chunk(3, 1, 3, 3, 100, 64, head_dim=64)
    calls = []
    original = kernels.attention_with_column_sums
    monkeypatch.setattr(kernels, "attention_with_column_sums", lambda *a: calls.append(1) or original(*a))
    for precision, expected_calls in (("auto", 1), ("fp32", 2), ("bf16", 2)):
        monkeypatch.setenv(stats_module.STATS_PRECISION_ENV, precision)
        attention_with_stats(query, keys, values, None, None, 0.125, {"colsum"}, 0)
        assert len(calls) == expected_calls, precision
    # padding masks go to the PyTorch path
    monkeypatch.setenv(stats_module.STATS_PRECISION_ENV, "auto")
    past_valid = torch.ones(1, 3, 100, dtype=torch.bool)
    attention_with_stats(query, keys, values, None, past_valid, 0.125, {"colsum"}, 0)
    assert len(calls) == 2


needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler here")


@pytest.fixture
def published_library() -> pathlib.Path:
    """The library this session built or found (collection ran ``available()``): copied, never compiled again."""
    return kernels.build_directory() / kernels._LIBRARY


@pytest.fixture
def fresh_root(monkeypatch, tmp_path) -> pathlib.Path:
    """An empty extensions root, so a build elsewhere on the machine cannot interfere."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    return tmp_path / "extensions"


def start_loading() -> tuple[threading.Thread, list]:
    """``_module()`` uncached, in a thread: a load that waits on a lock fails the test instead of hanging it."""
    outcome: list = []

    def load() -> None:
        try:
            outcome.append(kernels._module.__wrapped__())
        except BaseException as err:  # handed to the test's thread
            outcome.append(err)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    return worker, outcome


def loaded(worker: threading.Thread, outcome: list, seconds: float):
    worker.join(seconds)
    assert outcome, f"the kernels did not load within {seconds} s"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


@needs_kernels
def test_a_published_library_loads_without_taking_the_build_lock(published_library, fresh_root):
    """Another environment holding the build lock (compiling) must not hold up one whose library exists."""
    shared = kernels.build_directory()
    shared.mkdir(parents=True)
    shutil.copy2(published_library, shared / kernels._LIBRARY)
    with FileLock(str(shared / kernels._BUILD_LOCK)):
        loaded = subprocess.run(
            [sys.executable, "-c", "from kvstack.cache import kernels; kernels._module(); print('loaded')"],
            capture_output=True, text=True, timeout=60,
        )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == "loaded"
    assert "kvstack:" not in loaded.stderr  # nothing is said when nothing is compiled


@needs_kernels
def test_a_killed_build_leaves_nothing_that_blocks_the_next(monkeypatch, capsys, published_library, fresh_root):
    """A build killed mid-way leaves its private directory (with PyTorch's ``lock`` file) and the lock file."""
    shared = kernels.build_directory()
    shared.mkdir(parents=True)
    (shared / kernels._BUILD_LOCK).touch()  # an OS lock: its file alone blocks no one
    (shared / "lock").touch()  # PyTorch's baton, as a pre-private-directory build would have left it
    dead = fresh_root / f"{shared.name}{kernels._SCRATCH}99999-x"
    dead.mkdir()
    (dead / "lock").touch()
    (dead / kernels._LIBRARY).write_bytes(b"half a library")
    builds: list[pathlib.Path] = []

    def compile_by_copying(*, name: str, build_directory: str, **kwargs):
        directory = pathlib.Path(build_directory)
        assert name == kernels._MODULE_NAME and directory.parent == fresh_root and directory != dead
        assert list(directory.iterdir()) == []  # private and fresh: no baton of a dead build to wait on
        builds.append(directory)
        shutil.copy2(published_library, directory / kernels._LIBRARY)
        return kernels._import_library(directory / kernels._LIBRARY)

    monkeypatch.setattr(cpp_extension, "load_inline", compile_by_copying)
    module = loaded(*start_loading(), 60)
    assert hasattr(module, "attention_with_column_sums") and len(builds) == 1
    assert (shared / kernels._LIBRARY).read_bytes() == published_library.read_bytes()
    assert sorted(fresh_root.iterdir()) == [shared]  # the dead build's directory and our own are gone
    said = capsys.readouterr().err
    assert "kvstack: compiling the fused C++ kernels for this CPU and torch" in said
    assert "kvstack: compiled the fused C++ kernels in" in said


@needs_kernels
def test_a_process_arriving_during_a_build_waits_for_it_then_loads_its_result(
    monkeypatch, capsys, published_library, fresh_root,
):
    monkeypatch.setattr(cpp_extension, "load_inline", lambda **kwargs: pytest.fail("compiled a second time"))
    shared = kernels.build_directory()
    shared.mkdir(parents=True)
    said = ""
    with FileLock(str(shared / kernels._BUILD_LOCK)):  # another environment is compiling
        waiter, outcome = start_loading()
        for _ in range(600):
            said += capsys.readouterr().err
            if "waiting for another process" in said:
                break
            time.sleep(0.05)
        assert "waiting for another process" in said and not outcome
        shutil.copy2(published_library, shared / kernels._LIBRARY)  # ... and publishes, then releases the lock
    assert hasattr(loaded(waiter, outcome, 60), "packed_scores")
    assert "kvstack: compiling" not in said + capsys.readouterr().err


def test_the_kernel_build_directory_is_the_same_in_every_environment(monkeypatch, tmp_path):
    """Keyed by what the library is built from, never by where python or torch's headers live."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = kernels.build_directory()
    monkeypatch.setattr(sys, "prefix", "/elsewhere/venv2")
    monkeypatch.setattr(sys, "exec_prefix", "/elsewhere/venv2")
    monkeypatch.setattr(sys, "executable", "/elsewhere/venv2/bin/python")
    monkeypatch.setenv("VIRTUAL_ENV", "/elsewhere/venv2")
    monkeypatch.setenv("PATH", "/elsewhere/venv2/bin")
    assert kernels.build_directory() == here
    monkeypatch.setattr(kernels, "_SOURCE", kernels._SOURCE + "// changed\n")
    assert kernels.build_directory() != here  # a changed kernel is a new build


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
