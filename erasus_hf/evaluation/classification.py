"""Classifier unlearning metrics: accuracies and the confidence-based membership attack of the SalUn / l1-sparse
benchmarks (MIA-efficacy).

UA (unlearning accuracy) = 1 - accuracy on the forget set, RA / TA = accuracy on the retain / test set, and
MIA-efficacy = the fraction of forget examples that a membership classifier, trained on retain (members) against
test (non-members) examples, calls non-members. A model retrained without the forget set is the target for all four.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.svm import SVC
from torch import nn

from ..reference import eval_mode

MIA_FEATURES = ("confidence", "entropy")


@torch.no_grad()
def class_probabilities(model: nn.Module, inputs: dict[str, torch.Tensor], batch_size: int = 256) -> torch.Tensor:
    """[N, C] softmax probabilities of a classifier on `inputs` (model keyword arguments batched along dim 0), in
    eval mode; the model may return a tensor of logits or an output with `.logits`."""
    sizes = {len(v) for v in inputs.values()}
    if len(sizes) != 1:
        raise ValueError(f"All inputs must have the same number of examples, got sizes {sorted(sizes)}.")
    (n,) = sizes
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for start in range(0, n, batch_size):
            outputs = model(**{k: v[start : start + batch_size].to(device) for k, v in inputs.items()})
            logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
            out.append(torch.softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples whose most probable class is the label."""
    if len(labels) == 0:
        raise ValueError("Accuracy of an empty set.")
    return float((probs.argmax(-1) == labels.to(probs.device)).float().mean())


def mia_features(probs: torch.Tensor, labels: torch.Tensor, feature: str = "confidence") -> np.ndarray:
    """[N, 1] attack feature per example: `confidence` = p(y|x) of the true label, `entropy` = -sum_c p_c log p_c."""
    if feature == "confidence":
        values = probs.gather(1, labels.view(-1, 1).to(probs.device))[:, 0]
    elif feature == "entropy":
        values = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    else:
        raise ValueError(f"Unknown MIA feature {feature!r}; valid: {MIA_FEATURES}")
    return values.double().numpy()[:, None]


def mia_efficacy(
    retain: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    forget: tuple[torch.Tensor, torch.Tensor],
    feature: str = "confidence",
    seed: int = 0,
) -> float:
    """MIA-efficacy: the fraction of forget examples predicted as non-members (higher = more forgotten).

    Each argument is (probabilities [N, C], labels [N]) of the model on that set. As in the SVC_MIA of the SalUn and
    l1-sparse code (Song & Mittal 2021's attack): an RBF SVC (C = 3, gamma = "auto") is fitted on the `feature` of
    as many seeded-random retain examples as there are test examples (members, label 1) and of the test examples
    (non-members, label 0), then predicts on the forget examples.
    """
    retain_probs, retain_labels = retain
    test_probs, test_labels = test
    n = min(len(test_labels), len(retain_labels))
    pick = torch.randperm(len(retain_labels), generator=torch.Generator().manual_seed(seed))[:n]
    x = np.concatenate(
        [
            mia_features(retain_probs[pick], retain_labels[pick], feature),
            mia_features(test_probs, test_labels, feature),
        ]
    )
    y = np.concatenate([np.ones(n), np.zeros(len(test_labels))])
    attack = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    return float(1.0 - attack.predict(mia_features(*forget, feature)).mean())
