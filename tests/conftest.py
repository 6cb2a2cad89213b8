"""Shared fixtures: a tokenizer trained on the shipped TOFU slice, tiny Llamas, and one model that memorised real
TOFU authors (trained once per session with TRL's SFTTrainer) for the behavioural tests."""

from __future__ import annotations

import copy
import os
import platform

# The behavioural tests' bounds were measured with AVX2 kernels (ATen, MKL, oneDNN); AVX-512 ones sum in another
# order, and a 25-epoch fit of a tiny model then lands elsewhere (the ViT digits fixture: 0.70 instead of 0.91 on the
# forget digit). Pin the kernels on x86 so the suite reproduces on every machine, as one thread per worker does
# below; read at the first operation, before which this runs (subprocesses of the tests inherit it).
if platform.machine().lower() in ("x86_64", "amd64"):
    for variable in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"):
        os.environ.setdefault(variable, "avx2" if variable == "ATEN_CPU_CAPABILITY" else "AVX2")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import concatenate_datasets

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.data.tofu import demo_splits
from erasus_hf.evaluation import answer_nll
from erasus_hf.modeling.tiny import build_tiny_llama, sft_train, train_tokenizer

# The models here are tiny: one thread each runs them faster than two, and the suite runs one pytest-xdist worker
# per core (`-n auto --dist loadfile`, the README's command), so two threads per worker would oversubscribe the CPU.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tofu_slice():
    """(forget, retain): the 2 forget01 authors and 2 retain authors of the shipped slice (40 rows each)."""
    return demo_splits(num_retain_authors=2)


@pytest.fixture(scope="session")
def tokenizer(tofu_slice):
    forget, retain = tofu_slice
    rows = concatenate_datasets([forget, retain])
    texts = list(rows["question"]) + list(rows["answer"]) + list(rows["paraphrased_answer"])
    texts += [a for row in rows["perturbed_answer"] for a in row]
    return train_tokenizer(texts, vocab_size=512)


@pytest.fixture
def tiny_llama(tokenizer):
    """A fresh random tiny Llama (same seed, same weights) for tests that need no training."""
    return build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)


@pytest.fixture(scope="session")
def _memorised(tokenizer, tofu_slice, tmp_path_factory):
    forget, retain = tofu_slice
    model = build_tiny_llama(tokenizer, seed=0)  # the demo's 0.85M-parameter Llama
    rows = concatenate_datasets([forget, retain]).select_columns(["question", "answer"])
    model = sft_train(
        model, tokenizer, rows, output_dir=str(tmp_path_factory.mktemp("sft")), num_train_epochs=50, disable_tqdm=True
    )
    return model.eval()


@pytest.fixture
def memorised(_memorised):
    """A copy of the session's model that memorised the forget and retain authors (safe to modify)."""
    return copy.deepcopy(_memorised)


def qa(dataset):
    """Only the question/answer columns (what the unlearning collator reads)."""
    return dataset.select_columns(["question", "answer"])


def nll(model, tokenizer, dataset) -> float:
    """Mean answer NLL (nats per answer token) of `model` on TOFU rows."""
    return answer_nll(model, tokenizer, dataset["question"], dataset["answer"]).mean().item()


def unlearn(
    model,
    tokenizer,
    tofu_slice,
    tmp_path,
    strategy,
    kwargs=None,
    lr=2e-3,
    epochs=5,
    use_peft=True,
    with_retain=True,
    **config,
):
    """Run `strategy` on the (forget, retain) slice with the behavioural tests' settings; return the trainer."""
    forget, retain = tofu_slice
    args = UnlearningConfig(
        output_dir=str(tmp_path),
        strategy=strategy,
        strategy_kwargs=kwargs,
        use_peft=use_peft,
        learning_rate=lr,
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        **config,
    )
    trainer = UnlearningTrainer(
        model,
        args,
        forget_dataset=qa(forget),
        retain_dataset=qa(retain) if with_retain else None,
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


@pytest.fixture(scope="session")
def spoken_digits():
    """The ten digit words spoken by espeak-ng: 6 voices x 2 speeds x 2 pitches each (240 clips, 16 kHz)."""
    from erasus_hf.data.spoken_words import espeak_available, spoken_words

    if not espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): there is no speech to test on")
    return spoken_words()
