"""Test set-up: 8 host devices for sharding tests, and the shared-fixture resolver.

Fixtures live in `../shared/fixtures` beside the checkout; `LEFFA_SHARED` points elsewhere.
Under `CI=true` a missing fixture fails the test; elsewhere it skips.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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
