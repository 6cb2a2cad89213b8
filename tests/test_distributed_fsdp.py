"""`UnlearningTrainer` under FSDP2 on 2 CPU processes (torchrun, gloo), against the same runs in one process.

Three runs share one launch: LoRA with the adapter-off reference (its scores must be the base model's, while the
policy's are not), a full fine-tune with a frozen copy reference sharded like the policy (retain_loss="kl"), and a
full fine-tune with the cached reference; each evaluates with the Trainer's evaluation loop, which splits the pairs
between the processes while the sharded model runs in both, plus a metric suite whose blocks are uneven (3 batches on
2 processes), and saves through the Trainer (FULL_STATE_DICT). The full copy run also generates greedily with rows
that stop at different steps on the two processes (transformers' `generate` keeps the finished process stepping:
torch's `fully_shard` marks the modules `_is_fsdp_managed_module`).

accelerate 1.16 does not run FSDP on CPU: `AcceleratorState.__init__` turns on FSDP only when the distributed type
is an accelerator's (MULTI_GPU, MULTI_XPU, ...; MULTI_CPU is not in that list), so with `use_cpu=True` the Trainer's
`fsdp` options are silently dropped and the policy is wrapped in DDP, and without `use_cpu` on a machine with no GPU
`PartialState` finds no device and `Trainer.__init__` raises "Using fsdp only works in distributed training.". The
worker below builds the CPU (gloo) `PartialState` first and declares it MULTI_GPU to accelerate, then hands it to
the Trainer (`accelerator_config={"use_configured_state": True}`); everything after that is accelerate's and the
Trainer's own FSDP2 path (`fsdp2_prepare_model` -> `fully_shard`), as it runs on GPUs.

This file is also the worker: `python -m torch.distributed.run --nproc_per_node 2 tests/test_distributed_fsdp.py
MODEL_DIR OUT_DIR` (or plain `python` for the single-process run).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

FSDP_CONFIG = {
    "version": 2,
    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
    "reshard_after_forward": True,
    "state_dict_type": "FULL_STATE_DICT",
}
# name -> UnlearningConfig fields; NPO with a retain term that reads the reference's logits (kl) or none (nll)
RUNS = {
    "lora_adapter": dict(
        use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, retain_loss="kl", reference="adapter"
    ),
    "full_copy": dict(retain_loss="kl", reference="copy"),
    "full_cached": dict(retain_loss="nll", reference="cached"),
}
GLOBAL_BATCH = 4
# float32: 2 half-batch gradients reduce-scattered sum in another order than 1 full batch (measured: 8e-6 on a loss
# of 13.8, 3e-5 on a sequence log-prob of -376, weights within 2e-6)
TOLERANCE, REL_TOLERANCE = 1e-5, 1e-6


# ---- the worker (one process of the launch, or the single-process run)


def fsdp_on_cpu() -> None:
    """Make accelerate treat this CPU gloo group as a device group, so that it keeps the Trainer's FSDP plugin.

    `PartialState(cpu=True)` initialises gloo (MULTI_CPU); `AcceleratorState` then enables FSDP for the device types
    it lists only, MULTI_CPU not among them. Declaring the group MULTI_GPU before the `AcceleratorState` is built
    changes that decision only: the device stays `cpu` (it was set by `PartialState`)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True, timeout=timedelta(seconds=120))  # a process left waiting fails, not hangs
    assert state.backend == "gloo" and state.device.type == "cpu", (state.backend, state.device)
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def sharded_fraction(model: torch.nn.Module) -> float:
    """The share of `model`'s parameter elements held by this process at rest (1.0: a whole copy). FSDP2 keeps the
    root module's parameters gathered after a forward pass; they are resharded first."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
    return local / sum(p.numel() for p in model.parameters())


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of `model`, gathered whole (a collective: every process calls it, in the same order)."""
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


def uneven_generations(model: torch.nn.Module, tokenizer, questions: list[str], steps: int = 6) -> list[str]:
    """Greedy generations of two prompts (one per process under 2 processes) with the EOS set to a token that the
    first prompt's continuation reaches and the second's never does: that row stops early while the other keeps
    generating, so a sharded model needs the stopped process to keep stepping (`synced_gpus`). Every process makes
    the same choice from the same full-length continuations."""
    from erasus_hf.evaluation.generation import greedy_generate

    def continuation(question: str) -> list[int]:  # every process, the same input and length: no process waits
        ids = tokenizer(question, return_tensors="pt")
        out = model.generate(**ids, do_sample=False, max_new_tokens=steps, min_new_tokens=steps)
        return out[0, ids["input_ids"].shape[1] :].tolist()

    first = continuation(questions[0])
    for question in questions[1:]:
        other = continuation(question)
        stops = [t for a, t in enumerate(first[:-1]) if t not in other and t not in first[:a]]
        if stops:
            stopper = copy.deepcopy(tokenizer)
            stopper.eos_token = tokenizer.convert_ids_to_tokens(stops[0])
            return greedy_generate(model, stopper, [questions[0], question], max_new_tokens=steps)
    raise AssertionError("no token ends one continuation and not the other")


def worker(model_dir: str, out_dir: str) -> None:
    """Run every entry of RUNS; write this process's numbers to OUT_DIR/rank{r}.json (rank 0 also the weights)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from erasus_hf import UnlearningConfig, UnlearningTrainer
    from erasus_hf.data.tofu import demo_splits
    from erasus_hf.evaluation import MetricSuite
    from erasus_hf.objectives import CausalLMObjective

    torch.set_num_threads(1)
    objective = CausalLMObjective()  # how the trainer scores a causal LM
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        fsdp_on_cpu()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    forget, retain = demo_splits(num_retain_authors=2)
    forget = forget.select(range(8)).select_columns(["question", "answer"])
    retain = retain.select(range(8)).select_columns(["question", "answer"])

    class CountEvalSteps(TrainerCallback):
        """How many evaluation batches this process ran (the evaluation is split between the processes)."""

        steps = 0

        def on_prediction_step(self, args, state, control, **kwargs):
            CountEvalSteps.steps += 1

    report: dict[str, dict] = {}
    for name, fields in RUNS.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        base = copy.deepcopy(model).eval()  # the starting weights, whole, on this process
        sharding = dict(fsdp=True, fsdp_config=FSDP_CONFIG, accelerator_config={"use_configured_state": True})
        args = UnlearningConfig(
            output_dir=f"{out_dir}/{name}",
            strategy="npo",
            max_steps=3,
            learning_rate=1e-3,
            per_device_train_batch_size=GLOBAL_BATCH // world,
            per_device_eval_batch_size=GLOBAL_BATCH // world,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            seed=0,
            **fields,
            **(sharding if world > 1 else {}),
        )
        CountEvalSteps.steps = 0
        trainer = UnlearningTrainer(
            model, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer,
            callbacks=[CountEvalSteps()],
            # scored by every process on its block of 3 batches (2 and 1): the blocks must be padded to one length
            evaluators=MetricSuite(["memorization"], options={"memorization": {"batch_size": 3}}),
        )  # fmt: skip
        reference = trainer.reference
        if name == "full_cached":  # computed in __init__, before any sharding: every process scores every row
            cached = reference.logprobs[:, 0].tolist()
        trainer.train()
        evaluation = {k: v for k, v in trainer.evaluate().items() if not k.endswith(("runtime", "per_second"))}
        # a fixed forget batch scored by the reference, the trained policy and the starting weights
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(GLOBAL_BATCH)])["forget"]
        with torch.no_grad():
            trainer.model.eval()
            policy_logprob = objective.score(trainer.model, batch).sequence_logprob
            base_logprob = objective.score(base, batch).sequence_logprob
        entry = {
            "distributed_type": str(trainer.accelerator.distributed_type),
            "policy_class": type(trainer.model).__name__,
            "policy_local_fraction": sharded_fraction(trainer.model),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "forget_losses": [h["forget_loss"] for h in trainer.state.log_history if "forget_loss" in h],
            "evaluation": evaluation,
            "eval_steps": CountEvalSteps.steps,
            "policy_logprob": policy_logprob.tolist(),
            "base_logprob": base_logprob.tolist(),
        }
        if name == "full_cached":
            entry["cached"] = cached
        else:
            entry["reference_logprob"] = reference.sequence_logprob(objective, batch).tolist()
        if name == "full_copy":
            trainer.model.eval()
            entry["generations"] = uneven_generations(trainer.model, tokenizer, list(forget["question"]))
            entry["reference_class"] = type(reference.model).__name__
            entry["reference_local_fraction"] = sharded_fraction(reference.model)
        weights = full_parameters(trainer.model)
        if name == "lora_adapter":  # the base weights must not move, and the adapter must
            starting = dict(base.named_parameters())
            frozen = {k: v for k, v in weights.items() if "lora_" not in k}
            entry["base_max_change"] = max(
                (v - starting[k.replace("base_model.model.", "").replace(".base_layer", "")]).abs().max().item()
                for k, v in frozen.items()
            )
            entry["lora_b_max"] = max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k)
        trainer.save_model()  # FULL_STATE_DICT under FSDP: gathered by every process, written by rank 0
        if rank == 0:
            save_file({k: v.contiguous() for k, v in weights.items()}, f"{out_dir}/{name}.safetensors")
        report[name] = entry
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    if world > 1:  # a clean teardown: a process group left to the interpreter's exit can abort it
        torch.distributed.destroy_process_group()


# ---- the test


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_matches_one_process(tmp_path, saved_model):
    from safetensors.torch import load_file

    from .testing_utils import assert_rank_matches_one_process, assert_same_weights, launch_one_and_two

    one, two = launch_one_and_two(Path(__file__).resolve(), saved_model, tmp_path)
    for name in RUNS:
        single, ranks = one[0][name], [two[r][name] for r in (0, 1)]
        assert single["distributed_type"] == "DistributedType.NO"
        for entry in ranks:  # really FSDP2: the policy is an FSDPModule holding half of its weights per process
            assert entry["distributed_type"] == "DistributedType.FSDP"
            assert entry["policy_class"].startswith("FSDP"), entry["policy_class"]
            assert entry["policy_local_fraction"] == pytest.approx(0.5), entry["policy_local_fraction"]
            assert entry["losses"] == ranks[0]["losses"]  # metrics are averaged across processes
            # the losses, the evaluation and the scores of the single-process run; the policy trained
            assert len(entry["losses"]) == 3
            assert_rank_matches_one_process(entry, single, name, TOLERANCE, REL_TOLERANCE)
            assert entry["forget_losses"] == pytest.approx(single["forget_losses"], abs=TOLERANCE, rel=REL_TOLERANCE)
            # sharded evaluation: each process ran half of the 8 pairs (2 batches of 2; one process: 2 batches of 4)
            assert single["eval_steps"] == 2 and entry["eval_steps"] == 2
            assert {"eval_memorization/forget_exact_memorization", "eval_forget_nll"} <= entry["evaluation"].keys()
        a, b = load_file(tmp_path / "one" / f"{name}.safetensors"), load_file(tmp_path / "two" / f"{name}.safetensors")
        assert_same_weights(a, b, name, TOLERANCE)

    # LoRA: PEFT's disable_adapter() on the FSDP2-sharded model is the base model, exactly
    for entry in (one[0]["lora_adapter"], two[0]["lora_adapter"], two[1]["lora_adapter"]):
        assert entry["reference_logprob"] == pytest.approx(entry["base_logprob"], abs=1e-5)
        assert entry["base_max_change"] == 0.0 and entry["lora_b_max"] > 1e-4
    # the frozen copy is sharded like the policy (TRL's prepare_fsdp), not a whole copy on every process
    for entry in (two[0]["full_copy"], two[1]["full_copy"]):
        assert entry["reference_class"].startswith("FSDP")
        assert entry["reference_local_fraction"] == pytest.approx(0.5)
        assert entry["reference_logprob"] == pytest.approx(entry["base_logprob"], abs=1e-5)  # the starting model
    # generation with rows that stop at different steps on different processes (synced_gpus for the sharded model)
    generations = one[0]["full_copy"]["generations"]
    assert len(generations[0]) < len(generations[1]), generations  # the first stopped early
    assert two[0]["full_copy"]["generations"] == two[1]["full_copy"]["generations"] == generations
    # the cached reference: every process holds the log-probs of the single-process run
    for entry in (two[0]["full_cached"], two[1]["full_cached"]):
        assert entry["cached"] == pytest.approx(one[0]["full_cached"]["cached"], abs=TOLERANCE)
    # the Trainer's saves under FSDP2 (gathered FULL_STATE_DICT, written by rank 0) hold the single-process weights
    for name, weights_file in (("full_copy", "model.safetensors"), ("lora_adapter", "adapter_model.safetensors")):
        a, b = (load_file(tmp_path / side / name / weights_file) for side in ("one", "two"))
        assert_same_weights(a, b, name, TOLERANCE)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
