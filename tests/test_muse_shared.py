"""MUSE on real data: the MUSE-News slice beside the checkout (``../shared/data/muse/news``, Hub layout; see that
folder's ``README.md``). Skipped when the slice is absent.

The PrivLeak test trains tiny Llamas from scratch on the slice's own texts: a "target" model on the privleak forget
and retain texts (it memorises the forget set), "retain" models on the retain texts only (two seeds: a retrain and a
second, retrain-like run) and one on the holdout and retain texts (the forget set looks *less* familiar than the
holdout: the over-unlearning direction). Each text is cut to the evaluator's ``max_length`` tokens, the same cut the
evaluator scores. Measured (AUC = forget-vs-holdout Min-40% AUC): target 1.0, retain seeds 0 / 1: 0.484 / 0.546,
holdout-trained 0.0, so PrivLeak -100, -11.9 and +93.9 against the seed-0 retain model (the old formula gave +106,
+12.6 and -100).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from erasus_hf.data.muse import GITHUB_SPLIT_NAMES, MUSE_PARTS, MUSEDataset, shared_muse_dir
from erasus_hf.evaluation.muse import MUSEEvaluator
from erasus_hf.modeling.tiny import build_tiny_llama, train_tokenizer

NEWS = shared_muse_dir("news")
pytestmark = pytest.mark.skipif(
    NEWS is None, reason="the MUSE-News slice (../shared/data/muse/news beside this checkout) is not on this machine"
)

MAX_LENGTH = 64
"""Tokens per privleak text, in training and in scoring."""


@pytest.fixture(scope="module")
def news() -> MUSEDataset:
    return MUSEDataset.load("news", data_dir=NEWS)


def test_loader_on_the_news_slice(news):
    assert news.corpus == "news"
    assert news.verbmem_forget.column_names == ["prompt", "gt"] and len(news.verbmem_forget) == 40
    for part in ("knowmem_forget_qa", "knowmem_retain_qa"):
        assert getattr(news, part).column_names == ["question", "answer"] and len(getattr(news, part)) == 40
    assert len(news.knowmem_forget_qa_icl) == 10 and len(news.knowmem_retain_qa_icl) == 10
    for part in ("privleak_forget", "privleak_holdout", "privleak_retain"):
        assert getattr(news, part).column_names == ["text"] and len(getattr(news, part)) == 40
    assert news.knowmem_forget_qa[0] == {
        "question": "What year did the Orkney Islands become part of Scotland?",
        "answer": "1472",
    }
    small = news.select(5)
    assert len(small.privleak_retain) == 5 and len(small.knowmem_retain_qa_icl) == 10


def _github_copy(root: Path) -> Path:
    """The slice as MUSE's GitHub ``data/news`` folder holds it: JSON arrays, the retain splits named ``retain2*``,
    the privleak files arrays of plain strings."""
    for config, split, _ in [*MUSE_PARTS.values(), ("privleak", "retain", ())]:
        rows = [json.loads(line) for line in (NEWS / config / f"{split}.json").read_text().splitlines() if line]
        if config == "privleak":
            rows = [row["text"] for row in rows]
        path = root / config / f"{GITHUB_SPLIT_NAMES.get((config, split), split)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows))
    return root


def test_github_layout_loads_the_same_rows(news, tmp_path):
    github = _github_copy(tmp_path / "news")
    assert (github / "knowmem/retain2_qa_icl.json").is_file() and not (github / "knowmem/retain_qa.json").exists()
    loaded = MUSEDataset.load("news", data_dir=github)
    for part in [*MUSE_PARTS, "privleak_retain"]:
        assert getattr(loaded, part).to_list() == getattr(news, part).to_list(), part

    shutil.copy(NEWS / "privleak/retain.json", github / "privleak/retain.json")  # both namings of one split
    with pytest.raises(ValueError, match=r"privleak/retain\.json.*privleak/retain2\.json"):
        MUSEDataset.load("news", data_dir=github)


def _train_lm(tokenizer, texts: list[str], seed: int, epochs: int = 20) -> torch.nn.Module:
    """A tiny Llama trained from scratch on the first `MAX_LENGTH` tokens of each text (AdamW, batches of 16)."""
    model = build_tiny_llama(tokenizer, max_position_embeddings=2048, seed=seed)  # verbmem prompts are ~1.6k tokens
    ids = torch.tensor([tokenizer(t, truncation=True, max_length=MAX_LENGTH)["input_ids"] for t in texts])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(ids), generator=order).split(16):
            loss = model(input_ids=ids[batch], labels=ids[batch]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def test_privleak_sign_on_the_news_slice(news):
    forget, holdout, retain = (list(getattr(news, f"privleak_{s}")["text"]) for s in ("forget", "holdout", "retain"))
    assert min(len(t) for t in forget + holdout + retain) > 1000  # every text is cut to MAX_LENGTH tokens
    tokenizer = train_tokenizer(forget + holdout + retain, vocab_size=1024)
    # Generation metrics on 4 rows (they are not what this test checks), PrivLeak on all 40 + 40 texts.
    data = replace(news.select(4), privleak_forget=news.privleak_forget, privleak_holdout=news.privleak_holdout)
    evaluator = MUSEEvaluator(
        data, max_new_tokens_verbmem=4, max_new_tokens_knowmem=4, max_length=MAX_LENGTH, batch_size=40
    )

    retrained = _train_lm(tokenizer, retain, seed=0)
    reference = evaluator.evaluate(retrained, tokenizer)
    assert 0.3 < reference.summary["muse/privleak_auc"] < 0.7  # it never saw either set

    target = evaluator.evaluate(_train_lm(tokenizer, forget + retain, seed=0), tokenizer, reference)
    assert target.summary["muse/privleak"] < -90  # memorised: MUSE's target models sit near -100
    assert target.summary["muse/privleak_auc"] > 0.95 and target.summary["muse/privleak_auc_flipped"] < 0.05

    itself = evaluator.evaluate(retrained, tokenizer, reference)
    assert itself.summary["muse/privleak"] == pytest.approx(0.0, abs=1e-9)
    retrain_like = evaluator.evaluate(_train_lm(tokenizer, retain, seed=1), tokenizer, reference)
    assert abs(retrain_like.summary["muse/privleak"]) < 40  # measured -11.9

    over = evaluator.evaluate(_train_lm(tokenizer, holdout + retain, seed=0), tokenizer, reference)
    assert over.summary["muse/privleak"] > 50  # the forget set now looks less familiar than unseen text
