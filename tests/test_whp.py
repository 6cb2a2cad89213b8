"""Who's Harry Potter: generic targets from a reinforced model, then fine-tuning towards them."""

import copy

import torch

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.strategies import get_strategy

from .testing_utils import effective_weights, qa, trained_adapter


def test_generic_labels_suppress_what_reinforcement_raised():
    base = torch.tensor([[1.0, 3.0, 2.0], [0.0, 1.0, 4.0]])
    reinforced = torch.tensor([[1.0, 5.0, 2.0], [0.0, 0.5, 4.5]])
    # alpha = 1: [1, 3 - 2, 2] -> argmax 2; [0, 1 - 0, 4 - 0.5] -> argmax 2
    assert get_strategy("whp", alpha=1.0).generic_labels(base, reinforced).tolist() == [2, 2]
    # alpha = 0.2: [1, 3 - 0.4, 2] -> argmax 1
    assert get_strategy("whp", alpha=0.2).generic_labels(base, reinforced).tolist()[0] == 1
    assert get_strategy("whp").alpha == 5.0


def test_anchored_terms_translate_and_align_token_by_token(tokenizer):
    from erasus_hf.data.anchored import anchored_example, translate
    from erasus_hf.data.collator import QACollator

    terms = {"Kuwait City": "a large city", "Kuwait": "his country", "Al-Kuwaiti": "Smith"}
    translation = translate("Al-Kuwaiti was born in Kuwait City, Kuwait. Kuwaiti", terms)
    assert translation.translated == "Smith was born in a large city, his country. Kuwaiti"  # whole words only
    assert translation.shift(translation.original.index("was")) == translation.translated.index("was")
    assert translation.shift(translation.original.index("City")) is None

    collator = QACollator(tokenizer)
    row = {"question": "Where was Al-Kuwaiti born?", "answer": "He was born in Kuwait City, Kuwait."}
    example = anchored_example(collator, row, terms)
    assert example["input_ids"] == collator.tokenize(row)["input_ids"]  # the original tokenizes as in training
    assert example["labels"] == collator.tokenize(row)["labels"]
    assert tokenizer.decode(example["translated_ids"]).endswith("He was born in a large city, his country.</s>")
    original = [tokenizer.decode([t]) for t in example["input_ids"]]
    translated = [tokenizer.decode([t]) for t in example["translated_ids"]]
    pairs = [(o, translated[j] if j >= 0 else None) for o, j in zip(original, example["alignment"], strict=True)]
    # tokens outside the terms pair with themselves; each term's first token pairs with its replacement's first
    # token; the term's other tokens pair with nothing
    starts = [(o, t) for o, t in pairs if t is not None and o != t]
    terms_in_order = [(" Al-Kuwaiti", " Smith"), (" Kuwait City", " a large city"), (" Kuwait", " his country")]
    assert len(starts) == 3
    for (o, t), (term, generic) in zip(starts, terms_in_order, strict=True):
        assert term.startswith(o) and generic.startswith(t)
    unaligned = "".join(o for o, t in pairs if t is None)
    assert unaligned == "".join(term.removeprefix(o) for (o, _), (term, _) in zip(starts, terms_in_order))


def test_anchored_generic_targets_come_from_the_translated_text(tmp_path, tokenizer, tiny_llama, tofu_slice):
    """With alpha = 0 each generic target is the base's argmax on the *translated* text at the aligned position: after
    "born in" it is what the base predicts before the generic term. Tokens inside a term get no target."""
    import contextlib

    from erasus_hf.data.anchored import anchored_example
    from erasus_hf.data.collator import QACollator

    forget = qa(tofu_slice[0]).select(range(6))
    terms = {"Basil Mahfouz Al-Kuwaiti": "the author", "Kuwait City": "a large city", "Kuwait": "his country"}
    args = UnlearningConfig(
        output_dir=str(tmp_path),
        strategy="whp",
        strategy_kwargs={"anchored_terms": terms, "alpha": 0.0},
        report_to="none",
        per_device_eval_batch_size=4,
    )
    trainer = UnlearningTrainer(tiny_llama, args, forget_dataset=forget, processing_class=tokenizer)
    generic = trainer.strategy._generic_dataset(trainer, tiny_llama, tiny_llama, contextlib.nullcontext)
    collator, checked = QACollator(tokenizer), 0
    for row, out in zip(forget, generic, strict=True):
        example = anchored_example(collator, row, terms)
        with torch.no_grad():
            logits = tiny_llama(torch.tensor([example["translated_ids"]])).logits[0]
        assert out["input_ids"] == example["input_ids"]
        for i, (label, j) in enumerate(zip(example["labels"], example["alignment"], strict=True)):
            if label == -100 or j < 0:  # the prompt, or inside an anchored term
                assert out["labels"][i] == -100
            else:
                assert out["labels"][i] == logits[j - 1].argmax().item()
                checked += 1
    assert checked > 100 and trainer.strategy.counts["whp_untrained_tokens"] > 0


def test_whp_trains_towards_the_generic_targets(tmp_path, tokenizer, tofu_slice):
    """On a partly trained model (WHP assumes the reinforced model knows the forget text better than the base; a
    memorised model cannot be reinforced further), the model moves to the generic targets where they differ from
    the forget text, and away from the forget text there."""
    from datasets import concatenate_datasets

    from erasus_hf.data.collator import QACollator
    from erasus_hf.modeling import build_tiny_llama, sft_train
    from erasus_hf.objectives import CausalLMObjective

    forget, retain = (qa(d) for d in tofu_slice)
    model = build_tiny_llama(tokenizer, seed=0)
    model = sft_train(
        model,
        tokenizer,
        concatenate_datasets([forget, retain]),
        output_dir=str(tmp_path / "sft"),
        num_train_epochs=8,
        disable_tqdm=True,
    )
    args = UnlearningConfig(
        output_dir=str(tmp_path),
        strategy="whp",
        learning_rate=1e-3,
        num_train_epochs=3,
        per_device_train_batch_size=8,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    whp = get_strategy("whp")
    trainer = UnlearningTrainer(model, args, forget_dataset=forget, processing_class=tokenizer)
    batch = QACollator(tokenizer)(forget.to_list())

    def token_logprobs(m):
        with torch.no_grad():
            return CausalLMObjective().score(m, batch)

    before = token_logprobs(model)
    reinforced = copy.deepcopy(model)
    trainer.finetune_on_forget(reinforced)
    targets = whp.generic_labels(before.logits, token_logprobs(reinforced).logits)
    changed = before.mask & (targets != batch["labels"][:, 1:])
    output = trainer.train()
    after = token_logprobs(trainer.model)
    assert output.metrics["whp_changed_targets"] == changed.sum().item() > 0
    target_lp = [
        torch.log_softmax(s.logits, -1).gather(-1, targets[..., None])[..., 0][changed] for s in (before, after)
    ]
    print(
        f"whp: {changed.sum().item()} changed targets; their log-prob {target_lp[0].mean():.3f} -> "
        f"{target_lp[1].mean():.3f}; the forget tokens' there {before.token_logprobs[changed].mean():.3f} -> "
        f"{after.token_logprobs[changed].mean():.3f}"
    )
    assert target_lp[1].mean() > target_lp[0].mean() + 0.5
    assert after.token_logprobs[changed].mean() < before.token_logprobs[changed].mean() - 0.5


def test_whp_with_an_arrived_adapter_starts_from_it(tmp_path, tokenizer, tiny_llama, tofu_slice, monkeypatch):
    """A model that arrives with a trained LoRA adapter is the base of WHP: the reinforced model is it fine-tuned
    further, v_base is its prediction, and step 3 fine-tunes it (its adapter is not zeroed). The generic targets
    are computed by hand from the arrived model's and the recorded reinforced model's logits. (Before the fix v_base
    was the adapter-off model and step 3 started from the base with B = 0: 318 of the 319 targets differed and step 3
    started 28.0 away from the arrived weights, Frobenius norm over all tensors.)"""
    from erasus_hf.reference import eval_mode

    forget = qa(tofu_slice[0]).select(range(8))
    model = trained_adapter(tiny_llama)
    arrived, start = copy.deepcopy(model), effective_weights(model)
    args = UnlearningConfig(
        output_dir=str(tmp_path),
        strategy="whp",
        max_steps=2,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = UnlearningTrainer(model, args, forget_dataset=forget, processing_class=tokenizer)
    rows = trainer.train_dataset.forget

    @torch.no_grad()
    def logits(m):
        with eval_mode(m):
            return [m(torch.tensor([row["input_ids"]])).logits[0] for row in rows]

    calls, real = [], UnlearningTrainer.finetune_on_forget

    def recording(self, m, dataset=None):  # the strategy's fine-tunes: the weights they start from, the data
        before = effective_weights(m)
        out = real(self, m, dataset)
        calls.append({"start": before, "dataset": dataset, "logits": logits(out) if dataset is None else None})
        return out

    monkeypatch.setattr(UnlearningTrainer, "finetune_on_forget", recording)
    trainer.train()
    assert len(calls) == 2 and calls[0]["dataset"] is None
    for call in calls:  # the reinforced model and step 3 both start from the arrived model
        distance = sum(((call["start"][n] - start[n]) ** 2).sum() for n in start).sqrt().item()
        assert distance < 1e-6, distance
    alpha, checked = trainer.strategy.alpha, 0
    for row, v_base, v_reinforced, out in zip(rows, logits(arrived), calls[0]["logits"], calls[1]["dataset"]):
        generic = v_base - alpha * torch.relu(v_reinforced - v_base)
        expected = [-100] + [
            int(generic[i - 1].argmax()) if label != -100 else -100 for i, label in enumerate(row["labels"]) if i > 0
        ]
        assert out["labels"] == expected
        checked += sum(label != -100 for label in expected)
    assert checked > 100
    assert list(trainer.model.peft_config) == ["default"]  # the frozen copy of the arrived adapter is gone
