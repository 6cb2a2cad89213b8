"""The end-to-end erasure test: a tiny text-to-image diffusion model learns real handwritten digits, then each
strategy erases the digit seven. Target (issue 7): the erased digit detected in at most 10% of its samples, the
other digits within 10 points of their starting accuracy, on fixed seeds, judged by a CNN trained on real digits.

The model is trained once per session (benchmarks/diffusion_digits.py, preset "test"); the larger version is
`python -m benchmarks.diffusion_digits`.
"""

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusion strategies need diffusers")
pytest.importorskip("sklearn", reason="scikit-learn is a dev dependency")

from benchmarks import diffusion_digits as digits  # noqa: E402

pytestmark = pytest.mark.slow

PRESET = digits.PRESETS["test"]


@pytest.fixture(scope="session")
def digit_setup():
    return digits.prepare(PRESET)


@pytest.fixture(scope="session")
def before(digit_setup):
    return digits.evaluate(digit_setup, digit_setup.model.unet, PRESET)


def test_the_model_draws_recognisable_digits(digit_setup, before):
    assert digit_setup.classifier_accuracy > 0.95  # the judge, on held-out real digits
    assert before["detection"] >= 0.6, before  # the digit to erase is drawn when asked for
    assert before["retain_accuracy"] >= 0.4, before  # chance is 0.1


@pytest.mark.parametrize("strategy", digits.STRATEGIES)
def test_erase_a_digit(digit_setup, before, strategy, tmp_path):
    unet, seconds = digits.erase(digit_setup, strategy, PRESET, output_dir=str(tmp_path))
    after = digits.evaluate(digit_setup, unet, PRESET)
    print(
        f"{strategy}: detection {before['detection']:.2f} -> {after['detection']:.2f}, other digits "
        f"{before['retain_accuracy']:.3f} -> {after['retain_accuracy']:.3f}, {seconds:.1f} s"
    )
    assert after["detection"] <= 0.10, (strategy, before, after)
    assert after["retain_accuracy"] >= before["retain_accuracy"] - 0.10, (strategy, before, after)
    assert all(torch.isfinite(p).all() for p in unet.parameters())
