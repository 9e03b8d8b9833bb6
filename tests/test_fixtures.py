"""The one staleness guard of the parity fixtures (conftest.parity_fixture) covers every model fixture."""

import json

import pytest
import torch

from conftest import FIXTURES, parity_fixture

# Fixtures made from something other than the tiny models, each checked against what it was made from in its test:
# the discriminator's own digest (autoencoder_loss), the seeded GAN weights of gan_weights.py (s3diff).
OTHER_GUARDS = {"autoencoder_loss/reference.pt", "s3diff/gan_parity.pt"}


def test_every_model_fixture_has_a_recorded_digest():
    recorded = json.loads((FIXTURES / "weights_digests.json").read_text())["fixtures"]
    on_disk = {path.relative_to(FIXTURES).as_posix() for path in FIXTURES.rglob("*.pt")}
    assert set(recorded) == on_disk - OTHER_GUARDS
    for name, record in recorded.items():
        assert len(record["digest"]) == 64 and record["made_by"]


def test_parity_fixture_refuses_other_weights(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(pytest.fail.Exception, match="not those osediff/osediff_parity.pt was made from"):
        parity_fixture("osediff/osediff_parity.pt", tmp_path / "other.safetensors")
