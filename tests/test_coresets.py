"""Coreset selection (`erasus_hf.coresets`): every selector on a constructed case whose right answer is known
(herding's mean matching, k-center's covering radius, clusters each given one row, the nearest retain rows, the
outliers pruned), dataset indices that survive a shuffle and do not depend on the batch size, the features checked
against hand computations on a tiny Llama, and the config path through `UnlearningTrainer` (the kept rows, the
budget rule, the card and `coreset.json`), the command line, and bad options refused before any compute."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.cli import main
from erasus_hf.coresets import SELECTORS, example_features, full_set_steps, get_selector
from erasus_hf.objectives import CausalLMObjective
from erasus_hf.peft_utils import prepare_peft

from .testing_utils import config, nll, qa, small_llama

rng = np.random.default_rng(0)
CLUSTERS = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0], [-10.0, -10.0, 0]])


def _clustered(per_cluster: tuple[int, ...] = (40, 5, 20, 10)) -> tuple[np.ndarray, np.ndarray]:
    """Four tight, well separated clusters of unequal sizes (points, cluster label)."""
    points = [CLUSTERS[c] + 0.1 * rng.standard_normal((n, 3)) for c, n in enumerate(per_cluster)]
    labels = np.concatenate([[c] * n for c, n in enumerate(per_cluster)])
    return np.concatenate(points), labels


def _covering_radius(x: np.ndarray, kept: np.ndarray) -> float:
    return float(np.linalg.norm(x[:, None] - x[kept][None], axis=2).min(axis=1).max())


def test_the_registry_holds_every_selector_of_the_issue():
    assert set(SELECTORS) == {
        "random", "herding", "k_center", "kmeans", "facility_location", "loss", "gradient_norm", "forget_similar",
        "upcore",
    }  # fmt: skip
    assert SELECTORS["forget_similar"].sides == ("retain",) and SELECTORS["upcore"].sides == ("forget",)


def test_herding_matches_the_mean_far_better_than_random():
    x = rng.standard_normal((500, 6)) + 3.0  # unnormalised: herding on the raw vectors
    herding = get_selector("herding", normalize=False)
    kept = herding.select(20, x)
    gap = np.linalg.norm(x[kept].mean(0) - x.mean(0))
    random_gaps = [np.linalg.norm(x[rng.choice(500, 20, replace=False)].mean(0) - x.mean(0)) for _ in range(200)]
    assert gap < 0.2 * np.median(random_gaps), (gap, np.median(random_gaps))  # herding: O(1/k), random O(1/sqrt k)
    # by hand: the first row is the one nearest the mean, the second the one that best completes it
    first = int(np.argmin(np.linalg.norm(x - x.mean(0), axis=1)))
    second = int(np.argmin(np.linalg.norm(x.mean(0) - (x[first] + x) / 2, axis=1)))
    assert set(herding.select(2, x)) == {first, second}


def test_k_center_covers_every_cluster_within_twice_the_best_radius():
    x, labels = _clustered()
    kept = get_selector("k_center", normalize=False).select(4, x)
    assert sorted(labels[kept]) == [0, 1, 2, 3]
    radius = _covering_radius(x, kept)
    assert radius < 1.0  # within a cluster; the clusters are 14 apart
    best_random = min(_covering_radius(x, rng.choice(len(x), 4, replace=False)) for _ in range(300))
    assert radius <= 2 * best_random  # the greedy rule's 2-approximation


@pytest.mark.parametrize("name", ["kmeans", "facility_location"])
def test_cluster_selectors_give_each_cluster_one_row(name):
    x, labels = _clustered()
    kept = get_selector(name, normalize=False).select(4, x, seed=3)
    assert sorted(labels[kept]) == [0, 1, 2, 3]
    if name == "kmeans":  # the row nearest each cluster's centroid (here: the cluster's mean)
        for c in range(4):
            members = np.flatnonzero(labels == c)
            nearest = members[np.argmin(np.linalg.norm(x[members] - x[members].mean(0), axis=1))]
            assert nearest in kept


def test_facility_location_by_hand():
    x = np.array([[0.0], [1.0], [2.0], [3.0], [12.0]])
    # s = d_max - d = 12 - |x_i - x_j|; column sums 42, 45, 46, 45, 18: row 2 first. Then coverage [10, 11, 12, 11, 2]:
    # adding row 4 gains 12 - 2 = 10, rows 0, 1, 3 gain 2 each
    assert get_selector("facility_location", normalize=False).select(1, x).tolist() == [2]
    assert get_selector("facility_location", normalize=False).select(2, x).tolist() == [2, 4]


@pytest.mark.parametrize("keep", ["highest", "lowest"])
def test_score_selectors_keep_the_extreme_scores(keep):
    scores = rng.permutation(50).astype(float)
    expected = np.flatnonzero(scores >= 40) if keep == "highest" else np.flatnonzero(scores < 10)
    assert get_selector("loss", keep=keep).select(10, scores).tolist() == expected.tolist()
    assert get_selector("gradient_norm", keep=keep).select(10, scores).tolist() == expected.tolist()


def test_forget_similar_picks_the_retain_rows_nearest_the_forget_set():
    forget = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    retain = np.random.default_rng(0).standard_normal((30, 3))  # its own draw: the answer must not depend on order
    retain[[4, 17, 22]] = [[5.0, 0.1, 0], [0.2, 3.0, 0], [2.0, 2.1, 0.05]]  # nearly along a forget direction
    retain[:, 2] += np.where(np.isin(np.arange(30), [4, 17, 22]), 0, 3.0)  # the others point away, along z
    kept = get_selector("forget_similar").select(3, retain, forget_features=forget)
    assert kept.tolist() == [4, 17, 22]


def test_upcore_prunes_the_outliers_of_the_forget_set():
    inliers = rng.standard_normal((45, 4)) * 0.3 + [1.0, 1.0, 0, 0]
    outliers = np.array([[-3.0, 0.5, 2, 1], [0.2, -4.0, 1, -2], [3.0, 3.0, -3, 3], [-1, -1, -1, -4], [5, 0, 0, 0]])
    x = np.concatenate([inliers, outliers])
    kept = get_selector("upcore", normalize=False).select(40, x, seed=0)
    assert not set(kept) & set(range(45, 50))  # no outlier kept


DETERMINISTIC = ["herding", "k_center", "facility_location", "loss", "gradient_norm", "forget_similar", "upcore"]


@pytest.mark.parametrize("name", DETERMINISTIC + ["kmeans"])
def test_indices_survive_a_shuffle(name):
    """The same rows are chosen from a shuffled copy: indices name rows, not positions of a pass. k-means draws its
    initial centroids by position, so it is tried where its answer is determined (four clusters, four rows)."""
    selector = get_selector(name)
    x = rng.standard_normal((60, 5)) if selector.features == "embeddings" else rng.standard_normal(60)
    k = 12
    if name == "kmeans":
        x, k = _clustered(), 4
        x = x[0]
    forget = rng.standard_normal((8, x.shape[1] if x.ndim == 2 else 1))
    permutation = rng.permutation(len(x))
    kept = selector.select(k, x, seed=1, forget_features=forget)
    shuffled = selector.select(k, x[permutation], seed=1, forget_features=forget)
    assert sorted(permutation[shuffled].tolist()) == kept.tolist()
    assert kept.dtype == np.int64 and list(kept) == sorted(set(kept))


def test_random_is_seeded_and_bad_requests_are_refused():
    random = get_selector("random")
    assert random.select(5, n=100, seed=7).tolist() == random.select(5, n=100, seed=7).tolist()
    assert random.select(5, n=100, seed=7).tolist() != random.select(5, n=100, seed=8).tolist()
    assert random.select(100, n=100).tolist() == list(range(100))
    with pytest.raises(ValueError, match="between 1 and 10"):
        random.select(11, n=10)
    bad = np.ones((6, 2))
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"rows \[4\] are not finite"):
        get_selector("herding").select(2, bad)
    with pytest.raises(ValueError, match="pass forget_features"):
        get_selector("forget_similar").select(2, np.ones((6, 2)))
    with pytest.raises(ValueError, match=r"Unknown coreset_kwargs \['beta'\] for selector 'loss'; valid: \['score', "):
        get_selector("loss", beta=1)
    with pytest.raises(ValueError, match="did you mean 'herding'"):
        get_selector("hearding")


# ---- features through the objective, on a tiny Llama


@pytest.fixture
def forget_rows(tofu_slice, tokenizer, tmp_path):
    """The forget side tokenized as the trainer does (and its side collator)."""
    trainer = UnlearningTrainer(
        small_llama(tokenizer), config(tmp_path, strategy="ga", retain_loss="none"),
        forget_dataset=qa(tofu_slice[0]), processing_class=tokenizer,
    )  # fmt: skip
    return trainer.train_dataset.forget, trainer.data_collator.side_collator


def test_losses_are_each_rows_nll_whatever_the_batch_size(tokenizer, forget_rows):
    rows, collator = forget_rows
    model, objective = small_llama(tokenizer).eval(), CausalLMObjective()
    batched = example_features("losses", model, objective, collator, rows, batch_size=8, disable_tqdm=True)
    single = example_features("losses", model, objective, collator, rows, batch_size=1, disable_tqdm=True)
    np.testing.assert_allclose(batched, single, rtol=1e-5)
    by_hand = objective.score(model, collator([rows[5]])).mean_nll.item()
    assert batched[5] == pytest.approx(by_hand, rel=1e-5)
    embeddings = example_features("embeddings", model, objective, collator, rows, batch_size=8, disable_tqdm=True)
    alone = example_features("embeddings", model, objective, collator, rows.select([5]), disable_tqdm=True)
    np.testing.assert_allclose(embeddings[5], alone[0], rtol=1e-4, atol=1e-6)  # padding does not enter the mean
    assert embeddings.shape == (len(rows), model.config.hidden_size)


def test_el2n_by_hand(tokenizer, forget_rows):
    rows, collator = forget_rows
    model, objective = small_llama(tokenizer).eval(), CausalLMObjective()
    el2n = example_features("el2n", model, objective, collator, rows.select(range(4)), disable_tqdm=True)
    batch = collator([rows[2]])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
    targets, scored = batch["labels"][0, 1:], batch["labels"][0, 1:] != -100
    onehot = torch.nn.functional.one_hot(targets.clamp_min(0), logits.shape[-1]).float()
    by_hand = (logits.softmax(-1) - onehot).norm(dim=-1)[scored].mean().item()
    assert el2n[2] == pytest.approx(by_hand, rel=1e-4)


def test_gradient_norms_are_the_adapters_per_example_gradients(tokenizer, forget_rows, tmp_path):
    rows, collator = forget_rows
    model, _, _ = prepare_peft(small_llama(tokenizer), config(tmp_path, use_peft=True))
    objective = CausalLMObjective()
    norms = example_features("gradient_norms", model, objective, collator, rows.select(range(3)), disable_tqdm=True)
    for i in range(3):
        model.zero_grad()
        model.eval()
        objective.score(model, collator([rows[i]])).mean_nll.sum().backward()
        by_hand = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.requires_grad)).item()
        assert norms[i] == pytest.approx(by_hand, rel=1e-4)
    assert all(p.grad is None or "lora_" in n for n, p in model.named_parameters())  # only the adapter is trainable
    sketched = example_features("gradients", model, objective, collator, rows.select(range(3)), sketch_dim=64,
                                disable_tqdm=True)  # fmt: skip
    assert sketched.shape == (3, 64) and np.isfinite(sketched).all()


# ---- the config path through the trainer


def _trainer(tmp_path, tokenizer, tofu_slice, model=None, **options):
    forget, retain = tofu_slice
    args = config(tmp_path, **{"strategy": "grad_diff", **options})
    return UnlearningTrainer(
        model or small_llama(tokenizer), args, forget_dataset=qa(forget), retain_dataset=qa(retain),
        processing_class=tokenizer,
    )  # fmt: skip


def test_a_retain_coreset_keeps_the_selectors_rows_and_is_recorded(tmp_path, tokenizer, tofu_slice):
    trainer = _trainer(tmp_path, tokenizer, tofu_slice, coreset="herding", coreset_fraction=0.25)
    side = trainer.coreset.sides["retain"]
    assert (side.rows, side.kept, side.features) == (40, 10, "embeddings") and "forget" not in trainer.coreset.sides
    full = _trainer(tmp_path / "full", tokenizer, tofu_slice)
    embeddings = example_features(
        "embeddings", small_llama(tokenizer), trainer.model_objective, full.data_collator.side_collator,
        full.train_dataset.retain, disable_tqdm=True,
    )  # fmt: skip
    assert side.indices == get_selector("herding").select(10, embeddings).tolist()
    assert trainer.train_dataset.retain["input_ids"] == full.train_dataset.retain.select(side.indices)["input_ids"]
    assert len(trainer.train_dataset.forget) == 40 and trainer.args.max_steps == -1  # the budget is the forget set's
    trainer.train()
    assert trainer.state.log_history[0]["coreset/retain_kept"] == 10
    trainer.save_model()
    record = json.loads((tmp_path / "out" / "coreset.json").read_text())
    assert record["sides"]["retain"]["indices"] == side.indices and record["budget"] == "steps"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Trained on a coreset: `herding` kept 10 of 40 retain examples (25%, embeddings, seed 0" in card


@pytest.mark.parametrize(
    ("budget", "max_steps", "expected"),
    [("steps", -1, 10), ("epochs", -1, 3), ("steps", 4, 4)],  # 40 rows / 4 per batch = 10 steps; 10 rows: 3
)
def test_a_forget_coreset_trains_for_the_full_sets_steps(tmp_path, tokenizer, tofu_slice, budget, max_steps, expected):
    trainer = _trainer(
        tmp_path, tokenizer, tofu_slice, coreset="random", coreset_side="forget", coreset_fraction=0.25,
        coreset_budget=budget, max_steps=max_steps,
    )  # fmt: skip
    assert len(trainer.train_dataset.forget) == 10
    trainer.train()
    assert trainer.state.global_step == expected
    assert trainer.coreset.budget == ("max_steps" if max_steps > 0 else budget)


def test_full_set_steps_counts_as_the_trainer(tmp_path):
    args = UnlearningConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                            num_train_epochs=2.5)  # fmt: skip
    assert full_set_steps(40, args) == 18  # ceil(40 / 3) = 14 batches, 7 updates per epoch, ceil(2.5 x 7)


def test_a_forget_coreset_of_a_quarter_still_unlearns_the_whole_forget_set(tmp_path, tokenizer, tofu_slice, memorised):
    """Pal et al. (2025) in small: NPO on 10 of the 40 memorised forget rows, for the full set's steps, raises the
    NLL of the 30 rows it never trained on as well."""
    forget, retain = tofu_slice
    before = nll(memorised, tokenizer, qa(forget))
    trainer = _trainer(
        tmp_path, tokenizer, tofu_slice, model=memorised, coreset="random", coreset_side="forget",
        coreset_fraction=0.25, strategy="npo", use_peft=True, learning_rate=3e-3, num_train_epochs=4,
        per_device_train_batch_size=8, lr_scheduler_type="constant",
    )  # fmt: skip
    trainer.train()
    unseen = [i for i in range(len(forget)) if i not in trainer.coreset.sides["forget"].indices]
    model = trainer.model.eval()
    after_unseen = nll(model, tokenizer, qa(forget.select(unseen)))
    assert after_unseen > 10 * before, (before, after_unseen)  # measured 0.011 -> 0.367 nats on the unseen rows
    assert nll(model, tokenizer, qa(retain)) < 0.2  # measured 0.056


def test_bad_coreset_options_are_refused_before_any_compute(tmp_path, tokenizer, tofu_slice, monkeypatch):
    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass ran")

    monkeypatch.setattr(CausalLMObjective, "score", no_forward)
    with pytest.raises(ValueError, match="coreset_fraction must be a number in \\(0, 1\\]"):
        config(tmp_path, coreset="random", coreset_fraction=1.5)
    with pytest.raises(ValueError, match="selector 'upcore' serves the forget side only, not retain"):
        config(tmp_path, coreset="upcore")
    with pytest.raises(ValueError, match="selector 'loss' reads losses only"):
        config(tmp_path, coreset="loss", coreset_features="gradients")
    with pytest.raises(ValueError, match="coreset_budget must be one of"):
        config(tmp_path, coreset="random", coreset_budget="time")
    forget, _ = tofu_slice
    with pytest.raises(ValueError, match="reduces the retain set, but this run has none"):
        UnlearningTrainer(
            small_llama(tokenizer), config(tmp_path, strategy="ga", retain_loss="none", coreset="herding"),
            forget_dataset=qa(forget), processing_class=tokenizer,
        )  # fmt: skip


def test_the_command_line_takes_the_coreset_options(tmp_path, tokenizer, tofu_slice, capsys):
    forget, retain = tofu_slice
    for name, rows in (("forget", forget), ("retain", retain)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa(rows)))
    out = tmp_path / "out"
    argv = [
        "unlearn", "--forget_dataset_name", str(tmp_path / "forget.jsonl"), "--retain_dataset_name",
        str(tmp_path / "retain.jsonl"), "--starting_model_epochs", "2", "--strategy", "grad_diff", "--max_steps",
        "2", "--output_dir", str(out), "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
        "--use_cpu", "--coreset", "loss", "--coreset_kwargs", '{"score": "el2n"}', "--coreset_fraction", "0.1",
    ]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / "coreset.json").read_text())
    assert record["sides"]["retain"]["kept"] == 4 and record["sides"]["retain"]["features"] == "el2n"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*argv[:-6], "--coreset", "hearding", "--output_dir", str(tmp_path / "other")])
    assert exit_.value.code == 2
    assert "erasus-hf: error: Unknown coreset selector 'hearding'; did you mean 'herding'?" in capsys.readouterr().err
