"""`UnlearningTrainer` under DeepSpeed ZeRO-3 on 2 CPU processes (torchrun, DeepSpeed's CPU accelerator, gloo),
against the same runs in one process without DeepSpeed.

Two runs share one launch, the policy loaded by `from_pretrained` under the ZeRO-3 config (so `zero.Init` partitions
it, as `accelerate launch` with `zero3_init_flag` does): LoRA with the adapter-off reference under gradient
checkpointing (transformers' default, non-reentrant), saved by the Trainer as the adapter and as a merged model
(ZeRO-3's gathered weights); and a full fine-tune whose frozen copy reference is
sharded with TRL's `prepare_deepspeed` (retain_loss="kl"), saved as the full model.

accelerate 1.16 cannot start DeepSpeed on a CPU by itself: with `use_cpu=True`, `AcceleratorState` skips DeepSpeed
(`ACCELERATE_USE_DEEPSPEED ... and not cpu`); without it, `PartialState._prepare_backend` finds no accelerator,
leaves the backend None and counts 1 process while `deepspeed.comm` has initialised 2 (DeepSpeed then fails with
"train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 2 != 2 * 1 * 2"). The worker
builds the `PartialState` itself with `backend="gloo"` and `ACCELERATE_USE_DEEPSPEED=true`, and hands it to the
Trainer (`accelerator_config={"use_configured_state": True}`); the rest is the Trainer's own DeepSpeed path.

This file is also the worker: `python -m torch.distributed.run --nproc_per_node 2 tests/test_distributed_deepspeed.py
MODEL_DIR OUT_DIR` (or plain `python` for the single-process run without DeepSpeed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,  # partition every weight of the tiny policy, norms included
        "stage3_gather_16bit_weights_on_model_save": True,  # the Trainer's save gathers the whole weights
    },
}
RUNS = {
    "lora_adapter": dict(
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        retain_loss="kl",
        reference="adapter",
        gradient_checkpointing=True,
    ),
    "full_copy": dict(retain_loss="kl", reference="copy"),
}
GLOBAL_BATCH = 4
# float32, 2 half batches reduced in another order than one full batch (as under FSDP2: tests/test_distributed_fsdp.py)
TOLERANCE, REL_TOLERANCE = 1e-5, 1e-6


# ---- the worker


def deepspeed_on_cpu() -> None:
    """The gloo `PartialState` that accelerate does not build on a machine with no accelerator (module docstring)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState(backend="gloo")
    assert state.distributed_type == DistributedType.DEEPSPEED and state.num_processes == 2, state


def partitioned_fraction(model: torch.nn.Module) -> float:
    """The share of `model`'s weight elements this process holds (1.0: whole, or not partitioned by ZeRO-3)."""
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    whole = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    return local / whole


def whole_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of `model`, gathered whole under ZeRO-3 (a collective)."""
    params = dict(model.named_parameters())
    if not any(hasattr(p, "ds_id") for p in params.values()):
        return {k: v.detach().clone() for k, v in params.items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {k: v.detach().clone() for k, v in params.items()}


def worker(model_dir: str, out_dir: str) -> None:
    """Run every entry of RUNS; write this process's numbers to OUT_DIR/rank{r}.json (rank 0 also the weights)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from erasus_hf import UnlearningConfig, UnlearningTrainer
    from erasus_hf.data.tofu import demo_splits
    from erasus_hf.objectives import CausalLMObjective

    torch.set_num_threads(1)
    objective = CausalLMObjective()  # how the trainer scores a causal LM
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        deepspeed_on_cpu()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # before any ZeRO-3 config
    forget, retain = demo_splits(num_retain_authors=2)
    forget = forget.select(range(8)).select_columns(["question", "answer"])
    retain = retain.select(range(8)).select_columns(["question", "answer"])
    sharding = dict(deepspeed=ZERO3, accelerator_config={"use_configured_state": True})
    report: dict[str, dict] = {}
    for name, fields in RUNS.items():
        if world > 1:  # accelerate takes one DeepSpeed plugin per process: each run gets a fresh accelerator state
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()  # the gloo PartialState stays
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
            use_cpu=world == 1,
            seed=0,
            **fields,
            **(sharding if world > 1 else {}),
        )
        # after the config: under ZeRO-3, from_pretrained partitions the weights as they load (zero.Init)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        loaded_fraction = partitioned_fraction(model)
        trainer = UnlearningTrainer(
            model, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer
        )
        reference = trainer.reference
        trainer.train()
        evaluation = {k: v for k, v in trainer.evaluate().items() if not k.endswith(("runtime", "per_second"))}
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(GLOBAL_BATCH)])["forget"]
        policy = trainer.accelerator.unwrap_model(trainer.model)
        with torch.no_grad():
            policy.eval()
            policy_logprob = objective.score(policy, batch).sequence_logprob
            base_logprob = objective.score(base, batch).sequence_logprob
        entry = {
            "distributed_type": str(trainer.accelerator.distributed_type),
            "loaded_fraction": loaded_fraction,
            "policy_fraction": partitioned_fraction(policy),
            "checkpointing": [
                m.gradient_checkpointing for m in policy.modules() if hasattr(m, "gradient_checkpointing")
            ],
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "evaluation": evaluation,
            "policy_logprob": policy_logprob.tolist(),
            "base_logprob": base_logprob.tolist(),
            "reference_logprob": reference.sequence_logprob(objective, batch).tolist(),
        }
        if name == "full_copy":
            entry["reference_class"] = type(reference.model).__name__
            entry["reference_fraction"] = partitioned_fraction(reference.model)
        weights = whole_parameters(policy)
        trainer.save_model()  # ZeRO-3: the gathered 16-bit (here float32) state dict, written by rank 0
        if name == "lora_adapter":
            trainer.args.merge_adapter = True
            trainer.save_model(f"{out_dir}/{name}/merged")
        if rank == 0:
            save_file({k: v.contiguous() for k, v in weights.items()}, f"{out_dir}/{name}.safetensors")
        report[name] = entry
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    if world > 1:  # a clean teardown: a process group left to the interpreter's exit can abort it
        torch.distributed.destroy_process_group()


# ---- the test


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install -e .[dev] installs it)",
)
def test_zero3_on_two_cpu_processes_matches_one_process(tmp_path, saved_model):
    from safetensors.torch import load_file

    from .testing_utils import assert_rank_matches_one_process, assert_same_weights, launch_one_and_two

    one, two = launch_one_and_two(Path(__file__).resolve(), saved_model, tmp_path)
    for name in RUNS:
        single, ranks = one[0][name], [two[r][name] for r in (0, 1)]
        assert single["distributed_type"] == "DistributedType.NO" and single["loaded_fraction"] == 1.0
        for entry in ranks:
            assert entry["distributed_type"] == "DistributedType.DEEPSPEED"
            # really ZeRO-3: the weights were partitioned as they loaded, and stay so in the trained policy
            assert entry["loaded_fraction"] == pytest.approx(0.5, abs=0.01)
            assert entry["policy_fraction"] == pytest.approx(0.5, abs=0.01)
            assert len(entry["losses"]) == 3 and entry["losses"] == ranks[0]["losses"]
            # the single-process run's losses, evaluation and scores; the policy trained
            assert_rank_matches_one_process(entry, single, name, TOLERANCE, REL_TOLERANCE)
            # the reference is the starting model
            assert entry["reference_logprob"] == pytest.approx(entry["base_logprob"], abs=1e-5), name
        assert_same_weights(
            load_file(tmp_path / "one" / f"{name}.safetensors"),
            load_file(tmp_path / "two" / f"{name}.safetensors"),
            name,
            TOLERANCE,
        )
    # the LoRA run trained under gradient checkpointing (its adapter moved as in one process without ZeRO-3)
    for entry in (one[0]["lora_adapter"], two[0]["lora_adapter"], two[1]["lora_adapter"]):
        assert entry["checkpointing"] and all(entry["checkpointing"])
    # the frozen copy of the partitioned policy is partitioned again by TRL's prepare_deepspeed (an engine, no
    # whole copy per process); small tensors stay whole below its persistence threshold (10 x hidden size)
    for entry in (two[0]["full_copy"], two[1]["full_copy"]):
        assert entry["reference_class"] == "DeepSpeedEngine" and entry["reference_fraction"] < 0.6
    # the Trainer's saves under ZeRO-3 hold the single-process weights: the adapter, the merged model, the full model
    for folder, weights_file in (
        ("lora_adapter", "adapter_model.safetensors"),
        ("lora_adapter/merged", "model.safetensors"),
        ("full_copy", "model.safetensors"),
    ):
        a, b = (load_file(tmp_path / side / folder / weights_file) for side in ("one", "two"))
        assert_same_weights(a, b, folder, TOLERANCE)
    merged, starting = (
        load_file(tmp_path / "two" / "lora_adapter/merged/model.safetensors"),
        load_file(saved_model / "model.safetensors"),
    )
    assert max((merged[k] - starting[k]).abs().max().item() for k in starting) > 1e-4  # the adapter is merged in


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
