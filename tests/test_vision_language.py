"""The vision_language objective on tiny LLaVA, BLIP and IDEFICS models trained on real handwritten digits.

Each model is a real transformers class built from a tiny config (16x16 images, 8x8 patches, hidden size 32) and
trained here on sklearn's `load_digits` (1797 real 8x8 digits, upscaled to 16x16, 3 channels) to answer "What digit
is this?" with the digit's word (BLIP: to caption "a handwritten seven"). Unlearning one digit must raise the NLL of
that digit's answer on held-out images of it, while the other digits' answers hold.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    GPT2Config,
    IdeficsConfig,
    IdeficsForVisionText2Text,
    IdeficsImageProcessor,
    IdeficsProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
)

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.modeling.tiny import build_tiny_llama, train_tokenizer
from erasus_hf.objectives import VisionLanguageCollator, VisionLanguageObjective, get_objective

from .testing_utils import load_example

datasets_sklearn = pytest.importorskip("sklearn.datasets", reason="scikit-learn is a dev dependency")

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION = "What digit is this?"
LLAVA_PROMPT = "USER: {image}\n{question} ASSISTANT:"  # llava-1.5's format, the example's default
IDEFICS_PROMPT = "Question: {question}\nAnswer:"
IMAGE, FAKE = "<image>", "<fake_token_around_image>"
FORGET = 7
PATCH = 8
NUM_IMAGE_TOKENS = (16 // PATCH) ** 2  # LLaVA's placeholders per image (the CLS feature is dropped)


# ---- data and tiny models ----


@pytest.fixture(scope="module")
def digits():
    return load_digit_data()


def load_digit_data() -> dict:
    """PIL images (16x16 RGB), pixels in [-1, 1] [N, 3, 16, 16], labels, and a seeded train/test split."""
    data = datasets_sklearn.load_digits()
    big = np.kron(data.images, np.ones((1, 2, 2)))  # 8x8 -> 16x16, values 0..16
    gray = (big * 255 / 16).round().astype(np.uint8)
    images = [Image.fromarray(g).convert("RGB") for g in gray]
    pixels = torch.tensor(big / 8 - 1, dtype=torch.float32)[:, None].expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return {"images": images, "pixels": pixels, "labels": labels, "train": order[:1200], "test": order[1200:]}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def make_tokenizer():
    """A byte-level BPE tokenizer trained on the three prompt formats, with the image placeholder tokens last."""
    texts = [LLAVA_PROMPT.format(image=IMAGE, question=QUESTION) + f" {w}" for w in WORDS]
    texts += [IDEFICS_PROMPT.format(question=QUESTION) + f" {w}" for w in WORDS]
    texts += [f"a handwritten {w}" for w in WORDS]
    tok = train_tokenizer(texts * 4, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE, FAKE]})
    return tok


def text_config(tok, **overrides) -> dict:
    config = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return {**config, **overrides}


VISION = dict(image_size=16, patch_size=PATCH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def build_llava(tok, seed: int = 0) -> LlavaForConditionalGeneration:
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, **VISION),
        text_config=LlamaConfig(num_key_value_heads=2, **text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids(IMAGE),
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def build_llava_processor(tok) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def build_blip(tok, seed: int = 0, vision_hidden_size: int = 32) -> BlipForConditionalGeneration:
    config = BlipConfig(
        text_config=text_config(tok, sep_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=vision_hidden_size, **VISION),
        projection_dim=32,
        image_text_hidden_size=32,
    )
    torch.manual_seed(seed)
    return BlipForConditionalGeneration(config)


def build_idefics(tok, seed: int = 0) -> IdeficsForVisionText2Text:
    """IDEFICS' layout: the two image tokens live in the 2 decoupled `additional_vocab_size` embeddings."""
    config = IdeficsConfig(
        **text_config(tok, vocab_size=len(tok) - 2),
        additional_vocab_size=2,
        vision_config=dict(embed_dim=32, **VISION),
        perceiver_config=dict(use_resampler=False),
        freeze_text_layers=False,
        freeze_vision_layers=False,
        alpha_initializer="ones",  # transformers' default "zeros" starts with the image gated off: slow to train
    )
    torch.manual_seed(seed)
    return IdeficsForVisionText2Text(config)


# ---- rows of each family (what the processors build, checked against them below) ----


def answer_ids(tok, digit: int) -> list[int]:
    return tok(f" {WORDS[digit]}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def llava_rows(tok, pixel_values, labels, prompt_ids) -> list[dict]:
    return [
        {"pixel_values": p, "prompt_ids": prompt_ids, "answer_ids": answer_ids(tok, int(y))}
        for p, y in zip(pixel_values, labels)
    ]


def blip_rows(tok, pixels, labels) -> list[dict]:
    return [
        {"pixel_values": p, "input_ids": tok(f"a handwritten {WORDS[int(y)]}")["input_ids"] + [tok.eos_token_id]}
        for p, y in zip(pixels, labels)
    ]


def idefics_rows(tok, pixels, labels) -> list[dict]:
    image_ids = [tok.bos_token_id, *tok.convert_tokens_to_ids([FAKE, IMAGE, FAKE])]
    prompt = image_ids + tok(IDEFICS_PROMPT.format(question=QUESTION), add_special_tokens=False)["input_ids"]
    rows = []
    for p, y in zip(pixels, labels):
        answer = answer_ids(tok, int(y))
        sees_image = [[0]] * 2 + [[1]] * (len(prompt) + len(answer) - 2)  # from the image token on
        rows.append(
            {"pixel_values": p[None], "prompt_ids": prompt, "answer_ids": answer, "image_attention_mask": sees_image}
        )
    return rows


# ---- training and measuring ----


def pretrain(model, rows, train_idx, steps: int, lr: float, batch_size: int = 32, seed: int = 0):
    """Fit the answers with the objective's own NLL (plain AdamW loop: the starting model of the unlearning tests)."""
    objective, collate = VisionLanguageObjective(), VisionLanguageCollator()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        picks = train_idx[torch.randint(len(train_idx), (batch_size,), generator=generator)]
        loss = objective.score(model, collate([rows[i] for i in picks.tolist()])).mean_nll.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def nll_by_digit(model, rows, labels, idx) -> torch.Tensor:
    """[10] mean answer NLL (nats per answer token) of the rows `idx`, per digit."""
    objective, collate = VisionLanguageObjective(), VisionLanguageCollator()
    model.eval()
    nll = torch.cat(
        [objective.score(model, collate([rows[i] for i in chunk.tolist()])).mean_nll for chunk in idx.split(300)]
    )
    return torch.stack([nll[labels[idx] == d].mean() for d in range(10)])


def unlearn(model, rows, forget_idx, retain_idx, tmp_path, strategy: str, **config):
    settings = dict(
        output_dir=str(tmp_path),
        strategy=strategy,
        num_train_epochs=1,
        per_device_train_batch_size=8,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=1000,
        seed=0,
    )
    settings.update(config)
    trainer = UnlearningTrainer(
        model,
        UnlearningConfig(**settings),
        forget_dataset=[rows[i] for i in forget_idx.tolist()],
        retain_dataset=[rows[i] for i in retain_idx.tolist()],
    )
    assert trainer.model_objective.name == "vision_language"
    trainer.train()
    return trainer


def forget_retain_split(digits, forget_rows: int, retain_rows: int):
    labels, train = digits["labels"], digits["train"]
    return train[labels[train] == FORGET][:forget_rows], train[labels[train] != FORGET][:retain_rows]


def assert_forgot_one_digit(before: torch.Tensor, after: torch.Tensor, factor: float, slack: float) -> None:
    """The forgotten digit's held-out NLL rose by `factor`; every other digit's stayed within `slack` nats (and the
    others' mean within slack / 2). The starting models differ between 1 and 2 torch threads (the float reduction
    order changes the training path), so the bounds hold for both; the numbers measured at 1 / 2 threads are noted
    at each call."""
    others = [d for d in range(10) if d != FORGET]
    report = f"before {before.tolist()}\nafter {after.tolist()}"
    assert after[FORGET] > factor * before[FORGET], report
    assert (after[others] - before[others]).max() < slack, report
    assert after[others].mean() - before[others].mean() < slack / 2, report


# ---- the starting models ----


@pytest.fixture(scope="module")
def llava(tokenizer, digits, tmp_path_factory):
    """The folder of a tiny LLaVA trained to read digits (with its processor, for the example), and its rows."""
    processor = build_llava_processor(tokenizer)
    prompt = VisionLanguageCollator(processor, prompt_template=LLAVA_PROMPT).encode(
        {"image": digits["images"][0], "question": QUESTION, "answer": WORDS[int(digits["labels"][0])]}
    )
    prompt_ids = [t for t, label in zip(prompt.input_ids, prompt.labels) if label == -100]
    pixel_values = processor.image_processor(images=digits["images"], return_tensors="pt")["pixel_values"]
    rows = llava_rows(tokenizer, pixel_values, digits["labels"], prompt_ids)
    model = pretrain(build_llava(tokenizer), rows, digits["train"], steps=300, lr=3e-3, seed=1)
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return {"processor": processor, "rows": rows, "path": str(path)}


# ---- scoring and collating ----


def test_llava_rows_are_what_the_processor_builds(llava, digits, tokenizer):
    """Pre-tokenized rows equal the processor path: the expanded image tokens in the prompt, prompt and images
    masked, only the answer and EOS scored."""
    collator = VisionLanguageCollator(llava["processor"], prompt_template=LLAVA_PROMPT)
    raw = [
        {"image": digits["images"][i], "question": QUESTION, "answer": WORDS[int(digits["labels"][i])]} for i in (3, 4)
    ]
    from_processor = collator(raw)
    from_rows = VisionLanguageCollator(pad_token_id=tokenizer.pad_token_id)([llava["rows"][3], llava["rows"][4]])
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(from_processor[key], from_rows[key]), key
    assert torch.allclose(from_processor["pixel_values"], from_rows["pixel_values"])
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    ids, labels = from_processor["input_ids"][0], from_processor["labels"][0]
    assert (ids == image_id).sum() == NUM_IMAGE_TOKENS
    scored = labels[labels != -100].tolist()
    assert scored == answer_ids(tokenizer, int(digits["labels"][3]))

    # without a prompt template, the processor's chat template (a user turn: image, then question) builds the prompt
    chat = copy.deepcopy(llava["processor"])
    chat.chat_template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )
    from_chat = VisionLanguageCollator(chat)(raw)
    assert torch.equal(from_chat["input_ids"], from_processor["input_ids"])
    assert torch.equal(from_chat["labels"], from_processor["labels"])


def test_blip_and_idefics_rows_are_what_their_processors_build(tokenizer, digits):
    image, digit = digits["images"][5], int(digits["labels"][5])
    blip = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 16, "width": 16}), tokenizer=tokenizer)
    built = VisionLanguageCollator(blip).encode({"image": image, "answer": f"a handwritten {WORDS[digit]}"})
    row = blip_rows(tokenizer, digits["pixels"][5:6], digits["labels"][5:6])[0]
    assert built.input_ids == row["input_ids"]
    assert built.labels == [-100, *row["input_ids"][1:]]  # only the [DEC]/BOS position is not scored

    idefics = IdeficsProcessor(image_processor=IdeficsImageProcessor(image_size=16), tokenizer=tokenizer)
    collator = VisionLanguageCollator(idefics, prompt_template=IDEFICS_PROMPT)
    built = collator.encode({"image": image, "question": QUESTION, "answer": WORDS[digit]})
    row = idefics_rows(tokenizer, digits["pixels"][5:6], digits["labels"][5:6])[0]
    assert built.input_ids == row["prompt_ids"] + row["answer_ids"]
    assert built.labels == [-100] * len(row["prompt_ids"]) + row["answer_ids"]
    assert built.text["image_attention_mask"].tolist() == row["image_attention_mask"]
    assert built.arrays["pixel_values"].shape == (1, 1, 3, 16, 16)  # the processor's layout, concatenated


@pytest.mark.parametrize("family", ["llava", "blip", "idefics"])
def test_score_is_the_models_own_shifted_loss(tokenizer, digits, tmp_path, family):
    """logits[:, :-1] score labels[:, 1:]: the per-token mean equals the model's built-in (shifted) LM loss. With
    `use_peft`, LoRA goes on the language side only and the PEFT-wrapped model scores the same (B starts at 0)."""
    idx = digits["labels"][:4]
    if family == "llava":
        model = build_llava(tokenizer)
        prompt = tokenizer(LLAVA_PROMPT.format(image=IMAGE * NUM_IMAGE_TOKENS, question=QUESTION))["input_ids"]
        rows = llava_rows(tokenizer, digits["pixels"][:4], idx, prompt)
    elif family == "blip":
        model = build_blip(tokenizer, vision_hidden_size=48)  # so the text decoder's states are told apart
        rows = blip_rows(tokenizer, digits["pixels"][:4], idx)
    else:
        model = build_idefics(tokenizer)
        model.config.vocab_size = len(tokenizer)  # the built-in loss views logits with vocab_size, not + additional
        rows = idefics_rows(tokenizer, digits["pixels"][:4], idx)
    batch = VisionLanguageCollator(pad_token_id=tokenizer.pad_token_id)(rows)
    objective = get_objective(None, model)
    assert isinstance(objective, VisionLanguageObjective)
    scores = objective.score(model, batch, hidden_layer=-1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    builtin = model(**inputs, labels=batch["labels"]).loss
    per_token = -scores.token_logprobs.sum() / scores.mask.sum()
    torch.testing.assert_close(per_token, builtin)
    assert torch.equal(scores.mask, batch["labels"][:, 1:] != -100)
    assert scores.hidden_states.shape == (*batch["input_ids"].shape, 32)  # the text decoder's, not the vision's

    args = UnlearningConfig(output_dir=str(tmp_path), use_peft=True, report_to="none")
    peft_model, _, _ = objective.prepare_peft(model, args)
    adapted = {name.split(".lora_")[0] for name, _ in peft_model.named_parameters() if ".lora_" in name}
    assert adapted and not [
        n for n in adapted if {"vision_tower", "vision_model", "multi_modal_projector"} & set(n.split("."))
    ]
    torch.testing.assert_close(objective.score(peft_model, batch).token_logprobs, scores.token_logprobs)


def test_collator_pads_text_aligned_inputs_and_nests_alternates(tokenizer, digits):
    rows = idefics_rows(tokenizer, digits["pixels"][:2], torch.tensor([7, 1]))  # "seven" vs "one": other lengths
    rows = [{**r, "index": i, "alternate": answer_ids(tokenizer, 0)} for i, r in enumerate(rows)]
    batch = VisionLanguageCollator(pad_token_id=tokenizer.pad_token_id)(rows)
    width = batch["input_ids"].shape[1]
    assert batch["image_attention_mask"].shape == (2, width, 1)
    assert batch["pixel_values"].shape == (2, 1, 3, 16, 16)
    for i, row in enumerate(rows):
        n = len(row["prompt_ids"]) + len(row["answer_ids"])
        assert batch["attention_mask"][i].sum() == n and batch["image_attention_mask"][i, n:].sum() == 0
        assert batch["labels"][i, n:].eq(-100).all()
    alternate = batch["alternate"]
    assert alternate["slot"].tolist() == [1, 1] and alternate["index"].tolist() == [0, 1]
    assert alternate["labels"][0][alternate["labels"][0] != -100].tolist() == answer_ids(tokenizer, 0)


def test_bad_input_gets_a_clear_error(tokenizer, digits):
    collator = VisionLanguageCollator()
    with pytest.raises(ValueError, match="expected input_ids"):
        collator([{"pixel_values": digits["pixels"][0]}])
    with pytest.raises(ValueError, match="need the model's processor"):
        collator([{"image": digits["images"][0], "question": QUESTION, "answer": "seven"}])
    with pytest.raises(ValueError, match="different shapes"):
        collator(
            [
                {"pixel_values": torch.zeros(3, 16, 16), "input_ids": [1, 2]},
                {"pixel_values": torch.zeros(3, 8, 8), "input_ids": [1, 2]},
            ]
        )
    with pytest.raises(ValueError, match="no answer token"):
        collator([{"pixel_values": torch.zeros(3, 16, 16), "prompt_ids": [1, 5], "answer_ids": []}])
    objective = VisionLanguageObjective()
    with pytest.raises(ValueError, match="decoder-style image-text-to-text"):
        objective.validate_model(
            build_tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=1, intermediate_size=16)
        )
    encoder_decoder = VisionEncoderDecoderModel(
        VisionEncoderDecoderConfig.from_encoder_decoder_configs(
            ViTConfig(hidden_size=16, image_size=16, patch_size=4, num_hidden_layers=1, num_attention_heads=1),
            GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=1),
        )
    )
    with pytest.raises(ValueError, match="encoder-decoder"):
        objective.validate_model(encoder_decoder)


@pytest.mark.parametrize("strategy", ["rmu", "whp"])
def test_strategies_that_cannot_serve_vision_language_say_so(tokenizer, digits, tmp_path, strategy):
    """RMU steers `...layers.{i}` outputs (a LLaVA's first such modules are its vision tower's) and WHP rewrites the
    question text with a tokenizer: both are causal-LM only and refuse a vision-language model up front."""
    prompt = tokenizer(LLAVA_PROMPT.format(image=IMAGE * NUM_IMAGE_TOKENS, question=QUESTION))["input_ids"]
    rows = llava_rows(tokenizer, digits["pixels"][:2], digits["labels"][:2], prompt)
    args = UnlearningConfig(output_dir=str(tmp_path), strategy=strategy, report_to="none", retain_loss="none")
    with pytest.raises(ValueError, match=f"Strategy '{strategy}' serves .*not the 'vision_language' objective"):
        UnlearningTrainer(build_llava(tokenizer), args, forget_dataset=rows)


def test_example_help_explains_itself(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_example("unlearn_llava").parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "llava-hf/llava-1.5-7b-hf" in out and "--forget_value" in out and "LoRA adapter" in out


# ---- unlearning one digit ----


def test_llava_npo_forgets_one_digit_and_keeps_the_others(llava, digits, tmp_path):
    """Full fine-tuning with NPO + retain NLL (cached reference log-probs, looked up by each row's index)."""
    model = LlavaForConditionalGeneration.from_pretrained(llava["path"])
    rows, labels, test = llava["rows"], digits["labels"], digits["test"]
    forget_idx, retain_idx = forget_retain_split(digits, forget_rows=48, retain_rows=96)
    before = nll_by_digit(model, rows, labels, test)
    trainer = unlearn(
        model, rows, forget_idx, retain_idx, tmp_path, "npo", learning_rate=1e-3, num_train_epochs=3, retain_weight=5
    )
    assert trainer.reference_mode == "cached"
    after = nll_by_digit(model, rows, labels, test)
    # measured: 0.090 -> 0.995 (x11.0) / 0.210 -> 2.828 (x13.4); others at most +0.25 / +0.33
    assert_forgot_one_digit(before, after, factor=5.0, slack=0.5)


def test_llava_dpo_prefers_the_alternate_answer(llava, digits, tokenizer, tmp_path):
    """DPO-style strategies: the collator nests each forget row's `alternate` answer (same image and prompt) as a
    second batch, scored against the cached reference (slot 1). After DPO the held-out sevens' forget answer is less
    likely and the alternate ("I don't know") more likely; the other digits hold."""
    model = LlavaForConditionalGeneration.from_pretrained(llava["path"])
    rows, labels, test = llava["rows"], digits["labels"], digits["test"]
    refusal = tokenizer(" I don't know", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    forget_idx, retain_idx = forget_retain_split(digits, forget_rows=48, retain_rows=96)
    forget_rows = [{**rows[i], "alternate": refusal} for i in forget_idx.tolist()]
    sevens = test[labels[test] == FORGET]
    refusals = [{**rows[i], "answer_ids": refusal} for i in sevens.tolist()]
    objective, collate = VisionLanguageObjective(), VisionLanguageCollator()

    def refusal_nll() -> float:
        with torch.no_grad():
            return objective.score(model.eval(), collate(refusals)).mean_nll.mean().item()

    before, refusal_before = nll_by_digit(model, rows, labels, test), refusal_nll()
    settings = dict(output_dir=str(tmp_path), strategy="dpo", learning_rate=1e-3, num_train_epochs=3)
    settings.update(retain_weight=5, per_device_train_batch_size=8, save_strategy="no", report_to="none")
    trainer = UnlearningTrainer(
        model,
        UnlearningConfig(**settings, disable_tqdm=True, logging_steps=1000, seed=0),
        forget_dataset=forget_rows,
        retain_dataset=[rows[i] for i in retain_idx.tolist()],
    )
    trainer.train()
    after, refusal_after = nll_by_digit(model, rows, labels, test), refusal_nll()
    assert refusal_after < 0.6 * refusal_before, (refusal_before, refusal_after)
    # measured: 0.090 -> 0.951 (x10.5) / 0.210 -> 0.980 (x4.7); others at most +0.27 / +0.27; refusal 11.2 -> 6.0
    # (before MKL_CBWR=COMPATIBLE, tests/conftest.py); with it: 0.380 -> 0.537 (x1.41), others at most +0.16. DPO
    # moves probability to the alternate: the forget answer need not fall far once the refusal wins.
    assert_forgot_one_digit(before, after, factor=1.25, slack=0.5)


def test_example_unlearns_one_digit_from_llava_with_lora(llava, digits, tmp_path):
    """examples/unlearn_llava.py end to end: a saved tiny LLaVA + LlavaProcessor, a `datasets` dataset of (image,
    question, answer) rows, the "seven" rows forgotten with NPO through a LoRA adapter on the language model."""
    from datasets import Dataset
    from peft import PeftModel

    labels, train = digits["labels"], digits["train"]
    picks = torch.cat([train[labels[train] == FORGET][:48], train[labels[train] != FORGET][:160]]).tolist()
    data = Dataset.from_dict(
        {
            "image": [digits["images"][i] for i in picks],
            "question": [QUESTION] * len(picks),
            "answer": [WORDS[int(labels[i])] for i in picks],
        }
    )
    data.save_to_disk(str(tmp_path / "digits"))
    output_dir = str(tmp_path / "adapter")
    summary = load_example("unlearn_llava").main(
        ["--model", llava["path"], "--dataset", str(tmp_path / "digits"), "--forget_column", "answer"]
        + ["--forget_value", WORDS[FORGET], "--output_dir", output_dir, "--strategy", "npo", "--lora_r", "8"]
        + ["--learning_rate", "5e-3", "--num_train_epochs", "3", "--batch_size", "8", "--max_retain", "96"]
        + ["--eval_rows", "64", "--retain_weight", "5"]
    )
    before, after = summary["before"], summary["after"]
    assert (summary["num_forget"], summary["num_retain"], summary["num_held_out"]) == (48, 96, 64)
    # measured: forget 0.063 -> 2.362 / 0.100 -> 3.089, held-out retain 0.241 -> 0.277 / 0.218 -> 0.268
    assert after["forget_nll"] > 5 * before["forget_nll"], summary
    assert after["retain_nll"] < before["retain_nll"] + 0.1, summary

    # the adapter changed, the base weights did not, and LoRA sits on the language model only
    original = LlavaForConditionalGeneration.from_pretrained(llava["path"]).state_dict()
    lora_b = 0
    for name, param in summary["model"].get_base_model().named_parameters():
        if "lora_" in name:
            lora_b += "lora_B" in name and param.abs().sum().item() > 0
            assert ".language_model." in name, name
        else:
            assert torch.equal(param, original[name.replace(".base_layer", "")]), name
    assert lora_b > 0

    # the saved adapter (safetensors) reproduces the forgetting on held-out digits
    assert os.path.exists(os.path.join(output_dir, "adapter_model.safetensors"))
    reloaded = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(llava["path"]), output_dir)
    base = LlavaForConditionalGeneration.from_pretrained(llava["path"])
    held_out = nll_by_digit(base, llava["rows"], labels, digits["test"])
    unlearned = nll_by_digit(reloaded, llava["rows"], labels, digits["test"])
    # measured: 0.090 -> 2.292 (x25.3) / 0.210 -> 3.094 (x14.7); others at most +0.11 / +0.14
    assert_forgot_one_digit(held_out, unlearned, factor=5.0, slack=0.3)


@pytest.fixture(scope="module")
def blip(tokenizer, digits):
    rows = blip_rows(tokenizer, digits["pixels"], digits["labels"])
    return {"model": pretrain(build_blip(tokenizer), rows, digits["train"], steps=400, lr=3e-3), "rows": rows}


@pytest.fixture(scope="module")
def idefics(tokenizer, digits):
    rows = idefics_rows(tokenizer, digits["pixels"], digits["labels"])
    return {"model": pretrain(build_idefics(tokenizer), rows, digits["train"], steps=400, lr=3e-3), "rows": rows}


def test_blip_grad_diff_forgets_one_caption_and_keeps_the_others(blip, digits, tmp_path):
    """BLIP captioning: "a handwritten seven" is unlearned (GradDiff), the other nine captions hold."""
    model, rows, labels = copy.deepcopy(blip["model"]), blip["rows"], digits["labels"]
    forget_idx, retain_idx = forget_retain_split(digits, forget_rows=48, retain_rows=192)
    before = nll_by_digit(model, rows, labels, digits["test"])
    unlearn(
        model,
        rows,
        forget_idx,
        retain_idx,
        tmp_path,
        "grad_diff",
        learning_rate=2e-3,
        num_train_epochs=3,
        retain_weight=10,
    )
    after = nll_by_digit(model, rows, labels, digits["test"])
    # measured: 0.255 -> 1.124 (x4.4) / 0.189 -> 0.963 (x5.1); others at most +0.10 / +0.21
    assert_forgot_one_digit(before, after, factor=3.0, slack=0.4)


def test_idefics_npo_forgets_one_digit_and_keeps_the_others(idefics, digits, tmp_path):
    """IDEFICS (Flamingo's open reproduction): gated cross-attention to the image, `image_attention_mask` padded by
    the collator; NPO with a retain term."""
    model, rows, labels = copy.deepcopy(idefics["model"]), idefics["rows"], digits["labels"]
    forget_idx, retain_idx = forget_retain_split(digits, forget_rows=48, retain_rows=192)
    before = nll_by_digit(model, rows, labels, digits["test"])
    unlearn(
        model, rows, forget_idx, retain_idx, tmp_path, "npo", learning_rate=7e-4, num_train_epochs=3, retain_weight=10
    )
    after = nll_by_digit(model, rows, labels, digits["test"])
    # measured: 0.159 -> 1.843 (x11.6) / 0.211 -> 3.158 (x15.0); others at most +0.16 / +0.30
    assert_forgot_one_digit(before, after, factor=5.0, slack=0.45)
