"""The sizes of the from-scratch TOFU protocol: which authors play which role, the model, how it is trained."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from erasus_hf.modeling.tiny import TinyModelSettings


@dataclass(frozen=True)
class Preset:
    """One size of the benchmark. Authors are TOFU's (20 question/answer pairs each, author = row of `full` // 20).

    - retain authors: the finetuned and the retain model both train on them;
    - forget split: TOFU's `forgetXX_perturbed` (authors 198-199, 190-199 or 180-199), trained on by the finetuned
      model only; its paraphrased and perturbed answers give the forget truth ratios;
    - holdout authors: neither model sees them; they are the membership-inference non-members;
    - retain evaluation: the first `retain_eval_rows` rows of `retain_perturbed` (authors 0-19, a subset of the
      retain authors), TOFU's retain set;
    - tuning authors: a forget group disjoint from the reported one (rows of `forget10_perturbed`, which holds
      authors 180-199), on which the recipes' hyperparameters are searched (`benchmarks.tofu_mini.tune`). A third
      model, the *tuning model*, trains on the retain authors and these; the retain model, which saw neither group,
      is the reference of both.
    """

    name: str
    retain_authors: range
    forget_split: str
    holdout_authors: range
    retain_eval_rows: int
    model: TinyModelSettings
    tuning_authors: range | None = None
    sft_epochs: int = 25
    sft_learning_rate: float = 3e-3
    sft_batch_size: int = 16
    unlearn_epochs: int = 10
    batch_size: int = 8
    max_new_tokens: int = 200  # open-unlearning's TOFU generation length (answers stop at EOS)
    eval_batch_size: int = 32
    notes: str = field(default="", compare=False)


SMALL = Preset(
    name="small",
    retain_authors=range(0, 30),
    forget_split="forget01",
    holdout_authors=range(170, 175),
    retain_eval_rows=100,
    model=TinyModelSettings(vocab_size=2048, hidden_size=128, num_layers=2, intermediate_size=256),
    tuning_authors=range(188, 190),
    notes="2 CPU cores, about 40 minutes with the models cached",
)

PRESETS = {
    "small": SMALL,
    "small_forget05": replace(
        SMALL,
        name="small_forget05",
        forget_split="forget05",
        holdout_authors=range(170, 180),
        tuning_authors=None,  # its recipes are the ones tuned on `small`'s tuning authors (188-189)
        notes="the forget05-size group on the small model",
    ),
    "large": Preset(
        name="large",
        retain_authors=range(0, 170),
        forget_split="forget10",
        holdout_authors=range(170, 180),
        retain_eval_rows=400,
        model=TinyModelSettings(
            vocab_size=8192,
            hidden_size=512,
            num_layers=8,
            num_heads=8,
            intermediate_size=1408,
            max_position_embeddings=512,
        ),
        sft_epochs=10,
        sft_learning_rate=1e-3,
        sft_batch_size=32,
        batch_size=16,
        notes="every author; for a GPU",
    ),
}
