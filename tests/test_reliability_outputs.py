"""What erasus_hf writes: complete or absent, one run per folder, never non-finite weights, and a run whose loss runs
away stops instead of ending as if it were finished (issue 15, "Safe by default")."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import signal
import sys

import pytest
import safetensors.torch
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import HfArgumentParser, LlamaForCausalLM, PreTrainedTokenizerFast

import erasus_hf.output_folder as output_folder
from erasus_hf import UnlearningConfig, UnlearningTrainer, register_strategy
from erasus_hf.divergence import TrainingDivergedError
from erasus_hf.hub.push import files_to_push
from erasus_hf.output_folder import check_finite_weights
from erasus_hf.strategies import STRATEGIES, Strategy

from .testing_utils import qa, snapshot


def config(tmp_path, **kwargs) -> UnlearningConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        strategy="ga",
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_steps=1,
        logging_steps=1,
        seed=0,
    )
    return UnlearningConfig(**{**values, **kwargs})


def llm_trainer(tmp_path, tokenizer, model, tofu_slice, **kwargs) -> UnlearningTrainer:
    return UnlearningTrainer(
        model, config(tmp_path, **kwargs), forget_dataset=qa(tofu_slice[0]), processing_class=tokenizer
    )


def perturb(model: nn.Module, by: float = 0.25) -> None:
    """Stand-in for more training: every trainable tensor moves, so every weight file of the next save differs."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(by)


class WriteFault:
    """Raise `error` when the save starts its write number `at` (0-based): Python's `open` for writing, safetensors'
    `save_file` under every name it was imported as, and the fast tokenizer's tokenizer.json (written from Rust).
    `at=None` only counts the writes."""

    def __init__(self, at: int | None, error: BaseException) -> None:
        self.at, self.error, self.count = at, error, 0

    def tick(self) -> None:
        if self.count == self.at:
            raise self.error
        self.count += 1

    def install(self, mp: pytest.MonkeyPatch) -> None:
        real_open, real_save = io.open, safetensors.torch.save_file
        real_tokenizer = PreTrainedTokenizerFast._save_pretrained

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(mode, str) and any(c in mode for c in "wax+"):
                self.tick()
            return real_open(file, mode, *args, **kwargs)

        def save_file(*args, **kwargs):
            self.tick()
            return real_save(*args, **kwargs)

        def tokenizer_save(tokenizer, *args, **kwargs):
            self.tick()
            return real_tokenizer(tokenizer, *args, **kwargs)

        mp.setattr(builtins, "open", open_)
        mp.setattr(io, "open", open_)
        for module in list(sys.modules.values()):
            for name, value in list(getattr(module, "__dict__", {}).items()):
                if value is real_save:
                    mp.setattr(module, name, save_file)
        mp.setattr(PreTrainedTokenizerFast, "_save_pretrained", tokenizer_save)


def interrupt_every_write(trainer: UnlearningTrainer, output_dir: str, error: BaseException) -> int:
    """Save `trainer` into `output_dir`, interrupted at its first file write, then at its second, ... until a save
    gets through; after every interrupted one the folder, and the folder it sits in, must be exactly as before (no
    staging folder left either). Returns the number of writes of a whole save."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    before, beside = snapshot(output_dir), sorted(os.listdir(parent))
    at = 0
    while True:
        fault = WriteFault(at, error)
        with pytest.MonkeyPatch.context() as mp:
            fault.install(mp)
            try:
                trainer.save_model(output_dir)
            except type(error) as raised:
                assert raised is error and fault.count == at
            else:
                return at
        assert snapshot(output_dir) == before, f"interrupted at write {at}: the folder changed"
        assert sorted(os.listdir(parent)) == beside, f"interrupted at write {at}: something was left beside it"
        at += 1


# ---- complete or absent -------------------------------------------------------------------------------------------

LLM_KINDS = {  # UnlearningTrainer._save's kinds for a causal LM: the weights file(s) it writes
    "adapter": (dict(use_peft=True), "adapter_model.safetensors"),
    "merged": (dict(use_peft=True, merge_adapter=True), "model.safetensors"),
    "full": (dict(), "model.safetensors"),
}


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
@pytest.mark.parametrize("kind", list(LLM_KINDS))
def test_interrupted_save_leaves_the_previous_run_exactly(tmp_path, tokenizer, tiny_llama, tofu_slice, kind, error):
    options, weights = LLM_KINDS[kind]
    trainer = llm_trainer(tmp_path, tokenizer, tiny_llama, tofu_slice, **options)
    out = trainer.args.output_dir
    trainer.save_model()  # the previous run
    perturb(trainer.model)
    trainer.save_model(str(tmp_path / "new"))  # the new run, saved elsewhere for comparison
    assert interrupt_every_write(trainer, out, error) >= 5  # weights, configs, tokenizer (2), run config, strategy
    assert snapshot(out) == snapshot(tmp_path / "new")  # the save that got through: the new run, whole
    assert load_file(os.path.join(out, weights)).keys() == load_file(tmp_path / "new" / weights).keys()


def test_interrupted_adapter_save_reloads_as_the_previous_adapter(tmp_path, tokenizer, tiny_llama, tofu_slice):
    """The end-to-end reading of the same property: PEFT loads the previous adapter, to the bit."""
    import copy

    base = copy.deepcopy(tiny_llama)
    trainer = llm_trainer(tmp_path, tokenizer, tiny_llama, tofu_slice, use_peft=True)
    trainer.save_model()
    ids = torch.tensor([tokenizer("Who wrote the book?")["input_ids"]])
    with torch.no_grad():
        expected = trainer.model(ids).logits
    perturb(trainer.model)
    fault = WriteFault(2, KeyboardInterrupt())  # after the card and the adapter weights: the old code's mix
    with pytest.MonkeyPatch.context() as mp:
        fault.install(mp)
        with pytest.raises(KeyboardInterrupt):
            trainer.save_model()
    reloaded = PeftModel.from_pretrained(base, trainer.args.output_dir)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_interrupted_first_save_leaves_no_folder(tmp_path, tokenizer, tiny_llama, tofu_slice):
    """A save into a folder that does not exist yet (a checkpoint, a fresh output_dir) appears whole or not at all."""
    trainer = llm_trainer(tmp_path, tokenizer, tiny_llama, tofu_slice, use_peft=True)
    target = tmp_path / "final"
    assert interrupt_every_write(trainer, str(target), KeyboardInterrupt()) >= 5  # snapshot({}) == {}: absent
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(target))


class TinyClassifier(nn.Module):
    """A plain nn.Module (not a PreTrainedModel), with a buffer, as the classification objective takes."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)


def classifier_trainer(tmp_path, model: nn.Module, **kwargs) -> UnlearningTrainer:
    generator = torch.Generator().manual_seed(0)
    rows = [{"pixel_values": torch.randn(8, generator=generator), "labels": i % 3} for i in range(8)]
    return UnlearningTrainer(model, config(tmp_path, retain_loss="none", **kwargs), forget_dataset=rows)


def test_interrupted_plain_module_save_leaves_the_previous_run(tmp_path):
    torch.manual_seed(0)
    trainer = classifier_trainer(tmp_path, TinyClassifier())
    trainer.save_model()
    perturb(trainer.model)
    # model.safetensors, unlearning_config.json, strategy.json
    assert interrupt_every_write(trainer, trainer.args.output_dir, KeyboardInterrupt()) == 3


@pytest.mark.parametrize("lora", [True, False], ids=["unet-lora", "trained-tensors"])
def test_interrupted_diffusion_save_leaves_the_previous_run(tmp_path, lora):
    pytest.importorskip("diffusers")
    from erasus_hf.diffusion.modeling import build_digit_model, digit_prompt

    model = build_digit_model()
    strategy = {"variant": "esd-x", "num_inference_steps": 2} if lora else {"variant": "esd-x-strict"}
    trainer = UnlearningTrainer(
        model.unet,
        config(tmp_path, strategy="esd", strategy_kwargs=strategy, use_peft=lora, lora_r=4, retain_loss="none"),
        forget_dataset=[{"prompt": digit_prompt(3)}] * 2,
        objective=model.objective,
    )
    trainer.save_model()
    perturb(trainer.model)
    # the weights, unlearning_config.json, strategy.json
    assert interrupt_every_write(trainer, trainer.args.output_dir, KeyboardInterrupt()) == 3


def test_a_save_keeps_what_else_the_folder_holds(tmp_path, tokenizer, tiny_llama, tofu_slice):
    trainer = llm_trainer(tmp_path, tokenizer, tiny_llama, tofu_slice, use_peft=True)
    out = trainer.args.output_dir
    trainer.save_model()
    trainer.create_model_card()  # our card replaces PEFT's generic one
    others = {
        "eval.json": "{}",
        "report.json": "{}",
        "checkpoint-2/trainer_state.json": "{}",
        "runs/events.out": "x",
        "starting_model/config.json": "{}",
    }
    for name, text in others.items():
        os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
    card = ModelCard.load(os.path.join(out, "README.md"))
    perturb(trainer.model)
    trainer.save_model()
    for name, text in others.items():
        assert open(os.path.join(out, name)).read() == text, name
    after = ModelCard.load(os.path.join(out, "README.md"))  # PEFT updated our card's metadata, as before
    assert after.text.strip() == card.text.strip() and "erasus-hf" in after.data.tags
    assert not [n for n in os.listdir(out) if output_folder.STAGING_MARK in n]


def test_ctrl_c_during_the_final_renames_arrives_after_the_folder_is_complete(
    tmp_path, tokenizer, tiny_llama, tofu_slice, monkeypatch
):
    trainer = llm_trainer(tmp_path, tokenizer, tiny_llama, tofu_slice, use_peft=True)
    out = trainer.args.output_dir
    trainer.save_model()
    perturb(trainer.model)
    trainer.save_model(str(tmp_path / "probe"))
    real_move = output_folder._move_in
    calls = []

    def move_in(source, target):
        if not calls:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in the middle of moving the files in
        calls.append(target)
        real_move(source, target)

    monkeypatch.setattr(output_folder, "_move_in", move_in)
    # Ctrl-C as a terminal delivers it (a job started in the background with `&` ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.save_model()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(calls) == len(os.listdir(tmp_path / "probe"))  # every file moved in before the interrupt
    assert snapshot(out) == snapshot(tmp_path / "probe")


def test_a_crash_during_the_final_renames_leaves_a_folder_that_refuses_to_load(
    tmp_path, tokenizer, tiny_llama, tofu_slice
):
    """An error (standing in for a kill) at each step of moving the files in: the folder is the previous run, or
    has no adapter_config.json (PEFT refuses it); never a loadable mix."""
    trainer = llm_trainer(tmp_path, tokenizer, tiny_llama, tofu_slice, use_peft=True)
    perturb(trainer.model)
    trainer.save_model(str(tmp_path / "new"))
    steps = len(os.listdir(tmp_path / "new")) + 1  # adapter_config.json out first, then every file in
    for at in range(steps):
        folder = str(tmp_path / f"crash-{at}")
        perturb(trainer.model, -0.25)
        trainer.save_model(folder)  # the previous run
        old = snapshot(folder)
        perturb(trainer.model, 0.25)
        done = []

        def failing(real, at=at, done=done):
            def step(*args):
                if len(done) == at:
                    raise OSError(errno.EIO, "simulated crash")
                done.append(args)
                return real(*args)

            return step

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(output_folder, "_discard", failing(output_folder._discard))
            mp.setattr(output_folder, "_move_in", failing(output_folder._move_in))
            with pytest.raises(OSError, match="simulated crash"):
                trainer.save_model(folder)
        state = snapshot(folder)
        if "adapter_config.json" in state:
            assert state == old, f"crash at step {at}: a loadable mix {sorted(state)}"
        else:
            with pytest.raises(ValueError, match="adapter_config.json"):
                PeftModel.from_pretrained(LlamaForCausalLM(tiny_llama.config), folder)
    assert at == steps - 1 and len(done) == steps - 1  # the last round failed at the last rename


# ---- one run per folder -------------------------------------------------------------------------------------------


def full_run(folder, tiny_llama, tokenizer) -> None:
    tiny_llama.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for name, text in (("eval.json", '{"run": "the other one"}'), ("README.md", "# the other run's card")):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


def test_a_folder_holding_another_run_is_refused_before_any_compute(tmp_path, tokenizer, tiny_llama, tofu_slice):
    out = tmp_path / "out"
    full_run(out, tiny_llama, tokenizer)
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=r"another run's weights \['model.safetensors'\].*overwrite_output_dir"):
        # the model, given as a path that does not exist, is never read: the refusal comes first
        UnlearningTrainer(str(tmp_path / "no-such-model"), config(tmp_path), forget_dataset=qa(tofu_slice[0]))
    assert snapshot(out) == before


def test_overwrite_replaces_the_other_run_when_the_new_one_is_saved(tmp_path, tokenizer, tiny_llama, tofu_slice):
    out = tmp_path / "out"
    full_run(out, tiny_llama, tokenizer)
    os.makedirs(out / "checkpoint-7")
    before = snapshot(out)
    trainer = llm_trainer(tmp_path, tokenizer, tiny_llama, tofu_slice, use_peft=True, overwrite_output_dir=True)
    assert snapshot(out) == before  # the other run stays until this one is complete
    trainer.save_model()
    names = set(os.listdir(out))
    assert {"adapter_model.safetensors", "adapter_config.json", "checkpoint-7"} <= names
    assert not names & {"model.safetensors", "config.json", "generation_config.json", "eval.json"}
    assert "the other run's" not in (out / "README.md").read_text()  # PEFT's card for this run, not the old one
    files_to_push(str(out))  # one kind of weights: pushable


def test_save_model_into_another_runs_folder_is_refused(tmp_path, tokenizer, tiny_llama, tofu_slice):
    other = tmp_path / "other"
    full_run(other, tiny_llama, tokenizer)
    before = snapshot(other)
    trainer = llm_trainer(tmp_path, tokenizer, tiny_llama, tofu_slice, use_peft=True)
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        trainer.save_model(str(other))
    assert snapshot(other) == before


def test_a_checkpoint_folder_is_replaced_whole(tmp_path, tokenizer, tiny_llama, tofu_slice):
    """A resumed run saves checkpoint-N again: the Trainer's own folder, replaced without leftovers."""
    trainer = llm_trainer(tmp_path, tokenizer, tiny_llama, tofu_slice, use_peft=True)
    checkpoint = tmp_path / "out" / "checkpoint-1"
    full_run(checkpoint, tiny_llama, tokenizer)
    trainer.save_model(str(checkpoint))
    assert not {"model.safetensors", "config.json", "eval.json"} & set(os.listdir(checkpoint))


def test_push_refuses_a_folder_with_two_kinds_of_weights(tmp_path, tokenizer, tiny_llama, tofu_slice):
    out = tmp_path / "out"
    full_run(out, tiny_llama, tokenizer)
    trainer = llm_trainer(tmp_path, tokenizer, tiny_llama, tofu_slice, use_peft=True, overwrite_output_dir=True)
    trainer.save_model(str(tmp_path / "adapter"))
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # the old code's leftovers, made by hand
        os.link(tmp_path / "adapter" / name, out / name)
    with pytest.raises(ValueError, match=r"LoRA adapter: \['adapter_model.safetensors'\]; full model: \['model"):
        files_to_push(str(out))


def test_the_new_options_parse_from_the_command_line_and_bad_values_are_named():
    (args,) = HfArgumentParser(UnlearningConfig).parse_args_into_dataclasses(
        ["--output_dir", "x", "--overwrite_output_dir", "--divergence_factor", "50"]
    )
    assert args.overwrite_output_dir is True and args.divergence_factor == 50
    assert UnlearningConfig(output_dir="x", divergence_factor=0).divergence_factor is None
    assert UnlearningConfig(output_dir="x").divergence_factor == 10
    for bad in (1.0, 0.5, -3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="divergence_factor must be a number > 1"):
            UnlearningConfig(output_dir="x", divergence_factor=bad)


# ---- never write broken weights -----------------------------------------------------------------------------------


def test_a_nan_in_a_frozen_weight_is_not_merged_and_saved(tmp_path, tokenizer, tiny_llama, tofu_slice):
    trainer = llm_trainer(tmp_path, tokenizer, tiny_llama, tofu_slice, use_peft=True, merge_adapter=True)
    trainer.save_model()
    before = snapshot(trainer.args.output_dir)
    with torch.no_grad():
        tiny_llama.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")  # frozen: LoRA trains the adapter
    with pytest.raises(FloatingPointError, match=r"non-finite weights .*model.safetensors:model.layers.1.self_attn"):
        trainer.save_model()
    assert snapshot(trainer.args.output_dir) == before  # the previous, finite run stays


def test_a_nan_in_a_frozen_weight_of_a_full_model_is_refused(tmp_path, tokenizer, tiny_llama, tofu_slice):
    tiny_llama.model.embed_tokens.requires_grad_(False)  # a full fine-tune that keeps the embeddings
    trainer = llm_trainer(tmp_path, tokenizer, tiny_llama, tofu_slice)
    with torch.no_grad():
        tiny_llama.model.embed_tokens.weight[3, 1] = float("inf")
    with pytest.raises(FloatingPointError, match="embed_tokens"):
        trainer.save_model()
    assert not os.path.exists(os.path.join(trainer.args.output_dir, "model.safetensors"))


def test_a_nan_in_a_buffer_of_a_plain_module_is_refused(tmp_path):
    model = TinyClassifier()
    trainer = classifier_trainer(tmp_path, model)
    model.net[1].running_var[0] = float("nan")
    with pytest.raises(FloatingPointError, match="running_var"):
        trainer.save_model()
    with pytest.raises(FloatingPointError, match="running_var"):
        check_finite_weights(model)  # the guard after a one-shot edit looks at the same tensors


# ---- a run that runs away stops -----------------------------------------------------------------------------------


class _Scripted(Strategy):
    """A test strategy whose logged terms follow a script: `forget_loss` and, with a retain set, `retain_loss`."""

    name = "scripted_for_tests"
    paper = "none"
    script: dict[str, list[float]] = {}

    def __init__(self) -> None:
        self.step = 0

    def compute_loss(self, ctx, forget, retain):
        zero = ctx.score(forget).mean_nll.mean() * 0  # a graph for backward, no update
        metrics = {k: torch.tensor(v[self.step]) for k, v in self.script.items()}
        self.step += 1
        return zero + sum(metrics.values()), metrics


def scripted_run(tmp_path, tokenizer, model, tofu_slice, script, **kwargs) -> UnlearningTrainer:
    _Scripted.script = script
    _Scripted.uses_retain = any(k.endswith("retain_loss") for k in script)
    register_strategy(_Scripted)
    try:
        forget, retain = (qa(d) for d in tofu_slice)
        args = config(tmp_path, strategy="scripted_for_tests", max_steps=len(next(iter(script.values()))), **kwargs)
        trainer = UnlearningTrainer(
            model,
            args,
            forget_dataset=forget,
            retain_dataset=retain if _Scripted.uses_retain else None,
            processing_class=tokenizer,
        )
        trainer.train()
    finally:
        STRATEGIES.pop("scripted_for_tests")
    return trainer


@pytest.mark.parametrize(
    ("script", "step", "value", "limit"),
    [
        ({"forget_loss": [-1.0] * 5, "retain_loss": [2.0, 3.0, 19.0, 21.0, 5.0]}, 4, "21", "20"),  # 10 x start
        ({"forget_loss": [-1.0] * 5, "retain_loss": [0.0, 0.5, 9.0, 10.5, 1.0]}, 4, "10.5", "10"),  # a KL: 10 x 1
        ({"forget_loss": [3.0, 4.0, 31.0, 1.0]}, 3, "31", "30"),  # no retain term: the forget term
        ({"npo/forget_loss": [1.0] * 4, "npo/retain_loss": [0.5, 2.0, 11.0, 1.0]}, 3, "11", "10"),  # an ensemble's
    ],
    ids=["retain-nll", "retain-kl-from-zero", "forget-term", "ensemble-member"],
)
def test_divergence_stops_at_the_step_that_passes_the_multiple(
    tmp_path, tokenizer, tiny_llama, tofu_slice, script, step, value, limit
):
    with pytest.raises(TrainingDivergedError, match=rf"at step {step}: [\w/]+ = {value}, .* = {limit} "):
        scripted_run(tmp_path, tokenizer, tiny_llama, tofu_slice, script)


def test_a_falling_forget_term_and_a_disabled_check_never_stop(tmp_path, tokenizer, tiny_llama, tofu_slice):
    ga_like = {"forget_loss": [-1.0, -50.0, -900.0]}  # GA's term, -NLL: it falls without bound by design
    assert scripted_run(tmp_path, tokenizer, tiny_llama, tofu_slice, ga_like).state.global_step == 3
    runaway = {"forget_loss": [-1.0] * 3, "retain_loss": [2.0, 50.0, 9e6]}
    trainer = scripted_run(tmp_path, tokenizer, tiny_llama, tofu_slice, runaway, divergence_factor=None)
    assert trainer.state.global_step == 3


def test_a_real_runaway_stops_and_nothing_is_saved_as_finished(tmp_path, tokenizer, tiny_llama, tofu_slice):
    """GradDiff at learning rate 1: the retain NLL climbs from 6.2 past 10x within a few steps (measured here: 6.2,
    23.8, 56.3, 84.2, ... 461 by step 10, every value finite). A checkpoint is due at every step."""
    forget, retain = (qa(d) for d in tofu_slice)
    args = config(
        tmp_path, strategy="grad_diff", learning_rate=1.0, lr_scheduler_type="constant", max_steps=10,
        save_strategy="steps", save_steps=1,
    )  # fmt: skip
    trainer = UnlearningTrainer(
        tiny_llama, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer
    )
    with pytest.raises(TrainingDivergedError, match=r"at step (\d+): retain_loss = [\d.e+]+, more than") as caught:
        trainer.train()
    step = int(caught.value.args[0].split("at step ")[1].split(":")[0])
    out = trainer.args.output_dir
    assert 2 <= step < 10
    assert not output_folder.weight_files(out) and not os.path.exists(os.path.join(out, "unlearning_config.json"))
    saved = sorted(int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert saved == list(range(1, step))  # the steps before the runaway, never the step that tripped
    state = json.loads(open(os.path.join(out, f"checkpoint-{step - 1}", "trainer_state.json")).read())
    assert state["global_step"] == step - 1
