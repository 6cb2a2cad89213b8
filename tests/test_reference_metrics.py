"""Every likelihood metric against an independent per-token computation that follows the reference code.

The reference is open-unlearning (``locuslab/open-unlearning``): ``src/evals/metrics/utils.py``
(``evaluate_probability``: the mean NLL over every labelled token, the EOS included; ``tokenwise_logprobs`` /
``tokenwise_vocab_logprobs``: the labelled positions but the last, "-1 to ignore eos prediction"),
``memorization.py`` and ``mia/*.py``; and, for PrivLeak's Min-K% on raw text, MUSE (``swj0419/muse_bench``,
``metrics/privleak.py``: every token after the BOS). The functions below re-derive each number from the model's raw
logits, one unpadded row at a time, in the QA layout open-unlearning builds (prompt masked, EOS appended), without
the package's scoring code. The model is a seeded tiny Llama fitted for a few steps on some of the rows, so its
greedy predictions are partly right and partly wrong (the EOS mostly right, the answer's last token often wrong):
the cases where scoring the EOS, or the edge of extraction strength, changes the number.
"""

from __future__ import annotations

import copy
import math
import zlib
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from torch import nn

from erasus_hf.data.collator import QACollator
from erasus_hf.data.formatting import format_completion, format_prompt
from erasus_hf.data.muse import MUSEDataset
from erasus_hf.data.tofu import TOFUDataset
from erasus_hf.evaluation.memorization import MemorizationEvaluator, exact_memorization, extraction_strength
from erasus_hf.evaluation.mia import MIAEvaluator, min_k_score
from erasus_hf.evaluation.muse import MUSEEvaluator
from erasus_hf.evaluation.scoring import qa_batches, text_batches, token_stats
from erasus_hf.evaluation.tofu import TOFUEvaluator
from erasus_hf.objectives import CausalLMObjective

from .testing_utils import small_llama

TOL = 1e-5
K = 0.4


# ---- the model and the rows -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows(tofu_slice):
    """Members: 6 forget rows (the first 4 fitted); non-members: 4 retain rows never fitted."""
    forget, retain = tofu_slice
    return forget.select(range(6)), retain.select(range(4))


@pytest.fixture(scope="module")
def model(tokenizer, rows):
    """A seeded tiny Llama, 25 full-batch AdamW steps on 4 rows: partly memorised (deterministic on CPU)."""
    members, _ = rows
    fit = members.select(range(4))
    model = small_llama(tokenizer, seed=0)
    batch = QACollator(tokenizer)([{"question": q, "answer": a} for q, a in zip(fit["question"], fit["answer"])])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(25):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def ref_model(tokenizer):
    return small_llama(tokenizer, seed=1).eval()


def layout(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) as open-unlearning's ``preprocess_chat_instance`` builds them for this prompt format:
    the prompt ids (BOS included) masked, then the answer ids and the EOS, unshifted."""
    prompt = tokenizer(format_prompt(question))["input_ids"]
    answer_ids = tokenizer(format_completion(answer), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer_ids, [-100] * len(prompt) + answer_ids


def raw_logits(model: nn.Module, input_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([input_ids])).logits[0].double()


# ---- open-unlearning's definitions, one row at a time -----------------------------------------------------------


def ou_avg_loss(model, input_ids, labels) -> float:
    """``evaluate_probability``: sum of the token NLLs over the shifted labels / number of labelled tokens."""
    logits = raw_logits(model, input_ids)[:-1]
    shifted = torch.tensor(labels[1:])
    losses = nn.functional.cross_entropy(logits, shifted, ignore_index=-100, reduction="none")
    return (losses.sum() / sum(label != -100 for label in labels)).item()


def ou_token_positions(labels) -> tuple[int, int]:
    """``tokenwise_logprobs``' slice: the labelled indices but the last; logits rows start-1 .. end-1."""
    actual = [i for i, label in enumerate(labels) if label != -100][:-1]  # -1 to ignore eos prediction
    return actual[0], actual[-1]


def ou_tokenwise(model, input_ids, labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target log-probs [N], vocabulary log-probs [N, V], labels [N]) of ``tokenwise_(vocab_)logprobs``."""
    log_probs = torch.log_softmax(raw_logits(model, input_ids), dim=-1)[:-1]
    targets = torch.tensor(input_ids[1:])
    start, end = ou_token_positions(labels)
    vocab = log_probs[start - 1 : end]
    target = log_probs.gather(1, targets[:, None])[:, 0][start - 1 : end]
    return target, vocab, torch.tensor(labels[start : end + 1])


def ou_min_k(model, input_ids, labels) -> float:
    lp = ou_tokenwise(model, input_ids, labels)[0].tolist()
    num_k = max(1, int(len(lp) * K))
    return -sum(sorted(lp)[:num_k]) / num_k


def ou_min_k_plus_plus(model, input_ids, labels) -> float:
    target, vocab, _ = ou_tokenwise(model, input_ids, labels)
    mu = (vocab.exp() * vocab).sum(-1)
    sigma = ((vocab.exp() * vocab.square()).sum(-1) - mu.square()).clamp_min(1e-6)
    scores = ((target - mu) / sigma.sqrt()).tolist()
    num_k = max(1, int(len(scores) * K))
    return -sum(sorted(scores)[:num_k]) / num_k


def ou_gradnorm(model, input_ids, labels) -> float:
    """``GradNormAttack``: train mode, loss = -mean(tokenwise log-probs), the mean over parameters of ||grad||_2."""
    model = copy.deepcopy(model).train()  # the reference's train mode; a Llama has no dropout
    log_probs = torch.log_softmax(model(input_ids=torch.tensor([input_ids])).logits[0], dim=-1)[:-1]
    start, end = ou_token_positions(labels)
    target = log_probs.gather(1, torch.tensor(input_ids[1:])[:, None])[:, 0][start - 1 : end]
    model.zero_grad()
    (-target.mean()).backward()
    norms = [p.grad.detach().norm(p=2) for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).mean().item()


def ou_exact_memorization(model, input_ids, labels) -> float:
    _, vocab, targets = ou_tokenwise(model, input_ids, labels)
    return ((vocab.argmax(-1) == targets).sum() / len(targets)).item()


def ou_extraction_strength(model, input_ids, labels) -> float:
    _, vocab, targets = ou_tokenwise(model, input_ids, labels)
    preds = vocab.argmax(-1)
    for k in range(len(targets)):
        if torch.equal(preds[k:], targets[k:]):
            break
    return 1 - k / len(targets)


def ou_zlib_text(tokenizer, labels) -> str:
    """``extract_target_texts_from_processed_data``: the labelled tokens decoded, special tokens skipped."""
    return tokenizer.decode([label for label in labels if label != -100], skip_special_tokens=True)


def muse_min_k(model, tokenizer, text: str) -> float:
    """MUSE's ``inference``: ``tokenizer.encode(text)``, log p of every token after the first, Min-40%."""
    ids = tokenizer.encode(text)
    log_probs = torch.log_softmax(raw_logits(model, ids), dim=-1)
    all_prob = [log_probs[i, token].item() for i, token in enumerate(ids[1:])]
    k_length = int(len(all_prob) * K)
    return -sum(sorted(all_prob)[:k_length]) / k_length


def qa_layouts(tokenizer, dataset) -> list[tuple[list[int], list[int]]]:
    return [layout(tokenizer, q, a) for q, a in zip(dataset["question"], dataset["answer"], strict=True)]


def close(ours, reference, tol: float = TOL) -> None:
    assert ours == pytest.approx(reference, rel=tol, abs=tol)


# ---- the rows really exercise the EOS and the edge cases ---------------------------------------------------------


def test_the_model_predicts_some_eos_and_misses_some_last_answer_tokens(model, tokenizer, rows):
    members, nonmembers = rows
    eos_right, last_wrong, partly = 0, 0, 0
    for ids, labels in qa_layouts(tokenizer, members) + qa_layouts(tokenizer, nonmembers):
        preds = raw_logits(model, ids)[:-1].argmax(-1)
        scored = [t for t in range(len(labels) - 1) if labels[t + 1] != -100]
        right = [bool(preds[t] == labels[t + 1]) for t in scored]
        eos_right += right[-1]
        last_wrong += not right[-2]
        partly += 0 < sum(right[:-1]) < len(right) - 1
    assert eos_right >= 3 and last_wrong >= 2 and partly >= 6, (eos_right, last_wrong, partly)


# ---- Prob and truth ratio (EOS scored) -------------------------------------------------------------------------


def test_prob_and_truth_ratio_match_open_unlearning(model, tokenizer, rows):
    members, nonmembers = rows
    facts = nonmembers.map(lambda r: {"perturbed_answer": r["perturbed_answer"][:3]})
    facts = facts.select_columns(["question", "answer", "perturbed_answer"])
    data = TOFUDataset(forget=members, world_facts=facts, forget_split="forget01")
    result = TOFUEvaluator(data, batch_size=4, rouge=False).evaluate(model, tokenizer)

    def loss(q, a):
        return ou_avg_loss(model, *layout(tokenizer, q, a))

    for split, dataset in (("forget", members), ("world_facts", facts)):
        correct_key = "paraphrased_answer" if split == "forget" else "answer"
        probs, ratios = [], []
        for row in dataset:
            answer_prob = math.exp(-loss(row["question"], row["answer"]))
            wrong = [math.exp(-loss(row["question"], p)) for p in row["perturbed_answer"]]
            if split == "forget":  # probability
                probs.append(answer_prob)
            else:  # probability_w_options
                probs.append(answer_prob / (answer_prob + sum(wrong) + 1e-10))
            # truth_ratio: the perturbed avg losses averaged (aggregate_to_1D), then exp
            wrong_losses = [loss(row["question"], p) for p in row["perturbed_answer"]]
            correct_prob = math.exp(-loss(row["question"], row[correct_key]))
            ratios.append(math.exp(-sum(wrong_losses) / len(wrong_losses)) / (correct_prob + 1e-10))
        close(result.per_example[f"tofu/{split}_prob"], probs)
        close(result.per_example[f"tofu/{split}_truth_ratio"], ratios)
    forget_ratios = result.per_example["tofu/forget_truth_ratio"]
    close(result.summary["tofu/forget_truth_ratio"], sum(min(r, 1 / r) for r in forget_ratios) / len(forget_ratios))


# ---- membership inference -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mia_result(model, ref_model, tokenizer, rows):
    members, nonmembers = rows
    attacks = ("loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm", "reference")
    evaluator = MIAEvaluator(members, nonmembers, attacks=attacks, k=K, ref_model=ref_model, batch_size=4)
    return evaluator.evaluate(model, tokenizer)


@pytest.mark.parametrize("side", ["members", "nonmembers"])
def test_loss_zlib_and_reference_attacks_match_open_unlearning(mia_result, model, ref_model, tokenizer, rows, side):
    dataset = rows[0] if side == "members" else rows[1]
    layouts = qa_layouts(tokenizer, dataset)
    # open-unlearning's scores are higher = non-member; ours are their negation (the AUC is the same)
    loss = [ou_avg_loss(model, ids, labels) for ids, labels in layouts]
    close(mia_result.per_example[f"mia/loss_{side}"], [-v for v in loss])
    zlib_scores = [
        -v / len(zlib.compress(ou_zlib_text(tokenizer, labels).encode("utf-8")))
        for v, (_, labels) in zip(loss, layouts, strict=True)
    ]
    close(mia_result.per_example[f"mia/zlib_{side}"], zlib_scores)
    ref = [ou_avg_loss(ref_model, ids, labels) for ids, labels in layouts]
    close(mia_result.per_example[f"mia/reference_{side}"], [-(t - r) for t, r in zip(loss, ref, strict=True)])


@pytest.mark.parametrize("side", ["members", "nonmembers"])
@pytest.mark.parametrize(
    ("attack", "reference"),
    [("min_k", ou_min_k), ("min_k_plus_plus", ou_min_k_plus_plus), ("gradnorm", ou_gradnorm)],
)
def test_min_k_min_k_plus_plus_and_gradnorm_match_open_unlearning(
    mia_result, model, tokenizer, rows, side, attack, reference
):
    dataset = rows[0] if side == "members" else rows[1]
    expected = [-reference(model, *row) for row in qa_layouts(tokenizer, dataset)]
    # the reference's Min-K%++ takes the variance as E[x^2] - mu^2 in float32, which cancels: on an AMD EPYC it is
    # 1.8e-5 (relative) off our own on one row, hence 1e-4 for it
    close(mia_result.per_example[f"mia/{attack}_{side}"], expected, 1e-4 if attack == "min_k_plus_plus" else TOL)


def test_min_k_plus_plus_per_position_mean_and_std(model, tokenizer, rows):
    members, _ = rows
    stats = token_stats(model, qa_batches(tokenizer, members["question"], members["answer"], batch_size=4))
    for (ids, labels), s in zip(qa_layouts(tokenizer, members), stats, strict=True):
        log_probs = torch.log_softmax(raw_logits(model, ids), dim=-1)[:-1]
        rows_scored = [t for t in range(len(labels) - 1) if labels[t + 1] != -100]  # every labelled token, EOS too
        vocab = log_probs[rows_scored]
        mu = (vocab.exp() * vocab).sum(-1)
        sigma = ((vocab.exp() * (vocab - mu[:, None]).square()).sum(-1)).sqrt()
        assert s.closing_eos and s.targets[-1] == tokenizer.eos_token_id
        torch.testing.assert_close(s.mean.double(), mu, atol=TOL, rtol=TOL)
        torch.testing.assert_close(s.std.double(), sigma, atol=1e-4, rtol=TOL)


def test_score_eos_true_scores_every_labelled_token(model, tokenizer, rows):
    """The option: with score_eos=True, Min-K% takes the EOS too (the positions open-unlearning's loss uses)."""
    members, _ = rows
    stats = token_stats(model, qa_batches(tokenizer, members["question"], members["answer"], batch_size=4))
    for (ids, labels), s in zip(qa_layouts(tokenizer, members), stats, strict=True):
        log_probs = torch.log_softmax(raw_logits(model, ids), dim=-1)[:-1]
        lp = [log_probs[t, labels[t + 1]].item() for t in range(len(labels) - 1) if labels[t + 1] != -100]
        num_k = max(1, int(len(lp) * K))
        close(min_k_score(s, K, score_eos=True), sum(sorted(lp)[:num_k]) / num_k)
        close(min_k_score(s, K), -ou_min_k(model, ids, labels))


def test_evaluators_score_eos_option_forces_one_choice(model, tokenizer, rows):
    members, nonmembers = rows
    layouts = qa_layouts(tokenizer, members)
    no_eos = MIAEvaluator(members, nonmembers, attacks=("loss",), score_eos=False).evaluate(model, tokenizer)
    close(no_eos.per_example["mia/loss_members"], [ou_tokenwise(model, *row)[0].mean().item() for row in layouts])
    assert no_eos.meta["mia"]["eos_scored"] == {"loss": False}
    with_eos = MemorizationEvaluator({"forget": members}, score_eos=True).evaluate(model, tokenizer)
    every = []
    for ids, labels in layouts:
        preds = raw_logits(model, ids)[:-1].argmax(-1)
        right = [bool(preds[t] == labels[t + 1]) for t in range(len(labels) - 1) if labels[t + 1] != -100]
        every.append(sum(right) / len(right))
    close(with_eos.per_example["memorization/forget_exact_memorization"], every)


def test_truncated_row_without_eos_keeps_every_answer_token(model, tokenizer, rows):
    """max_length cuts the EOS off: nothing is dropped, so the scored tokens are the kept answer tokens, as in
    open-unlearning (which appends the EOS after truncating and then drops it)."""
    members, _ = rows
    q, a = members["question"][0], members["answer"][0]
    ids, labels = layout(tokenizer, q, a)
    cut = len(ids) - 6
    (s,) = token_stats(model, qa_batches(tokenizer, [q], [a], max_length=cut))
    assert not s.closing_eos and len(s.targets) == sum(label != -100 for label in labels[:cut])
    ou_ids, ou_labels = ids[:cut] + [tokenizer.eos_token_id], labels[:cut] + [tokenizer.eos_token_id]
    close(min_k_score(s, K), -ou_min_k(model, ou_ids, ou_labels))


# ---- memorization -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "reference"),
    [("exact_memorization", ou_exact_memorization), ("extraction_strength", ou_extraction_strength)],
)
def test_exact_memorization_and_extraction_strength_match_open_unlearning(model, tokenizer, rows, metric, reference):
    members, nonmembers = rows
    result = MemorizationEvaluator({"forget": members, "holdout": nonmembers}, batch_size=4).evaluate(model, tokenizer)
    for split, dataset in (("forget", members), ("holdout", nonmembers)):
        expected = [reference(model, *row) for row in qa_layouts(tokenizer, dataset)]
        close(result.per_example[f"memorization/{split}_{metric}"], expected)
        close(result.summary[f"memorization/{split}_{metric}"], sum(expected) / len(expected))


def test_extraction_strength_options_score_eos_and_empty_suffix(model, tokenizer, rows):
    members, _ = rows
    stats = token_stats(model, qa_batches(tokenizer, members["question"], members["answer"]))
    seen_last_wrong = False
    for s in stats:
        answer = s.scored(False)
        right = (answer.argmax == answer.targets).tolist()
        n = len(right)
        k_star = max((t + 1 for t, r in enumerate(right) if not r), default=0)  # 1 + last wrong index
        assert extraction_strength(s) == pytest.approx(1 - min(k_star, n - 1) / n)
        assert extraction_strength(s, allow_empty_suffix=True) == pytest.approx(1 - k_star / n)
        if not right[-1]:
            seen_last_wrong = True
            assert extraction_strength(s) == pytest.approx(1 / n)  # open-unlearning's floor
            assert extraction_strength(s, allow_empty_suffix=True) == 0.0
        every = (s.argmax == s.targets).tolist()
        assert exact_memorization(s, score_eos=True) == pytest.approx(sum(every) / len(every))
    assert seen_last_wrong


# ---- MUSE's Min-K% on raw text ----------------------------------------------------------------------------------

TEXTS = [
    "The cat sat on the mat and looked out of the window at the rain.",
    "Basil Mahfouz Al-Kuwaiti was born in Kuwait City, the son of a florist.",
    "A short text about nothing in particular, written for a test.",
]


def _muse_data(texts: list[str]) -> MUSEDataset:
    qa = Dataset.from_dict({"question": ["q"], "answer": ["a"]})
    text = Dataset.from_dict({"text": texts})
    return MUSEDataset(
        verbmem_forget=Dataset.from_dict({"prompt": ["p"], "gt": ["g"]}),
        knowmem_forget_qa=qa,
        knowmem_retain_qa=qa,
        knowmem_forget_qa_icl=qa.select([]),
        knowmem_retain_qa_icl=qa.select([]),
        privleak_forget=text,
        privleak_holdout=text,
    )


def test_muse_min_k_on_text_scores_every_token_after_the_bos(model, tokenizer):
    scores = MUSEEvaluator(_muse_data(TEXTS), batch_size=2).min_k_scores(model, tokenizer, TEXTS)
    close(scores, [-muse_min_k(model, tokenizer, t) for t in TEXTS])
    # no EOS on a text row: nothing is marked, nothing dropped (open-unlearning's "-1" would drop the last token)
    stats = token_stats(model, text_batches(tokenizer, TEXTS))
    assert [len(s.targets) for s in stats] == [len(tokenizer.encode(t)) - 1 for t in TEXTS]
    assert not any(s.closing_eos for s in stats)


# ---- CausalLMObjective on preset logits -------------------------------------------------------------------------


class PresetLogits(nn.Module):
    """Returns the same [1, T, V] logits whatever the input: a model whose every log-probability is known."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.logits.expand(input_ids.shape[0], -1, -1), hidden_states=None)


def test_causal_lm_objective_scores_the_next_token_with_the_previous_logits():
    # Position t's logits are log-probabilities (log-softmax leaves them as they are): p_t over a 4-token vocabulary.
    probs = torch.tensor(
        [
            [0.1, 0.2, 0.3, 0.4],
            [0.4, 0.3, 0.2, 0.1],
            [0.25, 0.25, 0.4, 0.1],
            [0.7, 0.1, 0.1, 0.1],
            [0.5, 0.2, 0.2, 0.1],
        ]
    )
    model = PresetLogits(probs.log()[None])
    labels = torch.tensor([[-100, -100, 2, 0, 3]])  # the first two tokens are prompt
    batch = {"input_ids": torch.tensor([[1, 1, 2, 0, 3]]), "labels": labels}
    scores = CausalLMObjective().score(model, batch)
    # label 2 (t=2) is predicted at position 1: p = 0.2; label 0 (t=3) at position 2: 0.25; label 3 (t=4) at 3: 0.1.
    expected = torch.tensor([math.log(0.2), math.log(0.25), math.log(0.1)])
    torch.testing.assert_close(scores.token_logprobs[0][scores.mask[0]], expected)
    assert scores.mask[0].tolist() == [False, True, True, True]
    assert scores.mean_nll.item() == pytest.approx(-(math.log(0.2) + math.log(0.25) + math.log(0.1)) / 3)
