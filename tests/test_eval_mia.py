"""Membership-inference scores: hand computations on constructed TokenStats, token_stats against a direct full-vocab
computation, GradNorm against an independent backward, and the attacks on a model that memorised its forget set."""

from __future__ import annotations

import copy
import math
import zlib

import pytest
import torch
from datasets import Dataset

from erasus_hf.data.collator import QACollator
from erasus_hf.data.formatting import format_completion
from erasus_hf.data.tofu import load_tofu
from erasus_hf.evaluation.mia import (
    ATTACKS,
    MIAEvaluator,
    auc,
    gradnorm_scores,
    loss_score,
    min_k_plus_plus_score,
    min_k_score,
    reference_score,
    zlib_score,
)
from erasus_hf.evaluation.scoring import TokenStats, qa_batches, token_stats


def stats_from_logprobs(logprobs: list[float]) -> TokenStats:
    """TokenStats whose only meaningful field is `logprobs` (for the scores that read nothing else)."""
    n = len(logprobs)
    zeros = torch.zeros(n, dtype=torch.long)
    return TokenStats(torch.tensor(logprobs), zeros, zeros, torch.zeros(n), torch.ones(n))


# ---- hand computations -------------------------------------------------------------------------------------------

# A 3-token vocabulary, 3 positions: the model's next-token distribution at each position and the observed token.
DISTRIBUTIONS = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.7, 0.2, 0.1]]
OBSERVED = [0, 2, 1]


def hand_min_k_plus_plus_tokens() -> list[float]:
    """(log p(y_t) - mu_t) / sigma_t written out from the probabilities: mu = sum_z p log p, sigma^2 = sum_z p
    (log p - mu)^2 (the centred form, not the E[x^2] - mu^2 form `token_stats` uses)."""
    out = []
    for probs, y in zip(DISTRIBUTIONS, OBSERVED, strict=True):
        mu = sum(p * math.log(p) for p in probs)
        sigma = math.sqrt(sum(p * (math.log(p) - mu) ** 2 for p in probs))
        out.append((math.log(probs[y]) - mu) / sigma)
    return out


def test_min_k_plus_plus_matches_hand_computation_on_three_token_vocabulary():
    logp = torch.tensor(DISTRIBUTIONS).log()
    mean = (logp.exp() * logp).sum(-1)
    std = ((logp.exp() * logp.square()).sum(-1) - mean.square()).sqrt()
    stats = TokenStats(
        logprobs=logp[torch.arange(3), torch.tensor(OBSERVED)],
        targets=torch.tensor(OBSERVED),
        argmax=logp.argmax(-1),
        mean=mean,
        std=std,
    )
    z = sorted(hand_min_k_plus_plus_tokens())
    # position 1 by hand: mu = .5 ln .5 + .3 ln .3 + .2 ln .2 = -1.02965, sigma^2 = .5 (.33651)^2 + .3 (-.17432)^2
    # + .2 (-.57979)^2 = .13296, sigma = .36464, z = (ln .5 + 1.02965) / .36464 = 0.92284
    assert hand_min_k_plus_plus_tokens()[0] == pytest.approx(0.92284, abs=1e-4)
    assert min_k_plus_plus_score(stats, k=0.34) == pytest.approx(z[0], abs=1e-5)  # int(3 * .34) = 1 token
    assert min_k_plus_plus_score(stats, k=0.67) == pytest.approx((z[0] + z[1]) / 2, abs=1e-5)  # 2 tokens
    assert min_k_plus_plus_score(stats, k=1.0) == pytest.approx(sum(z) / 3, abs=1e-5)


def test_min_k_selects_the_lowest_tokens():
    stats = stats_from_logprobs([-0.1, -2.0, -0.5, -1.0, -3.0])
    assert min_k_score(stats, k=0.2) == pytest.approx(-3.0)  # 1 token
    assert min_k_score(stats, k=0.3) == pytest.approx(-3.0)  # int(1.5) = 1 token
    assert min_k_score(stats, k=0.4) == pytest.approx(-2.5)  # 2 tokens: (-3 - 2) / 2
    assert min_k_score(stats_from_logprobs([-4.0]), k=0.1) == pytest.approx(-4.0)  # at least one token
    with pytest.raises(ValueError, match="k is a fraction"):
        min_k_score(stats, k=0.0)


def test_loss_and_reference_scores():
    target = stats_from_logprobs([-1.0, -2.0, -3.0])  # mean NLL 2
    ref = stats_from_logprobs([-0.5, -0.5, -0.5])  # mean NLL 0.5
    assert loss_score(target) == pytest.approx(-2.0)
    assert reference_score(target, ref) == pytest.approx(-(2.0 - 0.5))


def test_zlib_score_on_known_strings():
    stats = stats_from_logprobs([-1.0, -1.2, -1.4])  # mean NLL 1.2
    # zlib("abc"): 2-byte header + deflate (3 header bits + 3 fixed-Huffman literals of 8 bits + 7-bit end of block
    # = 34 bits -> 5 bytes) + 4-byte Adler-32 = 11 bytes.
    assert zlib_score(stats, "abc") == pytest.approx(-1.2 / 11)
    # 100 repeated bytes compress to 12, not ~100: the score divides by the compressed length.
    assert zlib_score(stats, "a" * 100) == pytest.approx(-1.2 / 12)
    with pytest.raises(ValueError, match="non-empty"):
        zlib_score(stats, "")


def test_auc_perfect_reversed_and_ties():
    assert auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert auc([1.0, 1.0], [1.0, 1.0]) == 0.5
    assert auc([2.0, 0.0], [1.0]) == 0.5  # one member above, one below the non-member
    with pytest.raises(ValueError, match="at least one member"):
        auc([], [1.0])


def test_token_stats_match_direct_full_vocabulary_computation(tiny_llama, tokenizer, tofu_slice):
    forget, _ = tofu_slice
    questions, answers = forget["question"][:3], forget["answer"][:3]
    stats = token_stats(tiny_llama, qa_batches(tokenizer, questions, answers, batch_size=3))
    collator = QACollator(tokenizer)
    for q, a, s in zip(questions, answers, stats, strict=True):
        row = collator.tokenize({"question": q, "answer": a})  # one unpadded example
        with torch.no_grad():
            logits = tiny_llama(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].double()
        targets = torch.tensor(row["labels"][1:])
        scored = targets != -100
        logp = torch.log_softmax(logits[scored], dim=-1)
        mean = (logp.exp() * logp).sum(-1)
        std = (logp.exp() * (logp - mean[:, None]).square()).sum(-1).sqrt()
        assert torch.equal(s.targets, targets[scored])
        assert torch.equal(s.argmax, logits[scored].argmax(-1))
        torch.testing.assert_close(
            s.logprobs.double(), logp.gather(-1, targets[scored][:, None])[:, 0], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(s.mean.double(), mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(s.std.double(), std, atol=1e-4, rtol=0)


# ---- GradNorm ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reduction", "score_eos"), [("mean", False), ("global", False), ("mean", True), ("global", True)]
)
def test_gradnorm_equals_independent_backward(tiny_llama, tokenizer, tofu_slice, reduction, score_eos):
    forget, _ = tofu_slice
    questions, answers = forget["question"][:2], forget["answer"][:2]  # different lengths: padding is stripped
    batches = qa_batches(tokenizer, questions, answers, batch_size=2)
    scores = gradnorm_scores(tiny_llama, batches, score_eos=score_eos, reduction=reduction)
    collator = QACollator(tokenizer)
    expected = []
    for q, a in zip(questions, answers, strict=True):
        row = collator.tokenize({"question": q, "answer": a})
        labels = row["labels"] if score_eos else row["labels"][:-1] + [-100]  # the EOS is the last label
        model = copy.deepcopy(tiny_llama).eval()
        loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([labels])).loss
        loss.backward()
        norms = [p.grad.norm().item() for p in model.parameters()]
        expected.append(-(sum(norms) / len(norms) if reduction == "mean" else math.sqrt(sum(n * n for n in norms))))
    assert scores == pytest.approx(expected, rel=1e-4)
    assert expected[0] != pytest.approx(expected[1], rel=1e-3)


def test_gradnorm_rejects_bad_options(tiny_llama, tokenizer, tofu_slice):
    forget, retain = tofu_slice
    batches = list(qa_batches(tokenizer, forget["question"][:1], forget["answer"][:1]))
    with pytest.raises(ValueError, match=r"reduction must be one of \['mean', 'global'\]"):
        gradnorm_scores(tiny_llama, batches, reduction="sum")
    with pytest.raises(ValueError, match="p must be 1, 2 or math.inf"):
        gradnorm_scores(tiny_llama, batches, p=3)
    with pytest.raises(ValueError, match="gradnorm_reduction must be one of"):
        MIAEvaluator(forget, retain, gradnorm_reduction="max")


def test_gradnorm_leaves_parameters_grads_and_mode_unchanged(memorised, tokenizer, tofu_slice):
    forget, _ = tofu_slice
    model = memorised
    frozen = model.get_input_embeddings().weight
    frozen.requires_grad_(False)  # a mixed set of flags, to check each is restored
    flags = [p.requires_grad for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    for training in (True, False):
        model.train(training)
        scores = gradnorm_scores(model, qa_batches(tokenizer, forget["question"][:4], forget["answer"][:4], 2))
        assert len(scores) == 4 and all(s < 0 for s in scores)
        assert model.training is training
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    # an error mid-way restores the flags too
    batch = next(qa_batches(tokenizer, forget["question"][:1], forget["answer"][:1]))
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no scored token"):
        gradnorm_scores(model, [batch])
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


# ---- the evaluator ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unseen_authors(tofu_slice):
    """40 TOFU rows of demo_retain authors 2 and 3: the `memorised` model trained on authors 0-1 and 198-199 only."""
    _, retain = tofu_slice
    rows = load_tofu("demo_retain")
    rows = rows.filter(lambda author: author >= 2, input_columns="author").select(range(40))
    assert not set(rows["author"]) & set(retain["author"])
    return rows


def test_mia_on_memorised_model_separates_forget_from_unseen(
    memorised, tiny_llama, tokenizer, tofu_slice, unseen_authors
):
    forget, _ = tofu_slice
    likelihood_attacks = tuple(a for a in ATTACKS if a != "gradnorm")
    evaluator = MIAEvaluator(forget, unseen_authors, attacks=likelihood_attacks, ref_model=tiny_llama, batch_size=20)
    result = evaluator.evaluate(memorised, tokenizer)
    eos = result.meta["mia"]["eos_scored"]
    assert eos == {"loss": True, "zlib": True, "min_k": False, "min_k_plus_plus": False, "reference": True}
    # GradNorm costs a backward per example: 10 members against 10 non-members.
    grad = MIAEvaluator(forget.select(range(10)), unseen_authors.select(range(10)), attacks=("gradnorm",))
    result.update(grad.evaluate(memorised, tokenizer))
    assert set(result.summary) == {f"mia/{a}_auc" for a in ATTACKS}
    for attack in likelihood_attacks:
        assert len(result.per_example[f"mia/{attack}_members"]) == 40
        assert len(result.per_example[f"mia/{attack}_nonmembers"]) == 40
    assert len(result.per_example["mia/gradnorm_members"]) == 10
    assert result.summary["mia/loss_auc"] > 0.9
    assert result.summary["mia/min_k_plus_plus_auc"] > 0.9
    assert result.summary["mia/gradnorm_auc"] > 0.9
    # ZLib reads the scored answer tokens decoded (" " + answer with this byte-level tokenizer): each score is the
    # LOSS score over that text's zlib length.
    for loss, zl, answer in zip(
        result.per_example["mia/loss_members"], result.per_example["mia/zlib_members"], forget["answer"], strict=True
    ):
        assert zl == pytest.approx(loss / len(zlib.compress(format_completion(answer).encode("utf-8"))))


def test_mia_on_text_rows(tiny_llama, tokenizer):
    members = Dataset.from_dict({"text": ["The cat sat on the mat.", "A short member text."]})
    nonmembers = Dataset.from_dict({"text": ["Another text entirely.", "And one more.", "Third."]})
    result = MIAEvaluator(members, nonmembers, attacks=("loss", "min_k"), name="raw").evaluate(tiny_llama, tokenizer)
    assert set(result.summary) == {"raw/loss_auc", "raw/min_k_auc"}
    assert len(result.per_example["raw/loss_members"]) == 2
    assert len(result.per_example["raw/min_k_nonmembers"]) == 3
    assert 0 <= result.summary["raw/loss_auc"] <= 1


def test_mia_evaluator_rejects_bad_input(tofu_slice, tiny_llama):
    forget, retain = tofu_slice
    with pytest.raises(ValueError, match="valid attacks are .*'loss'"):
        MIAEvaluator(forget, retain, attacks=("loss", "perplexity"))
    with pytest.raises(ValueError, match="needs ref_model"):
        MIAEvaluator(forget, retain, attacks=("loss", "reference"))
    assert "reference" not in MIAEvaluator(forget, retain).attacks  # by default only with a reference model
    assert MIAEvaluator(forget, retain, ref_model=tiny_llama).attacks[-1] == "reference"
    # any training format is scored as trained (prompt/completion here); a row of no format is refused
    MIAEvaluator(forget, Dataset.from_dict({"prompt": ["q"], "completion": ["a"]}), attacks=("loss",))
    with pytest.raises(ValueError, match=r"fit no format: they have columns \['title'\]"):
        MIAEvaluator(forget, Dataset.from_dict({"title": ["q"]}), attacks=("loss",))
    with pytest.raises(ValueError, match="members dataset is empty"):
        MIAEvaluator(forget.select([]), retain, attacks=("loss",))
