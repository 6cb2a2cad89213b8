"""The `contrastive` objective (CLIP's InfoNCE per example, both directions) checked against hand computations, and
dual encoders unlearning on real data: a tiny `CLIPModel` on handwritten digits (sklearn's load_digits), `XCLIPModel`
on clips of the digits moving, `ClapModel` on the digit words spoken by espeak-ng."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from transformers import CLIPTokenizer

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.data.spoken_words import DIGIT_WORDS
from erasus_hf.objectives import ContrastiveCollator, ContrastiveObjective, get_objective
from erasus_hf.objectives.contrastive import MEDIA_LOGITS, contrastive_logits
from erasus_hf.strategies import kl_to_reference

from .testing_utils import digit_split, load_example, moving_digit_clips

FORGET = 7  # "seven"
IMAGE_CAPTIONS = [f"a photo of the digit {w}" for w in DIGIT_WORDS]
VIDEO_CAPTIONS = [f"a video of the digit {w}" for w in DIGIT_WORDS]
AUDIO_CAPTIONS = [f"the spoken word {w}" for w in DIGIT_WORDS]


# ---- tiny models and tokenizers, built in memory ----


def caption_tokenizer(texts: list[str]) -> CLIPTokenizer:
    """A real `CLIPTokenizer` whose BPE merges spell each word of `texts` as one token (`<pad>` = 0, then the words'
    pieces, `<|startoftext|>` and `<|endoftext|>` last: the highest id, as X-CLIP's pooling expects)."""
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    vocab["<pad>"] = 0
    for word in dict.fromkeys(w for text in texts for w in text.lower().split()):
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        current = pieces[0]
        for piece in pieces[1:]:
            if (current, piece) not in merges:
                merges.append((current, piece))
            current += piece
            vocab.setdefault(current, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="<pad>")


def text_config(tokenizer: CLIPTokenizer, **extra) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def tiny_clip(tokenizer: CLIPTokenizer, seed: int = 0) -> nn.Module:
    """CLIP with a 1-layer text tower and a 2-layer ViT on 16x16 RGB images (4x4 patches), 32-d embeddings."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16)
    config = CLIPConfig(
        text_config=text_config(tokenizer), vision_config={**vision, "patch_size": 4}, projection_dim=32
    )
    return CLIPModel(config)


def tiny_xclip(tokenizer: CLIPTokenizer, seed: int = 0) -> nn.Module:
    """X-CLIP: CLIP's towers with cross-frame message tokens, a 1-layer multi-frame integration transformer and a
    1-layer video-conditioned text prompt generator; 4 frames of 16x16."""
    from transformers import XCLIPConfig, XCLIPModel

    torch.manual_seed(seed)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
        num_frames=4,
        mit_hidden_size=32,
        mit_intermediate_size=64,
        mit_num_hidden_layers=1,
        mit_num_attention_heads=2,
    )
    config = XCLIPConfig(
        text_config=text_config(tokenizer),
        vision_config=vision,
        projection_dim=32,
        prompt_layers=1,
        prompt_num_attention_heads=2,
    )
    return XCLIPModel(config)


CLAP_AUDIO = dict(  # HTSAT at its smallest: a 32x32 spectrogram "image", 8x8 patches, two 1-block Swin stages
    spec_size=32,
    num_mel_bins=16,
    window_size=2,
    patch_size=8,
    patch_stride=[8, 8],
    depths=[1, 1],
    num_attention_heads=[2, 2],
    patch_embeds_hidden_size=16,
    hidden_size=32,  # = patch_embeds_hidden_size * 2 ** (stages - 1), the pooled width
    projection_dim=32,
    enable_fusion=False,
)


def tiny_clap(tokenizer: CLIPTokenizer, seed: int = 0) -> nn.Module:
    """CLAP: a 1-layer RoBERTa text tower (`<pad>` = 0 is its position padding index) and the HTSAT above."""
    from transformers import ClapConfig, ClapModel

    torch.manual_seed(seed)
    config = ClapConfig(
        text_config=text_config(tokenizer, type_vocab_size=1, projection_dim=32),
        audio_config=CLAP_AUDIO,
        projection_dim=32,
    )
    return ClapModel(config)


def clap_features(audio: list) -> dict[str, torch.Tensor]:
    """`ClapFeatureExtractor` built in memory for 16 kHz speech: 16 log-mel bins, hop 512 over 2 s (63 frames; the
    words are 0.6-1.1 s, repeated to fill), one channel (no fusion)."""
    from transformers import ClapFeatureExtractor

    extractor = ClapFeatureExtractor(
        feature_size=16,
        sampling_rate=16000,
        hop_length=512,
        max_length_s=2,
        fft_window_size=1024,
        frequency_max=8000,
        truncation="rand_trunc",
        padding="repeatpad",
    )
    waveforms = [np.asarray(a, dtype=np.float32) for a in audio]
    return dict(extractor(waveforms, sampling_rate=16000, return_tensors="pt"))


# ---- training and measuring ----


def example_rows(media: dict[str, torch.Tensor], caption_ids: list[list[int]], labels, idx) -> list[dict]:
    """One row per example: its media inputs and the token ids of its class caption."""
    return [{**{k: v[i] for k, v in media.items()}, "input_ids": caption_ids[labels[i]]} for i in idx.tolist()]


def train_contrastive(model, objective, rows: list[dict], epochs: int, lr: float = 3e-3, batch_size: int = 64):
    """Contrastive pre-training with the objective itself (InfoNCE with the class captions as candidates)."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            batch = objective.collator([rows[i] for i in order[start : start + batch_size]])
            loss = objective.score(model, batch).mean_nll.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def caption_logprobs(model, media: dict[str, torch.Tensor], caption_ids: list[list[int]]) -> torch.Tensor:
    """[N, classes] log p(caption | media) over the class captions (zero-shot classification)."""
    model.eval()
    width = max(len(c) for c in caption_ids)
    ids = torch.tensor([c + [0] * (width - len(c)) for c in caption_ids])
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in caption_ids])
    outputs = model(input_ids=ids, attention_mask=mask, **media)
    logits = next(getattr(outputs, k) for k in MEDIA_LOGITS if getattr(outputs, k, None) is not None)
    return logits.log_softmax(-1)


def zero_shot(model, media, caption_ids, labels, idx) -> tuple[float, float, float]:
    """(accuracy on the forgotten class, accuracy on the others, mean log p(own caption) of the forgotten class)."""
    logprobs = caption_logprobs(model, {k: v[idx] for k, v in media.items()}, caption_ids)
    y = labels[idx]
    correct = logprobs.argmax(-1) == y
    forget = y == FORGET
    own = logprobs[torch.arange(len(y)), y]
    return correct[forget].float().mean().item(), correct[~forget].float().mean().item(), own[forget].mean().item()


def unlearn(model, rows, labels, train, objective, tmp_path, strategy="grad_diff", lr=1e-4, epochs=3.0, **config):
    forget = [rows[i] for i in range(len(train)) if labels[train[i]] == FORGET]
    retain = [rows[i] for i in range(len(train)) if labels[train[i]] != FORGET]
    args = UnlearningConfig(
        output_dir=str(tmp_path),
        strategy=strategy,
        learning_rate=lr,
        num_train_epochs=epochs,
        per_device_train_batch_size=32,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        **config,
    )
    trainer = UnlearningTrainer(model, args, forget_dataset=forget, retain_dataset=retain, objective=objective)
    trainer.train()
    return trainer


# ---- the objective, by hand ----


@pytest.fixture(scope="module")
def random_clip():
    tokenizer = caption_tokenizer(IMAGE_CAPTIONS + ["a blank image"])
    images, labels, *_ = digit_split()
    pixel_values = nn.functional.interpolate(images[:6, None], size=16).repeat(1, 3, 1, 1) * 2 - 1
    return tokenizer, tiny_clip(tokenizer, seed=1).eval(), pixel_values, labels[:6]


def test_distinct_captions_are_clips_symmetric_infonce(random_clip):
    """With distinct captions the two scores are CLIP's two cross-entropies, and their mean over the two "tokens" and
    the batch is `CLIPModel(return_loss=True).loss`."""
    tokenizer, model, pixel_values, _ = random_clip
    captions = [IMAGE_CAPTIONS[d] for d in (0, 3, 5, 8)] + ["a blank image"]  # different lengths: padding
    text = tokenizer(captions, padding=True, return_tensors="pt")
    objective = ContrastiveObjective()
    batch = objective.collator(
        [{"pixel_values": p, "input_ids": ids} for p, ids in zip(pixel_values[:5], tokenizer(captions)["input_ids"])]
    )
    assert torch.equal(batch["input_ids"], text["input_ids"]) and torch.equal(
        batch["attention_mask"], text["attention_mask"]
    )
    scores = objective.score(model, batch)
    with torch.no_grad():
        outputs = model(**text, pixel_values=pixel_values[:5], return_loss=True)
    diagonal = torch.arange(5)
    assert torch.allclose(scores.token_logprobs[:, 0], outputs.logits_per_image.log_softmax(-1)[diagonal, diagonal])
    assert torch.allclose(scores.token_logprobs[:, 1], outputs.logits_per_text.log_softmax(-1)[diagonal, diagonal])
    assert torch.allclose(scores.mean_nll.mean(), outputs.loss, atol=1e-6)
    assert scores.logits.shape == (5, 2, 5) and scores.mask.all()


def test_identical_captions_are_one_candidate_and_share_positives(random_clip):
    """Captions [A, A, B] + the negative C: image -> text over {A, B, C}; text -> image of A sums the probability of
    images 0 and 1. Checked against the model's own similarities with the candidates, computed by hand."""
    tokenizer, model, pixel_values, _ = random_clip
    a, b, c = IMAGE_CAPTIONS[7], IMAGE_CAPTIONS[1], IMAGE_CAPTIONS[4]
    ids = tokenizer([a, a, b, c])["input_ids"]
    objective = ContrastiveObjective(negative_captions=[ids[3], ids[0]])  # A again: already a candidate
    batch = objective.collator([{"pixel_values": pixel_values[i], "input_ids": ids[i]} for i in range(3)])
    assert batch["labels"].tolist() == [[0, 0], [0, 0], [1, 1]]
    scores = objective.score(model, batch)
    candidates = tokenizer([a, b, c], padding=True, return_tensors="pt")
    with torch.no_grad():
        s = model(**candidates, pixel_values=pixel_values[:3]).logits_per_image.tolist()  # s[image][caption]
    caption_of = [0, 0, 1]
    for i in range(3):
        image_to_text = s[i][caption_of[i]] - math.log(sum(math.exp(s[i][k]) for k in range(3)))
        positives = [j for j in range(3) if caption_of[j] == caption_of[i]]
        text_to_image = math.log(
            sum(math.exp(s[j][caption_of[i]]) for j in positives)
            / sum(math.exp(s[j][caption_of[i]]) for j in range(3))
        )
        assert scores.token_logprobs[i].tolist() == pytest.approx([image_to_text, text_to_image], abs=1e-5)
    # the text -> image "vocabulary" is the captions too: C has no image, so probability 0 (finite logits)
    assert torch.isfinite(scores.logits).all()
    assert scores.logits[:, 1].softmax(-1)[:, 2].max() == 0


def test_contrastive_logits_on_small_tensors():
    per_media = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])  # 3 media x 2 candidate captions
    per_text = per_media.T.contiguous()
    logits = contrastive_logits(per_media, per_text, torch.tensor([0, 0, 1]))
    assert torch.equal(logits[:, 0], per_media)
    # caption 0 (examples 0 and 1): group 0 = {media 0, 1} -> log(e^2 + e^1); group 1 = {media 2} -> 0
    expected_caption_0 = [math.log(math.exp(2) + math.exp(1)), 0.0]
    expected_caption_1 = [math.log(math.exp(0) + math.exp(1)), 3.0]
    assert logits[:, 1].tolist() == [
        pytest.approx(expected_caption_0),
        pytest.approx(expected_caption_0),
        pytest.approx(expected_caption_1),
    ]


def test_grouped_logits_match_a_direct_log_sum_exp_with_gradients():
    """The scatter form of the text -> media grouping against the direct formula, values and gradients, with a
    negative caption (candidate 3) that has no medium."""
    generator = torch.Generator().manual_seed(0)
    index = torch.tensor([0, 1, 0, 2, 1, 0])
    per_media = torch.randn(6, 4, generator=generator, requires_grad=True)
    per_text = torch.randn(4, 6, generator=generator, requires_grad=True)
    logits = contrastive_logits(per_media, per_text, index)
    direct = torch.stack(
        [
            torch.stack([per_text[index[i], index == g].logsumexp(0) for g in range(3)] + [torch.tensor(-1e30)])
            for i in range(6)
        ]
    )
    assert torch.allclose(logits[:, 1, :3], direct[:, :3]) and (logits[:, 1, 3] < -1e30).all()
    weights = torch.randn(6, 3, generator=generator)
    (got,) = torch.autograd.grad((logits[:, 1, :3] * weights).sum(), per_text)
    (want,) = torch.autograd.grad((direct[:, :3] * weights).sum(), per_text)
    assert torch.allclose(got, want, atol=1e-6)


def test_one_caption_batch_has_no_gradient_without_negatives(random_clip):
    """A forget batch of one concept: without negatives both scores are log 1 = 0 and gradient ascent has nothing to
    follow; with the class captions as negatives image -> text is a real zero-shot likelihood with a gradient."""
    tokenizer, model, pixel_values, _ = random_clip
    model = copy.deepcopy(model).train()
    seven = tokenizer(IMAGE_CAPTIONS[FORGET])["input_ids"]
    rows = [{"pixel_values": p, "input_ids": seven} for p in pixel_values[:4]]
    for negatives, moves in ((None, False), (tokenizer(IMAGE_CAPTIONS), True)):
        objective = ContrastiveObjective(negative_captions=negatives)
        model.zero_grad()
        scores = objective.score(model, objective.collator(rows))
        scores.mean_nll.mean().backward()
        gradient = sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None)
        assert bool(gradient > 0) is moves
        assert torch.all(scores.token_logprobs[:, 1].abs() < 1e-6)  # every image is a positive of the caption
        assert bool(torch.all(scores.token_logprobs[:, 0] < -1e-3)) is moves


def test_kl_terms_stay_finite_with_negatives(random_clip):
    """SCRUB/KL-style terms compare the distributions over the candidates, including the negatives' zero
    text -> image probability, without NaN."""
    tokenizer, model, pixel_values, labels = random_clip
    ids = tokenizer(IMAGE_CAPTIONS)["input_ids"]
    objective = ContrastiveObjective(negative_captions=ids)
    batch = objective.collator([{"pixel_values": p, "input_ids": ids[y]} for p, y in zip(pixel_values, labels)])
    scores = objective.score(model, batch)
    assert kl_to_reference(scores, scores, temperature=4.0).abs().max() < 1e-6
    reference = copy.deepcopy(model).requires_grad_(False)
    reference.logit_scale += 0.5  # a sharper temperature: a different distribution over the same candidates
    kl = kl_to_reference(scores, objective.score(reference, batch), temperature=4.0)
    assert torch.isfinite(kl).all() and (kl > 0).all()


def test_collator_and_bad_input(random_clip):
    tokenizer, model, pixel_values, _ = random_clip
    collator = ContrastiveCollator(pad_token_id=0)
    batch = collator([{"pixel_values": pixel_values[0], "input_ids": [5, 6, 7], "index": 3, "label": 1}])
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels", "index"}
    with pytest.raises(ValueError, match="pixel_values"):
        collator([{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="no hidden states"):
        ContrastiveObjective().score(model, batch, hidden_layer=1)
    with pytest.raises(ValueError, match="media inputs"):
        ContrastiveObjective().score(model, {"input_ids": batch["input_ids"]})
    for labels in (torch.tensor([[1, 1]]), torch.tensor([4])):  # wrong indices; a class label column
        with pytest.raises(ValueError, match="caption indices"):
            ContrastiveObjective().score(model, {**batch, "labels": labels})
    with pytest.raises(ValueError, match="non-empty"):
        ContrastiveObjective(negative_captions=[[]])


def test_dual_encoders_are_detected(random_clip):
    from transformers import SiglipConfig, SiglipModel, ViTConfig, ViTForImageClassification

    tokenizer, clip, *_ = random_clip
    for model in (clip, tiny_xclip(tokenizer), tiny_clap(tokenizer)):
        objective = get_objective(None, model)
        assert objective.name == "contrastive", type(model).__name__
        assert objective.pad_token_id == tokenizer.pad_token_id
    vit = ViTForImageClassification(
        ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    )
    assert get_objective(None, vit).name == "classification"
    siglip = SiglipModel(
        SiglipConfig(
            text_config=dict(
                vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2
            ),
            vision_config=dict(
                hidden_size=8,
                intermediate_size=8,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=8,
                patch_size=4,
            ),
        )
    )
    assert get_objective(None, siglip).name != "contrastive"
    with pytest.raises(ValueError, match="sigmoid"):
        get_objective("contrastive", siglip)
    with pytest.raises(ValueError, match="dual encoder"):
        get_objective("contrastive", vit)


def test_npo_reference_is_the_model_not_a_cache(random_clip, tmp_path):
    """Scores depend on the batch, so NPO's reference log-probs come from the frozen model on the same batch."""
    tokenizer, clip, pixel_values, labels = random_clip
    ids = tokenizer(IMAGE_CAPTIONS)["input_ids"]
    rows = [{"pixel_values": p, "input_ids": ids[y]} for p, y in zip(pixel_values, labels)]
    args = dict(output_dir=str(tmp_path), strategy="npo", retain_loss="none", report_to="none")
    trainer = UnlearningTrainer(copy.deepcopy(clip), UnlearningConfig(**args), forget_dataset=rows)
    assert trainer.model_objective.name == "contrastive" and trainer.reference_mode == "copy"
    with pytest.raises(ValueError, match="cannot be cached"):
        UnlearningTrainer(clip, UnlearningConfig(**args, reference="cached"), forget_dataset=rows)


# ---- CLIP on handwritten digits ----

# The behavioural tests unlearn with NPO at beta = 1 (the paper's TOFU setting is 0.1): its weight
# sigmoid(beta * log-ratio) fades once a forget example no longer matches its caption, so forgetting stops by itself
# while the retain term keeps repairing. Gradient ascent (GradDiff) has no such brake; on these tiny models the other
# classes fall with the forgotten one (CLIP, lr 1e-4: 5 epochs leave "seven" at 28% zero-shot, 8 epochs reach 2% but
# the other digits drop from 95% to 76%).
NPO = {"beta": 1.0}


def digit_pil_images(images: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray((image.numpy() * 255).astype(np.uint8)).convert("RGB") for image in images]


@pytest.fixture(scope="module")
def clip_digits():
    """A tiny CLIP trained contrastively on 1400 digits captioned "a photo of the digit <word>" (the images go
    through a `CLIPImageProcessor` at 16x16, as the example's do)."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    images, labels, train, test = digit_split()
    tokenizer = caption_tokenizer(IMAGE_CAPTIONS + VIDEO_CAPTIONS)  # X-CLIP starts from this model
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    pil = digit_pil_images(images)
    media = {"pixel_values": processor(images=pil, return_tensors="pt")["pixel_values"]}
    captions = tokenizer(IMAGE_CAPTIONS)["input_ids"]
    objective = ContrastiveObjective(negative_captions=captions)
    model = tiny_clip(tokenizer)
    train_contrastive(model, objective, example_rows(media, captions, labels, train), epochs=30)
    return SimpleNamespace(
        model=model,
        processor=processor,
        pil=pil,
        media=media,
        captions=captions,
        labels=labels,
        train=train,
        test=test,
    )


@pytest.mark.parametrize(("use_peft", "lr", "reference"), [(False, 5e-4, "copy"), (True, 2e-3, "adapter")])
def test_clip_forgets_a_digit_to_chance(clip_digits, tmp_path, use_peft, lr, reference):
    """NPO with the class captions as negatives, on the whole model (NPO's reference: a frozen copy) or on a LoRA
    adapter (the reference: the adapter switched off)."""
    d = clip_digits
    model = copy.deepcopy(d.model)
    forget_before, retain_before, logp_before = zero_shot(model, d.media, d.captions, d.labels, d.test)
    assert forget_before > 0.8 and retain_before > 0.85, (forget_before, retain_before)
    rows = example_rows(d.media, d.captions, d.labels, d.train)
    objective = ContrastiveObjective(negative_captions=d.captions)
    trainer = unlearn(
        model, rows, d.labels, d.train, objective, tmp_path, "npo", lr, 6, strategy_kwargs=NPO, use_peft=use_peft
    )
    assert trainer.reference_mode == reference
    forget_after, retain_after, logp_after = zero_shot(trainer.model, d.media, d.captions, d.labels, d.test)
    print(
        f"CLIP npo (LoRA {use_peft}): forget {forget_before:.3f} -> {forget_after:.3f} (log p {logp_before:.2f} -> "
        f"{logp_after:.2f}), retain {retain_before:.3f} -> {retain_after:.3f}"
    )
    assert forget_after <= 0.10, (forget_before, forget_after)  # chance among the 10 captions, or below
    assert retain_after >= retain_before - 0.05, (retain_before, retain_after)


def test_example_unlearns_a_concept_from_a_saved_clip(clip_digits, tmp_path):
    """The example end to end: `from_pretrained` on a tiny CLIP saved locally, a `save_to_disk` dataset of (image,
    caption), GradDiff with the dataset's captions as negatives; held-out images of the concept fall to chance."""
    from datasets import Dataset, Features, Image, Value
    from transformers import CLIPModel

    d = clip_digits
    model_dir, data_dir, output_dir = tmp_path / "clip", tmp_path / "digits", tmp_path / "out"
    d.model.save_pretrained(model_dir)
    d.processor.save_pretrained(model_dir)
    rows = {"image": d.pil, "caption": [IMAGE_CAPTIONS[y] for y in d.labels.tolist()]}
    Dataset.from_dict(rows, features=Features({"image": Image(), "caption": Value("string")})).save_to_disk(data_dir)
    argv = ["--model", str(model_dir), "--dataset", str(data_dir), "--output_dir", str(output_dir)]
    argv += ["--forget_caption", IMAGE_CAPTIONS[FORGET], "--strategy", "npo", "--strategy_kwargs", '{"beta": 1.0}']
    argv += ["--learning_rate", "5e-4", "--num_train_epochs", "8"]
    results = load_example("unlearn_clip_concept").main(argv)
    print("example:", results)
    assert results["forget_accuracy_before"] > 0.8
    assert results["forget_accuracy_after"] <= results["chance"]
    assert results["retain_accuracy_after"] >= results["retain_accuracy_before"] - 0.05
    saved = CLIPModel.from_pretrained(output_dir)  # the unlearned weights, as safetensors
    assert (output_dir / "model.safetensors").exists()
    assert not torch.equal(saved.text_projection.weight, d.model.text_projection.weight)


# ---- X-CLIP on moving digits ----


@pytest.fixture(scope="module")
def xclip_digits(clip_digits):
    """A tiny X-CLIP initialised from the digits CLIP (X-CLIP's recipe, Ni et al. 2022: the CLIP towers; the
    cross-frame messages, the multi-frame integration transformer and the prompt generator start fresh), then trained
    contrastively on 4-frame clips of 1400 digits crossing a 16x16 canvas, captioned "a video of the digit <word>"."""
    images, labels, train, test = digit_split()
    tokenizer, image_processor = clip_digits.processor.tokenizer, clip_digits.processor.image_processor
    mean, std = (torch.tensor(v)[:, None, None] for v in (image_processor.image_mean, image_processor.image_std))
    media = {"pixel_values": ((moving_digit_clips(images) + 1) / 2 - mean) / std}  # CLIP's pixel normalisation
    captions = tokenizer(VIDEO_CAPTIONS)["input_ids"]
    model = tiny_xclip(tokenizer)
    clip_state = {k.replace("pre_layrnorm", "pre_layernorm"): v for k, v in clip_digits.model.state_dict().items()}
    assert not model.load_state_dict(clip_state, strict=False).unexpected_keys
    objective = ContrastiveObjective(negative_captions=captions)
    train_contrastive(model, objective, example_rows(media, captions, labels, train), epochs=5, lr=1e-3)
    return SimpleNamespace(model=model, media=media, captions=captions, labels=labels, train=train, test=test)


def test_xclip_unlearns_a_digit(xclip_digits, tmp_path):
    d = xclip_digits
    model = d.model
    forget_before, retain_before, logp_before = zero_shot(model, d.media, d.captions, d.labels, d.test)
    # learned (chance is 0.1): the forget digit's held-out clips 0.739 on an AMX Xeon with the pinned kernels
    assert forget_before > 0.7 and retain_before > 0.75, (forget_before, retain_before)
    rows = example_rows(d.media, d.captions, d.labels, d.train)
    objective = ContrastiveObjective(negative_captions=d.captions)
    unlearn(model, rows, d.labels, d.train, objective, tmp_path, "npo", lr=3e-4, epochs=6, strategy_kwargs=NPO)
    forget_after, retain_after, logp_after = zero_shot(model, d.media, d.captions, d.labels, d.test)
    print(
        f"X-CLIP npo: forget {forget_before:.3f} -> {forget_after:.3f} (log p {logp_before:.2f} -> "
        f"{logp_after:.2f}), retain {retain_before:.3f} -> {retain_after:.3f}"
    )
    assert logp_after < logp_before - 2.0  # the held-out clips of the digit no longer match their caption
    assert forget_after <= 0.10, (forget_before, forget_after)
    assert retain_after >= retain_before - 0.05, (retain_before, retain_after)


# ---- CLAP on spoken digit words ----


@pytest.fixture(scope="module")
def clap_words(spoken_digits):
    """A tiny CLAP trained contrastively on the 240 spoken digit words, captioned "the spoken word <word>"."""
    labels = torch.tensor(spoken_digits["label"])
    features = clap_features(spoken_digits["audio"])
    media = {"input_features": features["input_features"], "is_longer": features["is_longer"]}
    tokenizer = caption_tokenizer(AUDIO_CAPTIONS)
    captions = tokenizer(AUDIO_CAPTIONS)["input_ids"]
    objective = ContrastiveObjective(negative_captions=captions)
    model = tiny_clap(tokenizer)
    everything = torch.arange(len(labels))
    train_contrastive(model, objective, example_rows(media, captions, labels, everything), epochs=60, batch_size=40)
    return SimpleNamespace(model=model, media=media, captions=captions, labels=labels, everything=everything)


def test_clap_unlearns_a_spoken_word(clap_words, tmp_path):
    d = clap_words
    model = d.model
    forget_before, retain_before, logp_before = zero_shot(model, d.media, d.captions, d.labels, d.everything)
    assert forget_before > 0.75 and retain_before > 0.75, (forget_before, retain_before)
    rows = example_rows(d.media, d.captions, d.labels, d.everything)
    objective = ContrastiveObjective(negative_captions=d.captions)
    # 24 forget clips make one step per epoch, paired with 24 of the 216 retain clips: many small steps let the
    # retain term repair "zero" and "five", the words the model confuses with "seven" first
    unlearn(model, rows, d.labels, d.everything, objective, tmp_path, "npo", lr=3e-4, epochs=24, strategy_kwargs=NPO)
    forget_after, retain_after, logp_after = zero_shot(model, d.media, d.captions, d.labels, d.everything)
    print(
        f"CLAP npo: forget {forget_before:.3f} -> {forget_after:.3f} (log p {logp_before:.2f} -> "
        f"{logp_after:.2f}), retain {retain_before:.3f} -> {retain_after:.3f}"
    )
    assert forget_after <= 0.10, (forget_before, forget_after)
    assert retain_after >= retain_before - 0.05, (retain_before, retain_after)
