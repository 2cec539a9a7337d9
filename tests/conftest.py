"""Fixtures several test modules share."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_profile(tmp_path_factory):
    """(exit status, path) of one quick CPU profile of `tiny` drafted by `tiny-noisy`,
    measured on this host by `pipedec-real profile --quick` (about a minute, so once per
    session): `test_real_profile` checks it, `test_fidelity` simulates with it."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from backends.torch.cli import main as real
    out = tmp_path_factory.mktemp("tiny-profile") / "profile.json"
    code = real(["profile", "--target", "tiny", "--draft", "tiny-noisy", "--quick",
                 "--out", str(out)])
    return code, out
