"""The classification objective on real handwritten digits (sklearn's load_digits) with a plain PyTorch module."""

import pytest
import torch
from torch import nn

from erasus_hf import UnlearningConfig, UnlearningTrainer

from .testing_utils import digit_split, pixel_rows

pytest.importorskip("sklearn.datasets", reason="scikit-learn is a dev dependency")


class DigitMLP(nn.Module):
    """Any nn.Module that returns class logits works; this one is deliberately not a PreTrainedModel."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)


@pytest.fixture(scope="module")
def digits():
    images, y, train, test = digit_split()
    x = images.flatten(1)  # [N, 64]
    torch.manual_seed(0)
    model = DigitMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[train]), y[train]).backward()
        optimizer.step()
    return model, x, y, train, test


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


@pytest.mark.parametrize("strategy", ["ga", "npo", "grad_diff"])
def test_unlearning_one_digit(tmp_path, digits, strategy):
    model, x, y, train, test = digits
    model = type(model)()
    model.load_state_dict(digits[0].state_dict())
    forget_idx, retain_idx = train[y[train] == 3], train[y[train] != 3]
    test_forget, test_retain = test[y[test] == 3], test[y[test] != 3]
    before_forget, before_retain = accuracy(model, x[test_forget], 3), accuracy(model, x[test_retain], y[test_retain])
    assert before_forget > 0.85 and before_retain > 0.85
    args = UnlearningConfig(
        output_dir=str(tmp_path),
        strategy=strategy,
        learning_rate=1e-3,
        num_train_epochs=5,
        per_device_train_batch_size=16,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        retain_loss="nll" if strategy != "ga" else "none",
        seed=0,
        strategy_kwargs={"beta": 0.5} if strategy == "npo" else None,
    )
    trainer = UnlearningTrainer(
        model,
        args,
        forget_dataset=pixel_rows(x, y, forget_idx),
        retain_dataset=pixel_rows(x, y, retain_idx) if strategy != "ga" else None,
    )
    assert trainer.model_objective.name == "classification"
    trainer.train()
    after_forget, after_retain = accuracy(model, x[test_forget], 3), accuracy(model, x[test_retain], y[test_retain])
    assert after_forget < 0.2, (strategy, before_forget, after_forget)
    if strategy != "ga":  # GA has no retain term; the others must keep the other digits
        assert after_retain > before_retain - 0.08, (strategy, before_retain, after_retain)
