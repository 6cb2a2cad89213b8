"""ConceptErasureEvaluator: detection rate and retain accuracy by hand, fixed seeds, CLIP similarity, bad input."""

import pytest
import torch
from torch import nn

from erasus_hf.diffusion.evaluation import ConceptErasureEvaluator


class MeanClassifier(nn.Module):
    """Class = round(mean pixel) clipped to [0, 9]: the 'image' a stand-in generator draws decides it exactly."""

    def forward(self, images):
        index = images.mean((1, 2, 3)).round().clamp(0, 9).long()
        return nn.functional.one_hot(index, 10).float()


def generator_from(table):
    """(prompts, seeds) -> images whose mean is table[prompt][seed]; records the calls."""
    calls = []

    def generate(prompts, seeds):
        calls.append((list(prompts), list(seeds)))
        return torch.stack([torch.full((1, 2, 2), float(table[p][s])) for p, s in zip(prompts, seeds)])

    generate.calls = calls
    return generate


def test_detection_rate_and_retain_accuracy_by_hand():
    evaluator = ConceptErasureEvaluator(
        MeanClassifier(), forget_prompts={"three": 3}, retain_prompts={"one": 1, "seven": 7}, seeds=[10, 11, 12, 13]
    )
    table = {
        "three": {10: 3, 11: 3, 12: 5, 13: 0},  # detected 2 / 4
        "one": {10: 1, 11: 1, 12: 1, 13: 2},  # 3 / 4
        "seven": {10: 7, 11: 0, 12: 0, 13: 0},  # 1 / 4
    }
    generate = generator_from(table)
    result = evaluator.evaluate(generate)
    assert result.summary["concept_erasure/forget_detection_rate"] == pytest.approx(0.5)
    assert result.summary["concept_erasure/retain_accuracy"] == pytest.approx(0.5)  # (3 + 1) / 8
    assert result.per_example["concept_erasure/retain_accuracy"] == pytest.approx([0.75, 0.25])
    assert generate.calls[0] == (["three"] * 4, [10, 11, 12, 13])  # the same fixed seeds for every prompt
    assert generate.calls[1][1] == [10, 11, 12, 13, 10, 11, 12, 13]
    after = evaluator.evaluate(generator_from({**table, "three": {10: 0, 11: 0, 12: 0, 13: 3}}))
    assert ConceptErasureEvaluator.compare(result, after)["concept_erasure/forget_detection_rate"] == {
        "before": 0.5,
        "after": 0.25,
    }


def test_bad_input_fails_clearly():
    with pytest.raises(ValueError, match="forget prompt"):
        ConceptErasureEvaluator(MeanClassifier(), {}, {"one": 1}, seeds=[0])
    with pytest.raises(ValueError, match="clip_processor"):
        ConceptErasureEvaluator(MeanClassifier(), {"three": 3}, {}, seeds=[0], clip_model=nn.Identity())
    evaluator = ConceptErasureEvaluator(MeanClassifier(), {"three": 3}, {}, seeds=[0, 1])
    with pytest.raises(ValueError, match="returned 1 images for 2"):
        evaluator.evaluate(lambda prompts, seeds: torch.zeros(1, 1, 2, 2))


def test_clip_similarity_is_the_cosine_of_clip_features():
    """A tiny random CLIPModel: the evaluator's per-image score is cos(image features, prompt features), with
    1-channel images in [-1, 1] turned into 3-channel [0, 1] pixels."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from erasus_hf.diffusion.modeling import build_tokenizer

    tokenizer = build_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config={**vision, "patch_size": 4}, projection_dim=16)).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer,
    )
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    evaluator = ConceptErasureEvaluator(
        MeanClassifier(), {"a handwritten digit three": 3}, {}, seeds=[0, 1], clip_model=clip, clip_processor=processor
    )
    result = evaluator.evaluate(lambda prompts, seeds: images)
    with torch.no_grad():
        inputs = processor(
            text=["a handwritten digit three"],
            images=[((x + 1) / 2).expand(3, -1, -1) for x in images],
            return_tensors="pt",
            do_rescale=False,
        )
        image_features = clip.get_image_features(pixel_values=inputs["pixel_values"])
        text_features = clip.get_text_features(input_ids=inputs["input_ids"])
        image_features = getattr(image_features, "pooler_output", image_features)
        text_features = getattr(text_features, "pooler_output", text_features)
    hand = torch.nn.functional.cosine_similarity(image_features, text_features.expand(2, -1), dim=-1)
    assert result.per_example["concept_erasure/clip_forget_similarity"] == pytest.approx(hand.tolist(), abs=1e-5)
    assert result.summary["concept_erasure/clip_forget_similarity"] == pytest.approx(hand.mean().item(), abs=1e-5)
