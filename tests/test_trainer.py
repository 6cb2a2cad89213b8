"""UnlearningTrainer mechanics: accumulation, PEFT, references, logging, evaluation, saving."""

import copy
import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from erasus_hf import UnlearningConfig, UnlearningTrainer, register_strategy
from erasus_hf.evaluation import answer_nll
from erasus_hf.reference import REFERENCE_ADAPTER
from erasus_hf.strategies import STRATEGIES, Strategy

from .testing_utils import config, qa


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_gradient_accumulation_matches_a_full_batch(tmp_path, tokenizer, tiny_llama, tofu_slice):
    """accumulation 1 x batch 8 and 4 x batch 2: same logged loss, same gradient (one SGD step, same update)."""
    forget, retain = (qa(d).select(range(16)) for d in tofu_slice)
    updates, losses = [], []
    for batch, accumulation in [(8, 1), (2, 4)]:
        model = copy.deepcopy(tiny_llama)
        before = params(model)
        args = config(
            tmp_path,
            strategy="npo",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            lr_scheduler_type="constant",
            max_grad_norm=0,
        )
        trainer = UnlearningTrainer(
            model, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer
        )
        trainer.train()
        updates.append({n: p.detach() - before[n] for n, p in model.named_parameters()})
        losses.append(trainer.state.log_history[0])
    assert losses[0]["loss"] == pytest.approx(losses[1]["loss"], rel=1e-5)
    assert losses[0]["forget_loss"] == pytest.approx(losses[1]["forget_loss"], rel=1e-5)
    for name, delta in updates[0].items():
        assert torch.allclose(delta, updates[1][name], atol=1e-6, rtol=1e-4), name
    assert any(d.abs().max() > 1e-4 for d in updates[0].values())


def test_lora_trains_adapter_only_and_saves_only_it(tmp_path, tokenizer, tiny_llama, tofu_slice):
    forget, retain = (qa(d) for d in tofu_slice)
    base_before, fresh_base = params(tiny_llama), copy.deepcopy(tiny_llama)
    reference_logits = tiny_llama(**tokenizer(["Question: who?"], return_tensors="pt")).logits
    args = config(tmp_path, strategy="grad_diff", retain_loss="kl", use_peft=True, lora_r=4, max_steps=4)
    trainer = UnlearningTrainer(
        tiny_llama, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer
    )
    assert trainer.reference_mode == "adapter"
    lora_before = {n: p for n, p in params(trainer.model).items() if "lora_" in n}
    trainer.train()
    after = params(trainer.model)
    for name, value in base_before.items():  # base weights untouched
        peft_name = next(
            n for n in after if n.endswith(name.replace(".weight", ".base_layer.weight")) or n.endswith(name)
        )
        assert torch.equal(after[peft_name], value), name
    assert any(not torch.equal(after[n], v) for n, v in lora_before.items())
    # adapter off is the base model
    inputs = tokenizer(["Question: who?"], return_tensors="pt")
    with trainer.model.disable_adapter():
        assert torch.allclose(trainer.model(**inputs).logits, reference_logits, atol=1e-6)
    trainer.save_model()
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists() and not any(p.suffix in (".bin", ".pt") for p in out.iterdir())
    trained_logits = trainer.model(**inputs).logits
    reloaded = PeftModel.from_pretrained(fresh_base, str(out))
    assert torch.allclose(reloaded(**inputs).logits, trained_logits, atol=1e-5)
    assert {"erasus-hf", "unlearning", "grad_diff"} <= set(trainer.model.model_tags)


def test_pretrained_adapter_is_snapshot_as_reference(tmp_path, tokenizer, tiny_llama, tofu_slice):
    forget, retain = (qa(d) for d in tofu_slice)
    model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)  # a "trained" adapter: adapter-off is no longer the starting model
    inputs = tokenizer(["Question: who?"], return_tensors="pt")
    starting_logits = model(**inputs).logits.detach()
    args = config(tmp_path, strategy="grad_diff", retain_loss="kl", max_steps=4)
    trainer = UnlearningTrainer(model, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer)
    trainer.train()
    assert not torch.allclose(trainer.model(**inputs).logits, starting_logits, atol=1e-4)  # it trained
    batch = {k: v for k, v in inputs.items()}
    batch["labels"] = batch["input_ids"]
    ref = trainer.reference.scores(trainer.model_objective, batch)
    assert torch.allclose(ref.logits, starting_logits[:, :-1], atol=1e-5)
    trainer.save_model()
    saved = os.listdir(tmp_path / "out")
    assert REFERENCE_ADAPTER not in saved and "adapter_model.safetensors" in saved
    assert not any(REFERENCE_ADAPTER in k for k in load_file(tmp_path / "out" / "adapter_model.safetensors"))


# (strategy, its diagnostic, the sign the diagnostic takes once training moved away from the reference)
CACHEABLE = [("npo", "npo_log_ratio", -1), ("idk_dpo", "dpo_margin", 1)]


@pytest.mark.parametrize(("strategy", "diagnostic", "sign"), CACHEABLE)
def test_cached_and_on_the_fly_reference_give_the_same_losses(
    tmp_path, tokenizer, tiny_llama, tofu_slice, strategy, diagnostic, sign
):
    forget, retain = (qa(d).select(range(16)) for d in tofu_slice)
    histories = []
    for mode in ("cached", "copy"):
        args = config(tmp_path, strategy=strategy, reference=mode, max_steps=3, learning_rate=5e-3)
        trainer = UnlearningTrainer(
            copy.deepcopy(tiny_llama), args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer
        )
        assert trainer.reference_mode == mode
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        histories.append([h["loss"] for h in logs] + [h[diagnostic] for h in logs])
    assert len(histories[0]) == 6
    assert histories[0] == pytest.approx(histories[1], rel=1e-4, abs=1e-5)
    assert sign * histories[0][-1] > 1e-3  # the diagnostic moved away from 0: the reference is really the start


def test_reference_free_strategies_build_none(tmp_path, tokenizer, tiny_llama, tofu_slice):
    forget, retain = (qa(d) for d in tofu_slice)
    for name in ("ga", "simnpo"):
        trainer = UnlearningTrainer(
            copy.deepcopy(tiny_llama),
            config(tmp_path, strategy=name),
            forget_dataset=forget,
            retain_dataset=None if name == "ga" else retain,
            processing_class=tokenizer,
        )
        assert trainer.reference is None and trainer.reference_mode == "none"


def test_merge_writes_a_full_model_equal_to_the_adapted_one(tmp_path, tokenizer, tiny_llama, tofu_slice):
    forget, retain = (qa(d) for d in tofu_slice)
    args = config(tmp_path, strategy="npo", use_peft=True, merge_adapter=True, max_steps=2, learning_rate=1e-2)
    trainer = UnlearningTrainer(
        tiny_llama, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer
    )
    trainer.train()
    trainer.save_model()
    inputs = tokenizer(["Question: who?"], return_tensors="pt")
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.allclose(merged(**inputs).logits, trainer.model(**inputs).logits, atol=1e-5)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


class _Recorder(Strategy):
    """A test strategy whose forget loss is a known sequence of numbers, to check window averaging."""

    name = "recorder_for_tests"
    paper = "none"
    uses_retain = False

    def __init__(self) -> None:
        self.calls = 0

    def forget_loss(self, ctx, forget):
        self.calls += 1
        nll = ctx.score(forget).mean_nll.mean()
        return nll * 0 + float(self.calls), {"marker": torch.tensor(10.0 * self.calls)}


def test_components_are_logged_and_averaged_over_the_window(tmp_path, tokenizer, tiny_llama, tofu_slice):
    register_strategy(_Recorder)
    try:
        args = config(tmp_path, strategy="recorder_for_tests", max_steps=4, logging_steps=2)
        trainer = UnlearningTrainer(tiny_llama, args, forget_dataset=qa(tofu_slice[0]), processing_class=tokenizer)
        trainer.train()
    finally:
        STRATEGIES.pop("recorder_for_tests")
    logs = [h for h in trainer.state.log_history if "marker" in h]
    assert [h["marker"] for h in logs] == [15.0, 35.0]
    assert [h["forget_loss"] for h in logs] == [1.5, 3.5]


def test_evaluate_reports_forget_and_retain_nll(tmp_path, tokenizer, tiny_llama, tofu_slice):
    forget, retain = (qa(d) for d in tofu_slice)
    trainer = UnlearningTrainer(
        tiny_llama,
        config(tmp_path, strategy="npo"),
        forget_dataset=forget,
        retain_dataset=retain,
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    expected = answer_nll(tiny_llama, tokenizer, forget["question"], forget["answer"]).mean().item()
    assert metrics["eval_forget_nll"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval_npo_log_ratio"] == pytest.approx(0.0, abs=1e-5)  # untrained: policy == reference
    assert "eval_retain_nll" in metrics and "eval_loss" in metrics


def test_saved_config_is_json_and_strategy_recorded(tmp_path, tokenizer, tiny_llama, tofu_slice):
    forget, retain = (qa(d) for d in tofu_slice)
    args = config(tmp_path, strategy="simnpo", strategy_kwargs='{"beta": 3.0}', max_steps=1)
    trainer = UnlearningTrainer(
        tiny_llama, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer
    )
    trainer.train()
    trainer.save_model()
    strategy = json.loads((tmp_path / "out" / "strategy.json").read_text())
    assert strategy["name"] == "simnpo" and strategy["beta"] == 3.0 and strategy["gamma_margin"] == 0.0
    assert json.loads((tmp_path / "out" / "unlearning_config.json").read_text())["strategy"] == "simnpo"


def test_copy_reference_stays_the_start_when_forward_was_patched(tmp_path, tokenizer, tiny_llama, tofu_slice):
    """TRL's SFTTrainer leaves `model.forward` as a closure over the model; the frozen copy must not follow it."""
    original = tiny_llama.forward
    tiny_llama.forward = lambda *a, **kw: original(*a, **kw)
    batch = {**tokenizer(["Question: who?"], return_tensors="pt")}
    batch["labels"] = batch["input_ids"]
    starting = tiny_llama(**batch).logits.detach()
    forget, retain = (qa(d) for d in tofu_slice)
    args = config(tmp_path, strategy="grad_diff", retain_loss="kl", max_steps=3, learning_rate=1e-2)
    trainer = UnlearningTrainer(
        tiny_llama, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer
    )
    assert trainer.reference_mode == "copy"
    trainer.train()
    assert not torch.allclose(tiny_llama(**batch).logits, starting, atol=1e-4)
    assert torch.allclose(trainer.reference.scores(trainer.model_objective, batch).logits, starting[:, :-1], atol=1e-6)


def test_model_given_as_a_local_path_loads_with_its_tokenizer(tmp_path, tokenizer, tiny_llama, tofu_slice):
    path = tmp_path / "finetuned"
    tiny_llama.save_pretrained(path)
    tokenizer.save_pretrained(path)
    trainer = UnlearningTrainer(str(path), config(tmp_path, strategy="ga"), forget_dataset=qa(tofu_slice[0]))
    assert isinstance(trainer.model, LlamaForCausalLM) and trainer.processing_class is not None
    for name, p in tiny_llama.named_parameters():
        assert torch.equal(p, trainer.model.get_parameter(name)), name


def test_objective_gives_hidden_states_at_a_layer(tokenizer, tiny_llama):
    from erasus_hf.data.collator import QACollator
    from erasus_hf.objectives import CausalLMObjective

    batch = QACollator(tokenizer)([{"question": "Who?", "answer": "Someone."}])
    scores = CausalLMObjective().score(tiny_llama, batch, hidden_layer=1)
    expected = tiny_llama(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[1]
    assert torch.allclose(scores.hidden_states, expected, atol=1e-6)


def test_evaluate_on_a_separate_forget_set_uses_its_own_cache_entries(tmp_path, tokenizer, tiny_llama, tofu_slice):
    forget, retain = (qa(d) for d in tofu_slice)
    train_forget, eval_forget = forget.select(range(20)), forget.select(range(20, 36))
    trainer = UnlearningTrainer(
        tiny_llama,
        config(tmp_path, strategy="npo"),
        forget_dataset=train_forget,
        retain_dataset=retain,
        processing_class=tokenizer,
        eval_dataset={"forget": eval_forget, "retain": retain.select(range(16))},
    )
    assert trainer.reference.logprobs.shape[0] == 36  # one cache: training rows, then the eval rows
    metrics = trainer.evaluate()
    expected = answer_nll(tiny_llama, tokenizer, eval_forget["question"], eval_forget["answer"]).mean().item()
    assert metrics["eval_forget_nll"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval_npo_log_ratio"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="eval_dataset must be"):
        UnlearningTrainer(
            tiny_llama,
            config(tmp_path, strategy="npo"),
            forget_dataset=train_forget,
            retain_dataset=retain,
            processing_class=tokenizer,
            eval_dataset={"test": eval_forget},
        )


def test_config_parses_from_the_command_line():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(UnlearningConfig)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            "x",
            "--strategy",
            "npo",
            "--strategy_kwargs",
            '{"beta": 0.2}',
            "--use_peft",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
            "--retain_loss",
            "kl",
        ]
    )
    assert args.strategy_kwargs == {"beta": 0.2} and args.use_peft and args.lora_target_modules == ["q_proj", "v_proj"]
    assert "cached" in parser.format_help() and "--forget_weight" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", "x", "--retain_loss", "mse"])


def test_the_adapter_initialisation_follows_the_seed_not_what_ran_before(tmp_path, tokenizer, tiny_llama, tofu_slice):
    forget = qa(tofu_slice[0]).select(range(4))
    adapters = []
    for draws in (0, 5):
        torch.rand(draws)  # whatever consumed the global generator before the trainer was built
        model = copy.deepcopy(tiny_llama)
        trainer = UnlearningTrainer(
            model, config(tmp_path, strategy="ga", use_peft=True), forget_dataset=forget, processing_class=tokenizer
        )
        adapters.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n})
    assert adapters[0] and adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])
