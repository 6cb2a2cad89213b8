"""Exact resume: a run killed with SIGKILL mid-epoch and resumed with `resume_from_checkpoint=True` ends at the
uninterrupted run's weights, whatever the strategy keeps between steps (the retain pairing of the epoch, the cached
reference log-probs, PDU's dual variable, SCRUB's phase, SalUn's mask), and a checkpoint that belongs to another run
is refused before any compute.

Every run trains in a forked child of the test process (a fresh process for the trainer, without paying the imports
again): one uninterrupted, one that SIGKILLs itself two steps after a mid-epoch checkpoint, and one that resumes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.data.pairing import ForgetRetainDataset
from erasus_hf.resume import RESUME_STATE_NAME
from erasus_hf.strategies import get_strategy

from .testing_utils import qa, small_llama

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill -9 runs fork a child process")

# 12 forget rows in batches of 4: 3 optimizer steps per epoch, 3 epochs. checkpoint-5 is at epoch 1.67 (mid-epoch,
# rounding to 2), the child is killed at step 7, and the resumed run redoes steps 6-9.
ROWS, BATCH, EPOCHS, SAVE_STEPS, KILL_AT = 12, 4, 3, 5, 7

RUNS = {
    # strategy: (strategy_kwargs, use_peft); full fine-tuning and LoRA, each reference mode once
    "grad_diff": ({}, False),
    "npo": ({}, True),  # reference="auto" under PEFT with sequence log-probs only: the cached reference
    "pdu": ({"epsilon": 6.0, "eta": 0.5, "initial_lambda": 1.0}, False),  # the dual variable moves every step
    "scrub": ({"max_epochs": 2}, True),  # adapter-off teacher; max-steps stop at epoch 2, after the checkpoint
    "salun": ({"mask_fraction": 0.5}, False),  # a classifier; its saliency mask is built once, before training
}


class Classifier(nn.Module):
    """A plain nn.Module classifier with dropout, for SalUn (a classifier method)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 4))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)


def classifier_rows(n: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 8, generator=generator), torch.randint(0, 4, (n,), generator=generator)
    return [{"pixel_values": x[i], "labels": int(y[i])} for i in range(n)]


class _KillAt(TrainerCallback):
    """SIGKILL this process at the end of optimizer step `step`: no handler, no flush, no clean-up runs."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _in_child(fn, *args, **kwargs) -> int:
    """Run `fn(*args, **kwargs)` in a forked child; return its wait status (0: it returned)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 0
        try:
            fn(*args, **kwargs)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def starting_model(strategy: str, tokenizer, seed: int = 0) -> nn.Module:
    """The run's starting model: a tiny Llama with attention dropout (so the RNG stream matters), or for SalUn the
    small classifier."""
    if strategy == "salun":
        return Classifier(seed)
    model = small_llama(tokenizer, seed=seed)
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.1
    return model


def make_trainer(strategy, output_dir, tokenizer, tofu_slice, model=None, callbacks=None, rows=ROWS, **overrides):
    kwargs, use_peft = RUNS[strategy]
    args = UnlearningConfig(
        output_dir=str(output_dir),
        strategy=strategy,
        strategy_kwargs=overrides.pop("strategy_kwargs", kwargs),
        use_peft=use_peft,
        learning_rate=5e-3,  # linear decay: the scheduler's position matters too
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        save_strategy="steps",
        save_steps=overrides.pop("save_steps", SAVE_STEPS),
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **overrides,
    )
    if strategy == "salun":
        forget, retain = classifier_rows(rows, seed=1), classifier_rows(ROWS, seed=2)
    else:
        forget, retain = qa(tofu_slice[0].select(range(rows))), qa(tofu_slice[1].select(range(0, 2 * ROWS, 2)))
    return UnlearningTrainer(
        model if model is not None else starting_model(strategy, tokenizer),
        args,
        forget_dataset=forget,
        retain_dataset=retain,
        processing_class=None if strategy == "salun" else tokenizer,
        callbacks=callbacks,
    )


def _train_and_dump(
    strategy, output_dir, weights_file, tokenizer, tofu_slice, kill_at=None, resume=False, kill_saving=None, **config
):
    """Train (in a child), then write the final weights to `weights_file`. `kill_at`: SIGKILL at the end of that
    step; `kill_saving`: SIGKILL while the checkpoint of that step is being written (weights and optimizer written,
    RNG, unlearning and trainer states not yet)."""
    callbacks = [_KillAt(kill_at)] if kill_at is not None else None
    if kill_saving is not None:
        save_rng_state = UnlearningTrainer._save_rng_state

        def dying(self, output_dir):
            if self.state.global_step == kill_saving:
                os.kill(os.getpid(), signal.SIGKILL)
            save_rng_state(self, output_dir)

        UnlearningTrainer._save_rng_state = dying  # in this child only
    # SalUn resumes from another starting model (seed 1): its mask and the weights its mask keeps must come from
    # the checkpoint, not from the model the resumed trainer is given
    model = starting_model(strategy, tokenizer, seed=1) if resume and strategy == "salun" else None
    trainer = make_trainer(strategy, output_dir, tokenizer, tofu_slice, model=model, callbacks=callbacks, **config)
    trainer.train(resume_from_checkpoint=True if resume else None)
    state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, weights_file)


def max_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tokenizer, tofu_slice, tmp_path_factory):
    """strategy -> the final weights of its uninterrupted run (trained once, in a child)."""
    weights = {}

    def get(strategy: str) -> dict[str, torch.Tensor]:
        if strategy not in weights:
            folder = tmp_path_factory.mktemp(f"uninterrupted_{strategy}")
            status = _in_child(
                _train_and_dump, strategy, folder / "out", folder / "w.safetensors", tokenizer, tofu_slice
            )
            assert status == 0, "the uninterrupted run failed (its traceback is above)"
            weights[strategy] = load_file(folder / "w.safetensors")
        return weights[strategy]

    return get


@pytest.mark.parametrize("strategy", sorted(RUNS))
def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_weights(
    strategy, tokenizer, tofu_slice, tmp_path, uninterrupted
):
    """A real SIGKILL two steps after checkpoint-5 (epoch 1.67), then a new process resumes from it: the final
    weights equal the uninterrupted run's to 1e-6 (measured: exactly equal, distance 0.0, for all five)."""
    killed = tmp_path / "killed"
    status = _in_child(
        _train_and_dump, strategy, killed, tmp_path / "never.safetensors", tokenizer, tofu_slice, KILL_AT
    )
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == [f"checkpoint-{SAVE_STEPS}"]
    assert (killed / f"checkpoint-{SAVE_STEPS}" / RESUME_STATE_NAME).is_file()
    assert not (tmp_path / "never.safetensors").exists()

    resumed_file = tmp_path / "resumed.safetensors"
    status = _in_child(_train_and_dump, strategy, killed, resumed_file, tokenizer, tofu_slice, None, True)
    assert status == 0, "the resumed run failed (its traceback is above)"
    distance = max_distance(uninterrupted(strategy), load_file(resumed_file))
    assert distance <= 1e-6, f"{strategy}: resumed weights are {distance:.3g} away from the uninterrupted run's"


def test_kill_9_while_a_checkpoint_is_written_resumes_from_the_one_before(
    tokenizer, tofu_slice, tmp_path, uninterrupted
):
    """Killed while writing checkpoint-4 (weights and optimizer on disk, no trainer_state.json): resuming with True
    skips the incomplete folder, continues from checkpoint-2 and ends at the uninterrupted weights. Naming the
    incomplete folder itself is refused."""
    run = tmp_path / "run"
    args = (tokenizer, tofu_slice, None, False, 4)
    assert os.WTERMSIG(_in_child(_train_and_dump, "grad_diff", run, tmp_path / "x", *args, save_steps=2)) == 9
    assert (run / "checkpoint-4" / "optimizer.pt").is_file() and not (
        run / "checkpoint-4" / "trainer_state.json"
    ).exists()

    with pytest.raises(ValueError, match=r"checkpoint-4: it is incomplete \(no trainer_state.json"):
        make_trainer("grad_diff", run, tokenizer, tofu_slice).train(resume_from_checkpoint=str(run / "checkpoint-4"))
    resumed_file = tmp_path / "resumed.safetensors"
    status = _in_child(
        _train_and_dump, "grad_diff", run, resumed_file, tokenizer, tofu_slice, None, True, save_steps=2
    )
    assert status == 0, "the resumed run failed (its traceback is above)"
    distance = max_distance(uninterrupted("grad_diff"), load_file(resumed_file))
    assert distance <= 1e-6, f"resumed weights are {distance:.3g} away from the uninterrupted run's"


# ---------------------------------------------------------------- another run's checkpoint is refused


@pytest.fixture(scope="module")
def npo_run(tokenizer, tofu_slice, tmp_path_factory):
    """An NPO run (cached reference) that stopped after checkpoint-5."""
    folder = tmp_path_factory.mktemp("npo_run")
    make_trainer("npo", folder, tokenizer, tofu_slice, max_steps=SAVE_STEPS).train()
    assert (folder / f"checkpoint-{SAVE_STEPS}" / RESUME_STATE_NAME).is_file()
    return folder


def _refused(trainer, match: str) -> None:
    """`train(resume_from_checkpoint=True)` raises ValueError matching `match` before any step."""
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"pairing_seed": 1}, r"another run \(pairing_seed: 0 then, 1 now\)"),
        ({"strategy_kwargs": {"beta": 0.5}}, r"hyperparameters: \{'beta': 0.1\} then, \{'beta': 0.5\} now"),
        ({"forget_weight": 2.0}, r"forget_weight: 1.0 then, 2.0 now"),
        ({"rows": ROWS - 1}, r"forget_examples: 12 then, 11 now"),
    ],
)
def test_resuming_with_other_settings_or_data_is_refused(npo_run, tokenizer, tofu_slice, override, match):
    _refused(make_trainer("npo", npo_run, tokenizer, tofu_slice, **override), match)


def test_resuming_from_another_starting_model_is_refused(npo_run, tokenizer, tofu_slice):
    """The cached log-probs come from the starting model; a trainer given another one (here another seed; the
    checkpoint itself is the common mistake) does not reproduce them."""
    other = starting_model("npo", tokenizer, seed=1)
    trainer = make_trainer("npo", npo_run, tokenizer, tofu_slice, model=other)
    _refused(trainer, r"checkpoint-5: the reference log-probs .* this is not the model that run started from")


def test_a_checkpoint_without_the_unlearning_state_is_refused_for_a_run_that_needs_it(
    npo_run, tokenizer, tofu_slice, tmp_path
):
    shutil.copytree(npo_run / f"checkpoint-{SAVE_STEPS}", tmp_path / f"checkpoint-{SAVE_STEPS}")
    (tmp_path / f"checkpoint-{SAVE_STEPS}" / RESUME_STATE_NAME).unlink()
    trainer = make_trainer("npo", tmp_path, tokenizer, tofu_slice)
    _refused(trainer, r"holds no unlearning_state.safetensors, so the cached reference log-probs of the 'npo' run")


def test_resume_true_without_a_checkpoint_names_the_folder(tokenizer, tofu_slice, tmp_path):
    trainer = make_trainer("grad_diff", tmp_path, tokenizer, tofu_slice)
    _refused(trainer, rf"{tmp_path} holds no complete checkpoint-\* folder to resume")


# ---------------------------------------------------------------- the pieces, one at a time


def test_pairing_of_a_mid_epoch_resume_is_that_of_the_epoch_it_is_in():
    """At epoch 1.5 (resumed mid-epoch 1), the retain partners are epoch 1's, not round(1.5) = 2's."""
    from erasus_hf.data.pairing import PairingEpochCallback as _PairingEpochCallback

    pairs = ForgetRetainDataset([{"f": i} for i in range(6)], [{"r": i} for i in range(6)], seed=3)
    pairs.set_epoch(1)
    epoch_1 = [pairs[i]["retain"] for i in range(6)]
    pairs.set_epoch(2)
    assert [pairs[i]["retain"] for i in range(6)] != epoch_1  # the two epochs pair differently
    for epoch in (1.0, 1.5, 1.6667, 1.999):
        _PairingEpochCallback(pairs).on_epoch_begin(None, TrainerState(epoch=epoch), TrainerControl())
        assert [pairs[i]["retain"] for i in range(6)] == epoch_1, epoch


def test_pdu_state_round_trips_and_the_resumed_strategy_makes_the_same_dual_update():
    """lambda, the buffered step and its retain violations: a fresh PDU given the state makes the update the
    interrupted one was about to make (without it, the first resumed step skips that update)."""
    pdu = get_strategy("pdu", epsilon=0.5, eta=2.0, initial_lambda=1.0)
    pdu._advance(0)
    pdu._buffer = [torch.tensor(0.75), torch.tensor(0.25, dtype=torch.bfloat16)]
    pdu._advance(1)  # lambda = 1 + 2 * 0.5 = 2
    pdu._buffer = [torch.tensor(0.3), torch.tensor(-0.1)]
    state = pdu.state_dict()
    assert state["dual"] == 2.0 and state["step"] == 1 and state["buffer"].tolist() == pytest.approx([0.3, -0.1])
    resumed = get_strategy("pdu", epsilon=0.5, eta=2.0, initial_lambda=1.0)
    resumed.load_state_dict(state)
    pdu._advance(2)
    resumed._advance(2)
    assert resumed.dual == pdu.dual == pytest.approx(2.0 + 2.0 * 0.1)
    with pytest.raises(ValueError, match=r"Not a PDU state: keys \['lambda'\]"):
        resumed.load_state_dict({"lambda": 1.0})


def test_ensemble_state_is_its_members_state():
    ensemble = get_strategy("ensemble", members=[("pdu", 1.0, {"epsilon": 0.5}), ("npo", 0.5)])
    assert ensemble.stateful
    ensemble.members[0][0].dual = 7.0
    state = ensemble.state_dict()
    assert sorted(state) == ["pdu.buffer", "pdu.dual", "pdu.step"]
    fresh = get_strategy("ensemble", members=[("pdu", 1.0, {"epsilon": 0.5}), ("npo", 0.5)])
    fresh.load_state_dict(state)
    assert fresh.members[0][0].dual == 7.0
    with pytest.raises(ValueError, match=r"members it does not have: \['rmu.x'\]"):
        fresh.load_state_dict({"rmu.x": 1})


@pytest.mark.parametrize("name", ["grad_diff", "npo", "scrub", "rmu", "l1_sparse", "bad_teacher"])
def test_strategies_whose_state_follows_from_step_epoch_and_hyperparameters_keep_none(name):
    """SCRUB's phase is a function of the step and epoch, RMU's direction of its seed, l1_sparse's gamma of the step,
    the bad teacher of its seed: the Trainer's own checkpoint restores them. A state given to them is an error."""
    strategy = get_strategy(name)
    assert not strategy.stateful and strategy.state_dict() == {}
    with pytest.raises(ValueError, match="keeps no state"):
        strategy.load_state_dict({"dual": 1.0})
    if name == "rmu":
        used = get_strategy("rmu")
        used.steering_vector(32)
        assert torch.equal(strategy.steering_vector(32), used.steering_vector(32))


def test_a_saliency_mask_of_another_shape_is_refused():
    from types import SimpleNamespace

    from erasus_hf.strategies.saliency import MaskedUpdates

    model = nn.Linear(2, 3, bias=False)
    trainer = SimpleNamespace(model=model, add_callback=lambda cb: None, remove_callback=lambda cb: None)
    masked = MaskedUpdates()
    masked.load_state_dict({"mask.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"another shape than their parameters: \['weight'\]"):
        masked.install_masks(trainer, None)


def test_the_cli_resumes_from_the_checkpoint_it_is_given(monkeypatch, tmp_path, tokenizer, tiny_llama):
    """`erasus-hf unlearn --resume_from_checkpoint DIR` hands DIR to `train` (it used to start the run over)."""
    from erasus_hf.config import UnlearningConfig as Config
    from erasus_hf.scripts.parsing import make_parser, parse
    from erasus_hf.scripts.unlearn import UnlearnArguments, run_unlearn

    tiny_llama.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    recipe = Path(__file__).resolve().parents[1] / "trainers" / "recipes" / "tofu_tiny_npo_lora.yaml"
    checkpoint = str(tmp_path / "out" / "checkpoint-5")
    flags = ["--config", str(recipe), "--model_name_or_path", str(tmp_path / "model"), "--num_retain_authors", "1"]
    flags += ["--output_dir", str(tmp_path / "out"), "--use_cpu", "--resume_from_checkpoint", checkpoint]
    script, config = parse(make_parser((UnlearnArguments, Config), "erasus-hf unlearn", "test"), flags)
    given = []

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        given.append(resume_from_checkpoint)
        raise KeyboardInterrupt  # stop before any step

    monkeypatch.setattr(UnlearningTrainer, "train", train)
    with pytest.raises(KeyboardInterrupt):
        run_unlearn(script, config)
    assert given == [checkpoint]
