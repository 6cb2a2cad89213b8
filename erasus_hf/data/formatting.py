"""How a question/answer pair becomes a prompt and a completion.

One template serves training from scratch (TRL's ``SFTTrainer`` on prompt/completion pairs), unlearning (the
collator masks the prompt with -100) and evaluation, so the answer tokens the model memorised are exactly the ones
the unlearning loss and the metrics score.
"""

from __future__ import annotations

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


def format_prompt(question: str, template: str = PROMPT_TEMPLATE) -> str:
    """The prompt shown to the model; the answer follows after one space."""
    return template.format(question=question)


def format_completion(answer: str) -> str:
    """The completion scored by the loss: the answer with its leading space (EOS is added at tokenization)."""
    return " " + answer.strip()
