"""Test set-up: 8 patient host devices for sharding tests, and the shared-fixture resolver.

Fixtures live in `../shared/fixtures` beside the checkout; `LEFFA_SHARED` points elsewhere.
Under `CI=true` a missing fixture fails the test; elsewhere it skips.
"""

import contextlib
import os
import pathlib

# 8 host devices for the sharding tests; CPU collectives wait up to 10 min (default 40 s) for
# all 8 device threads, which a loaded 2-core machine can starve for longer than 40 s; XLA's
# backend optimisation level 0: the suite is mostly compilation of tiny models, and this cuts it
# by about a quarter (measured: tests/test_magic_clothing.py 69 s -> 53 s, every parity within
# its tolerance either way). Flags already in XLA_FLAGS win; subprocesses (the SIGKILL/resume
# tests) inherit the variable.
_FLAGS = {"xla_force_host_platform_device_count": "8",
          "xla_cpu_collective_call_terminate_timeout_seconds": "600",
          "xla_cpu_collective_call_warn_stuck_timeout_seconds": "120",
          "xla_backend_optimization_level": "0"}
_given = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_given] * bool(_given) + [
    f"--{k}={v}" for k, v in _FLAGS.items() if f"--{k}=" not in _given])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("LEFFA_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> pathlib.Path:
    """Path under the shared folder; fails under CI=true if missing, else skips the test."""
    p = shared_dir().joinpath(*parts)
    if not p.exists():
        msg = f"shared fixture missing: {p} (set LEFFA_SHARED to the folder holding fixtures/ and configs/)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return p


@pytest.fixture
def official_fixture():
    """official_fixture('sd15_tiny', 'unet_fwd.npz') -> Path."""
    return lambda *parts: shared_path("fixtures", "leffa_official", *parts)


def require_module(name: str, hint: str = "make setup installs it"):
    """Import a test-only reference package: skip when missing, but fail under CI=true (a missing
    reference must never turn a parity test into a silent skip)."""
    if os.environ.get("CI", "").lower() == "true":
        import importlib

        try:
            return importlib.import_module(name)
        except ImportError as e:
            pytest.fail(f"reference package {name!r} missing under CI ({hint}): {e}",
                        pytrace=False)
    return pytest.importorskip(name, reason=hint)


@contextlib.contextmanager
def persistent_compilation_cache(folder):
    """A persistent XLA cache in `folder` while the block runs: a resumed training run reuses the
    first run's compiled step instead of compiling it again (minutes on CPU for the big
    systems)."""
    import jax
    from jax._src import compilation_cache as cc

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    for key, value in zip(keys, (str(folder), 0.0, 0), strict=True):
        jax.config.update(key, value)
    cc.reset_cache()
    try:
        yield
    finally:
        for key, value in old.items():
            jax.config.update(key, value)
        cc.reset_cache()


@pytest.fixture
def compilation_cache(tmp_path):
    """`persistent_compilation_cache` for one test."""
    with persistent_compilation_cache(tmp_path / "xla_cache"):
        yield


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """After each test module: drop JAX's compiled programs and traces (a module's models and
    jitted closures are not reused by the next file under --dist loadfile), so a worker's memory
    stays near one module's needs instead of growing over the whole run."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
