"""The classic classifier-unlearning strategies against hand computations on small tensors: random labelling, SalUn's
mask and masked updates, bad teaching, SSD, Fisher forgetting, l1-sparse, and the MIA-efficacy metric."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from erasus_hf.evaluation.classification import accuracy, mia_efficacy, mia_features
from erasus_hf.objectives import Objective, Scores, token_logprobs_from_logits
from erasus_hf.reference import Reference
from erasus_hf.strategies import get_strategy
from erasus_hf.strategies.bad_teacher import randomly_initialised_copy
from erasus_hf.strategies.fisher_forgetting import fisher_noise
from erasus_hf.strategies.importance import fisher_diagonal, squared_gradients, summed_gradients
from erasus_hf.strategies.l1_sparse import linear_decay
from erasus_hf.strategies.random_label import random_wrong_labels
from erasus_hf.strategies.saliency import MaskedUpdates, saliency_masks
from erasus_hf.strategies.ssd import dampen

from .testing_utils import context


class ClassObjective(Objective):
    """A classifier family stand-in: `model(x)` gives [B, C] logits, scored like the classification objective."""

    name = "classification"

    def score(self, model, batch, hidden_layer=None):
        logits = model(batch["x"])[:, None, :]
        logprobs, mask = token_logprobs_from_logits(logits, batch["labels"][:, None])
        return Scores(token_logprobs=logprobs, mask=mask, logits=logits)


class Fixed(nn.Module):
    """A 'model' whose logits are a fixed table looked up by example id (x), for exact hand computations."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table))

    def forward(self, x):
        return self.table[x]


class ModelReference(Reference):
    mode = "copy"

    def __init__(self, model):
        self.model = model

    def scores(self, objective, batch, hidden_layer=None):
        with torch.no_grad():
            return objective.score(self.model, batch)


def ctx(model, reference=None, gamma=1.0, alpha=1.0, retain_loss="nll", step=0):
    return context(ClassObjective(), model, reference, gamma, alpha, retain_loss, step)


def log_softmax(row):
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


def kl(p_logits, q_logits):
    """KL(p || q) of two logit rows."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq, strict=True))


STUDENT = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.0], [0.3, 0.3, 3.0]]
TEACHER = [[0.0, 0.0, 0.0], [1.0, 0.0, -1.0], [5.0, 5.0, 5.0]]
FORGET = {"x": torch.tensor([0, 1]), "labels": torch.tensor([0, 1]), "index": torch.tensor([4, 9])}
RETAIN = {"x": torch.tensor([2]), "labels": torch.tensor([2])}


# ---- random labelling ----


def test_random_wrong_labels_are_wrong_fixed_per_example_and_uniform():
    labels = torch.randint(0, 10, (9000,), generator=torch.Generator().manual_seed(0))
    index = torch.arange(9000)
    relabelled = random_wrong_labels(labels, index, 10, seed=0)
    assert not (relabelled == labels).any()
    # the same example gets the same label in any batch, at any time
    shuffled = torch.randperm(9000)
    assert torch.equal(random_wrong_labels(labels[shuffled], index[shuffled], 10, seed=0), relabelled[shuffled])
    assert not torch.equal(random_wrong_labels(labels, index, 10, seed=1), relabelled)
    offsets = (relabelled - labels) % 10  # k in 1..9, each about 1/9 of the time
    counts = torch.bincount(offsets, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.85 * 1000 and counts[1:].max() < 1.15 * 1000
    with pytest.raises(ValueError, match="at least 2 classes"):
        random_wrong_labels(labels, index, 1, seed=0)


def test_random_label_loss_by_hand():
    """L = gamma CE(x_f, y'_f) + alpha CE(x_r, y_r)."""
    strategy = get_strategy("random_label", relabel_seed=3)
    relabelled = random_wrong_labels(FORGET["labels"], FORGET["index"], 3, seed=3).tolist()
    forget_ce = -sum(log_softmax(STUDENT[i])[y] for i, y in enumerate(relabelled)) / 2
    retain_ce = -log_softmax(STUDENT[2])[2]
    loss, metrics = strategy.compute_loss(ctx(Fixed(STUDENT), gamma=2.0, alpha=0.5), FORGET, RETAIN)
    assert loss.item() == pytest.approx(2.0 * forget_ce + 0.5 * retain_ce, abs=1e-5)
    assert metrics["forget_loss"].item() == pytest.approx(forget_ce, abs=1e-5)
    with pytest.raises(ValueError, match="index"):
        strategy.forget_loss(ctx(Fixed(STUDENT)), {k: v for k, v in FORGET.items() if k != "index"})


# ---- SalUn: the saliency mask and masked updates ----


def test_salun_mask_is_the_global_top_fraction_of_the_forget_gradient():
    """|g| over all parameters = {0.1, 3, 2, 0.5, 1, 0}: the top half (3 entries) is {3, 2, 1}, whichever tensor."""
    grads = {"a": torch.tensor([0.1, -3.0]), "b": torch.tensor([[2.0, -0.5]]), "c": torch.tensor([1.0, 0.0])}
    masks = saliency_masks(grads, 0.5)
    assert masks["a"].tolist() == [0.0, 1.0] and masks["b"].tolist() == [[1.0, 0.0]] and masks["c"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="fraction"):
        saliency_masks(grads, 0.0)


def test_salun_saliency_gradient_is_the_summed_forget_ce_gradient():
    """For logits = a table row, d CE / d logits = softmax - onehot; summed over two batches of one example."""
    model = Fixed(STUDENT)
    batches = [
        {"x": torch.tensor([0]), "labels": torch.tensor([0])},
        {"x": torch.tensor([0]), "labels": torch.tensor([2])},
    ]
    grads = summed_gradients(model, ClassObjective(), batches)["table"]
    p = [math.exp(v) for v in log_softmax(STUDENT[0])]
    expected = [2 * p[0] - 1, 2 * p[1], 2 * p[2] - 1]
    assert grads[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert grads[1:].abs().sum() == 0


def test_masked_updates_keep_masked_out_weights_exactly_under_adamw_weight_decay():
    """AdamW applies theta <- theta - lr wd theta to every parameter with a gradient, masked or not; the hook zeroes
    the masked-out gradient and the restore after the step undoes the decay (and momentum from earlier steps)."""
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    callbacks = []
    trainer = SimpleNamespace(model=model, add_callback=callbacks.append, remove_callback=callbacks.remove)
    masked = MaskedUpdates()
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert masked.install_masks(trainer, {"weight": mask}) == 0.5
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.tensor([[1.0, -1.0]])).pow(2).sum().backward()
        assert model.weight.grad[mask == 0].abs().sum() == 0  # the hook
        optimizer.step()
        callbacks[0].on_optimizer_step(None, None, None)  # the trainer's on_optimizer_step event
    assert model.weight[0, 1].item() == 2.0 and model.weight[1, 0].item() == 3.0
    assert model.weight[0, 0].item() != 1.0 and model.weight[1, 1].item() != 4.0
    masked.teardown()
    assert callbacks == [] and masked._hooks == []


# ---- bad teaching ----


def test_bad_teacher_loss_by_hand():
    """L = gamma KL(T_d(x_f) || S(x_f)) + alpha KL(T_s(x_r) || S(x_r)), KL at T = 1, averaged over examples."""
    strategy = get_strategy("bad_teacher")
    assert strategy.temperature == 1.0
    strategy.teacher = Fixed(TEACHER)  # the incompetent teacher (built by setup in a run)
    competent = Fixed([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, -2.0, 4.0]])
    loss, metrics = strategy.compute_loss(
        ctx(Fixed(STUDENT), reference=ModelReference(competent), gamma=2.0, alpha=0.5), FORGET, RETAIN
    )
    forget_kl = (kl(TEACHER[0], STUDENT[0]) + kl(TEACHER[1], STUDENT[1])) / 2
    retain_kl = kl([1.0, -2.0, 4.0], STUDENT[2])
    assert metrics["bad_teacher_forget_kl"].item() == pytest.approx(forget_kl, abs=1e-5)
    assert metrics["bad_teacher_retain_kl"].item() == pytest.approx(retain_kl, abs=1e-5)
    assert loss.item() == pytest.approx(2.0 * forget_kl + 0.5 * retain_kl, abs=1e-5)


class NoReset(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.linear(x) * self.scale


def test_randomly_initialised_copy_of_a_plain_module_and_of_a_pretrained_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)  # a "trained" model: far from any initialisation
    state = torch.random.get_rng_state()
    teacher = randomly_initialised_copy(model, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert not torch.equal(teacher[0].weight, model[0].weight) and teacher[1].weight.eq(1).all()  # LayerNorm reset
    assert torch.equal(randomly_initialised_copy(model, seed=1)[2].weight, teacher[2].weight)  # seeded
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert model[0].weight.eq(0.5).all()  # the student is untouched
    with pytest.raises(ValueError, match=r"\['scale'\]"):
        randomly_initialised_copy(NoReset())

    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3,
    )  # fmt: skip
    vit = ViTForImageClassification(config)
    with torch.no_grad():
        vit.classifier.weight.fill_(1.0)
    teacher = randomly_initialised_copy(vit, seed=0)
    assert type(teacher) is ViTForImageClassification
    assert teacher.classifier.weight.std().item() == pytest.approx(config.initializer_range, rel=0.5)
    assert torch.equal(randomly_initialised_copy(vit, seed=0).classifier.weight, teacher.classifier.weight)


# ---- SSD ----


def test_ssd_dampening_by_hand():
    """theta <- min(lambda []_D / []_f, 1) theta where []_f > alpha []_D."""
    params = {"w": nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))}
    full = {"w": torch.tensor([1.0, 1.0, 1.0, 0.0])}
    forget = {"w": torch.tensor([5.0, 20.0, 100.0, 0.0])}
    selected = dampen(params, full, forget, alpha=10.0, dampening=1.0)
    # 5 <= 10: kept; 20 > 10: x 1/20; 100 > 10: x 1/100; 0 > 0 is False: kept
    assert params["w"].tolist() == pytest.approx([1.0, 0.1, 0.03, 4.0])
    assert selected == 0.5
    params = {"w": nn.Parameter(torch.tensor([2.0]))}
    dampen(params, {"w": torch.tensor([1.0])}, {"w": torch.tensor([11.0])}, alpha=10.0, dampening=20.0)
    assert params["w"].item() == 2.0  # beta = min(20 / 11, 1) = 1: never amplified


def test_ssd_importance_is_the_mean_of_squared_minibatch_gradients():
    model = Fixed(STUDENT)
    b1 = {"x": torch.tensor([0, 0]), "labels": torch.tensor([0, 1])}  # mean CE over two examples of row 0
    b2 = {"x": torch.tensor([0]), "labels": torch.tensor([2])}
    imp = squared_gradients(model, ClassObjective(), [b1, b2])["table"][0]
    p = [math.exp(v) for v in log_softmax(STUDENT[0])]
    g1 = [p[0] - 0.5, p[1] - 0.5, p[2]]  # (softmax - mean onehot)
    g2 = [p[0], p[1], p[2] - 1]
    assert imp.tolist() == pytest.approx([(a * a + b * b) / 2 for a, b in zip(g1, g2, strict=True)], abs=1e-6)


# ---- Fisher forgetting ----


def test_fisher_diagonal_of_a_linear_classifier_by_hand():
    """logits = W x: d log p_y / d W_cj = (1[y=c] - p_c) x_j, so F_cj = sum_y p_y (1[y=c] - p_c)^2 x_j^2
    = p_c (1 - p_c) x_j^2, averaged over the examples."""
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, -0.5]]))
    xs = [torch.tensor([[1.0, 2.0]]), torch.tensor([[-1.0, 0.5]])]
    batches = [{"x": x, "labels": torch.tensor([0])} for x in xs]
    fisher = fisher_diagonal(model, ClassObjective(), batches)["weight"]
    expected = torch.zeros(3, 2)
    for x in xs:
        p = torch.softmax(model.weight.detach() @ x[0], -1)
        expected += (p * (1 - p))[:, None] * x[0].pow(2)[None, :] / 2
    assert torch.allclose(fisher, expected, atol=1e-6)
    with pytest.raises(ValueError, match="one example"):
        fisher_diagonal(model, ClassObjective(), [{"x": torch.cat(xs), "labels": torch.tensor([0, 1])}])


def test_fisher_noise_variance_is_alpha_over_fisher_clamped():
    """var = alpha min(1 / (F + 1e-8), 1e3): F = 4 gives alpha / 4; F = 0 is clamped to alpha 1e3."""
    params = {"w": nn.Parameter(torch.zeros(2))}
    fisher = {"w": torch.tensor([4.0, 0.0])}
    fisher_noise(params, fisher, alpha=1e-2, max_inverse_fisher=1e3, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, generator=torch.Generator().manual_seed(0))
    expected = [math.sqrt(1e-2 / 4) * eps[0].item(), math.sqrt(1e-2 * 1e3) * eps[1].item()]
    assert params["w"].tolist() == pytest.approx(expected, rel=1e-5)
    strategy = get_strategy("fisher_forgetting")
    assert (strategy.alpha, strategy.max_inverse_fisher) == (1e-6, 1e3)


# ---- l1-sparse ----


def test_l1_sparse_loss_and_schedule_by_hand():
    """L = CE(retain) + gamma_t ||theta||_1, gamma_t = gamma (1 - t / T)."""
    assert [linear_decay(1.0, t, 4) for t in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    strategy = get_strategy("l1_sparse", gamma=0.1)
    assert get_strategy("l1_sparse").gamma == 5e-4
    model = Fixed(STUDENT)
    l1 = sum(abs(v) for row in STUDENT for v in row)
    ce = -log_softmax(STUDENT[2])[2]
    loss, metrics = strategy.compute_loss(ctx(model, step=0), FORGET, RETAIN)  # t = 0: gamma, no run needed
    assert loss.item() == pytest.approx(ce + 0.1 * l1, abs=1e-5)
    strategy.setup(SimpleNamespace(state=SimpleNamespace(max_steps=10)))
    loss, metrics = strategy.compute_loss(ctx(model, step=4), FORGET, RETAIN)
    assert metrics["l1_gamma"].item() == pytest.approx(0.06)
    assert loss.item() == pytest.approx(ce + 0.06 * l1, abs=1e-5)
    strategy.teardown()  # the run length is remembered for a later evaluate()
    assert strategy.gamma_at(5) == pytest.approx(0.05)
    with pytest.raises(RuntimeError, match="run length"):
        get_strategy("l1_sparse").gamma_at(3)


# ---- the metric ----


def test_mia_efficacy_counts_forget_examples_that_look_unseen():
    """Members (retain) are predicted with confidence 0.99, non-members (test) with 0.6: forget examples predicted
    with 0.6 are called non-members (efficacy 1), forget examples at 0.99 members (efficacy 0)."""

    def probs(conf, n):
        return torch.tensor([[conf, 1 - conf]] * n), torch.zeros(n, dtype=torch.long)

    retain, test = probs(0.99, 40), probs(0.6, 20)
    assert mia_efficacy(retain, test, probs(0.6, 5)) == 1.0
    assert mia_efficacy(retain, test, probs(0.99, 5)) == 0.0
    p, y = torch.tensor([[0.5, 0.5], [0.9, 0.1]]), torch.tensor([1, 0])
    assert mia_features(p, y, "confidence")[:, 0].tolist() == pytest.approx([0.5, 0.9])
    assert mia_features(p, y, "entropy")[:, 0].tolist() == pytest.approx(
        [math.log(2), -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))]
    )
    assert accuracy(p, y) == 0.5  # the tie [0.5, 0.5] goes to the first class: wrong for label 1
    with pytest.raises(ValueError, match="valid"):
        mia_features(p, y, "loss")


# ---- bad input ----


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("salun", {"mask_fraction": 0.0}, "mask_fraction"),
        ("bad_teacher", {"temperature": 0.0}, "temperature"),
        ("ssd", {"alpha": -1.0}, "alpha"),
        ("fisher_forgetting", {"alpha": 0.0}, "alpha"),
        ("l1_sparse", {"gamma": -1.0}, "gamma"),
        ("salun", {"beta": 1.0}, r"valid: \['mask_fraction', 'relabel_seed'\]"),
    ],
)
def test_bad_hyperparameters_fail_clearly(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_strategy(name, **kwargs)


def test_classifier_strategies_refuse_other_families_and_need_a_retain_set(
    tmp_path, tokenizer, tiny_llama, tofu_slice
):
    from erasus_hf import UnlearningConfig, UnlearningTrainer

    def config(strategy):
        return UnlearningConfig(output_dir=str(tmp_path), strategy=strategy, report_to="none", save_strategy="no")

    with pytest.raises(ValueError, match=r"serves \('classification',\)"):
        UnlearningTrainer(tiny_llama, config("salun"), forget_dataset=tofu_slice[0], processing_class=tokenizer)
    rows = [{"x": torch.zeros(2), "labels": 0}]
    for strategy in ("ssd", "fisher_forgetting", "bad_teacher", "l1_sparse"):
        with pytest.raises(ValueError, match="needs a retain_dataset"):
            UnlearningTrainer(nn.Linear(2, 2), config(strategy), forget_dataset=rows)
