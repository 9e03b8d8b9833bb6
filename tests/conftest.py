import json
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

FIXTURES = Path(__file__).parent / "fixtures"


def parity_fixture(name: str, *weights):
    """torch.load of tests/fixtures/<name>, after the one staleness guard every parity test uses: `weights` (the
    tiny models the test runs on) must be those the fixture was made from, by their weights_digest recorded in
    fixtures/weights_digests.json. A fixture is never regenerated to make a change pass."""
    from diffsr.testing import weights_digest

    record = json.loads((FIXTURES / "weights_digests.json").read_text())["fixtures"][name]
    if weights_digest(*weights) != record["digest"]:
        pytest.fail(f"the tiny models are not those {name} was made from ({record['weights']}; made by "
                    f"{record['made_by']}): the change to diffsr.testing is what is wrong, not the fixture")
    return torch.load(FIXTURES / name)


@pytest.fixture(scope="module")
def one_thread():
    """Many small tensor ops: one thread is several times faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    from diffsr.testing import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("models") / "sd21-tiny")


@pytest.fixture(scope="session")
def osediff_weights(tiny_base):
    from diffsr.testing import make_tiny_weights

    return make_tiny_weights("osediff", tiny_base, tiny_base.parent / "osediff.pkl")


@pytest.fixture(scope="session")
def osediff(tiny_base, osediff_weights):
    import diffsr

    # No tagger: the tests that use this fixture are about the untagged network (tagged runs: test_taggers.py).
    return diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, tagger=None)


def smooth_image(height, width, seed=0, channels=3):
    """A deterministic test picture: smooth colour waves plus a little noise (uint8)."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = [127 + 90 * np.sin(x / (5 + 3 * c) + c) * np.cos(y / (7 + 2 * c)) for c in range(channels)]
    image = np.stack(planes, axis=2) + rng.normal(0, 8, (height, width, channels))
    return image.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def s3diff_weights(tiny_base):
    """Tiny random s3diff.pkl, de_net.pth beside it (seed 0, as the parity fixtures). Read only: copy to change."""
    from diffsr.testing import make_tiny_weights

    return make_tiny_weights("s3diff", tiny_base, tiny_base.parent / "s3diff" / "s3diff.pkl")


@pytest.fixture(scope="session")
def stablesr_weights(tiny_base):
    """Tiny random stablesr_000117.ckpt, vqgan_cfw_00011.ckpt beside it (seed 0). Read only: copy to change."""
    from diffsr.testing import make_tiny_weights

    return make_tiny_weights("stablesr", tiny_base, tiny_base.parent / "stablesr" / "stablesr_000117.ckpt")


@pytest.fixture(scope="session")
def ccsr_v2_weights(tiny_base):
    from diffsr.testing import make_tiny_weights

    return make_tiny_weights("ccsr", tiny_base, tiny_base.parent / "ccsr-v2")


@pytest.fixture(scope="session")
def ccsr_v2(tiny_base, ccsr_v2_weights):
    import diffsr

    return diffsr.load_upscaler("ccsr", base=tiny_base, weights=ccsr_v2_weights)


@pytest.fixture(scope="session")
def ccsr_v1_weights(tiny_base):
    from diffsr.testing import make_tiny_weights

    return make_tiny_weights("ccsr", tiny_base, tiny_base.parent / "real-world_ccsr.ckpt")


@pytest.fixture(scope="session")
def ccsr_v1(tiny_base, ccsr_v1_weights):
    import diffsr

    return diffsr.load_upscaler("ccsr", base=tiny_base, weights=ccsr_v1_weights)
