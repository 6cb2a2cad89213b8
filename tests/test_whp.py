"""Who's Harry Potter: generic targets from a reinforced model, then fine-tuning towards them."""

import copy

import pytest
import torch

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.strategies import get_strategy

from .conftest import qa


def test_generic_labels_suppress_what_reinforcement_raised():
    base = torch.tensor([[1.0, 3.0, 2.0], [0.0, 1.0, 4.0]])
    reinforced = torch.tensor([[1.0, 5.0, 2.0], [0.0, 0.5, 4.5]])
    # alpha = 1: [1, 3 - 2, 2] -> argmax 2; [0, 1 - 0, 4 - 0.5] -> argmax 2
    assert get_strategy("whp", alpha=1.0).generic_labels(base, reinforced).tolist() == [2, 2]
    # alpha = 0.2: [1, 3 - 0.4, 2] -> argmax 1
    assert get_strategy("whp", alpha=0.2).generic_labels(base, reinforced).tolist()[0] == 1
    assert get_strategy("whp").alpha == 5.0


def test_anchored_terms_are_refused_not_ignored():
    with pytest.raises(NotImplementedError, match="anchored-term"):
        get_strategy("whp", anchored_terms={"Hogwarts": "the academy"})


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
    from erasus_hf.strategies.task_vector import finetune_on_forget

    finetune_on_forget(trainer, reinforced)
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
