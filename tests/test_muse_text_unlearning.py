"""MUSE-style unlearning (issue 17): raw news articles as the forget side (`text` rows, cut into windows of
`max_length` tokens, every token scored), MUSE-News KnowMem question/answer pairs as the retain side, through
`UnlearningTrainer` with NPO, on the MUSE-News slice beside the checkout (``../shared/data/muse/news``, skipped when
absent).

A tiny Llama is first fitted (plain language modelling, every token) on three articles of ``raw/forget`` and on 16
``knowmem/retain_qa`` pairs until it knows them by heart; NPO on the articles, with the QA retain term, then raises
the articles' perplexity (``exp`` of the mean NLL over every scored token of their windows, MUSE's definition) while
the retain answers keep their likelihood.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset

from erasus_hf import UnlearningTrainer
from erasus_hf.data.collator import QACollator
from erasus_hf.data.formats import TextFormat
from erasus_hf.data.muse import load_muse_split, shared_muse_dir
from erasus_hf.evaluation import answer_nll
from erasus_hf.modeling.tiny import build_tiny_llama, train_tokenizer

from .testing_utils import config

NEWS = shared_muse_dir("news")
pytestmark = pytest.mark.skipif(
    NEWS is None, reason="the MUSE-News slice (../shared/data/muse/news beside this checkout) is not on this machine"
)

WINDOW = 128  # tokens per window of an article, in fitting, unlearning and scoring
N_ARTICLES = 3
MAX_ARTICLE_TOKENS = 800  # keeps the fit a few seconds long
N_RETAIN = 16


@pytest.fixture(scope="module")
def news():
    """(tokenizer, forget articles as `text` rows, retain question/answer rows)."""
    raw = load_muse_split("raw", "forget", data_dir=NEWS)
    retain = load_muse_split("knowmem", "retain_qa", data_dir=NEWS).select(range(N_RETAIN))
    tokenizer = train_tokenizer(list(raw["text"]) + list(retain["question"]) + list(retain["answer"]), 1024)
    articles = []  # the first distinct articles short enough (the slice repeats some: rows 2 and 5 are one)
    for text in raw["text"]:
        if text not in articles and len(tokenizer(text)["input_ids"]) <= MAX_ARTICLE_TOKENS:
            articles.append(text)
        if len(articles) == N_ARTICLES:
            break
    return tokenizer, Dataset.from_dict({"text": articles}), retain


def windows(tokenizer, articles: Dataset) -> list[dict]:
    return [w for row in articles for w in TextFormat().encode(tokenizer, row, WINDOW)]


def perplexity(model, tokenizer, examples: list[dict]) -> float:
    """exp(mean NLL over every scored token of `examples`)."""
    batch = QACollator(tokenizer, max_length=WINDOW)([{k: e[k] for k in ("input_ids", "labels")} for e in examples])
    model.eval()
    with torch.no_grad():
        return math.exp(model(**batch).loss.item())  # the loss is the mean over every scored token of the batch


def retain_nll(model, tokenizer, retain: Dataset) -> float:
    return answer_nll(model, tokenizer, retain["question"], retain["answer"]).mean().item()


@pytest.fixture(scope="module")
def fitted(news):
    """A tiny Llama (hidden 64) after 150 full-batch AdamW steps on every token of the articles' windows and of the
    retain pairs (about 15 s on one core)."""
    tokenizer, articles, retain = news
    examples = windows(tokenizer, articles) + [TextFormat().encode(tokenizer, row, WINDOW)[0] for row in retain]
    batch = QACollator(tokenizer, max_length=WINDOW)(
        [{"input_ids": e["input_ids"], "labels": e["input_ids"]} for e in examples]
    )
    model = build_tiny_llama(tokenizer, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize(
    ("use_peft", "lr", "min_factor"),
    # measured: articles' perplexity 1.03 -> 3.07 (LoRA) / 4.45 (full), retain answer NLL 0.002 -> 0.011 / 0.002
    [(True, 5e-3, 2.0), (False, 5e-4, 3.0)],
    ids=["lora", "full"],
)
def test_npo_on_raw_articles_raises_their_perplexity_and_keeps_retain_qa(
    tmp_path, news, fitted, use_peft, lr, min_factor
):
    tokenizer, articles, retain = news
    model = copy.deepcopy(fitted)
    forget_windows = windows(tokenizer, articles)
    before = perplexity(model, tokenizer, forget_windows), retain_nll(model, tokenizer, retain)
    assert before[0] < 1.1 and before[1] < 0.02  # fitted: it knows the articles and the answers

    args = config(
        tmp_path,
        strategy="npo",
        use_peft=use_peft,
        learning_rate=lr,
        num_train_epochs=8,
        retain_weight=4.0,
        lr_scheduler_type="constant",
        max_length=WINDOW,
    )
    trainer = UnlearningTrainer(
        model, args, forget_dataset=articles, retain_dataset=retain, processing_class=tokenizer
    )
    # the MUSE setting: raw text forgotten, question/answer pairs retained, each article in windows of WINDOW tokens
    assert trainer.row_formats == {"forget": "text", "retain": "qa"}
    cuts = [math.ceil((len(tokenizer(t)["input_ids"]) - 1) / (WINDOW - 1)) for t in articles["text"]]  # BOS each
    assert len(trainer.train_dataset.forget) == len(forget_windows) == sum(cuts) > N_ARTICLES
    assert trainer.train_dataset.forget["input_ids"] == [w["input_ids"] for w in forget_windows]
    trainer.train()

    unlearned = trainer.model
    after = perplexity(unlearned, tokenizer, forget_windows), retain_nll(unlearned, tokenizer, retain)
    assert after[0] > min_factor * before[0]  # the articles are forgotten
    assert after[1] < 0.05  # the retain answers are kept (an untrained model: about 7)
