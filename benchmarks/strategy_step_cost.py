"""Step time and peak memory of unlearning strategies against a plain SFT `Trainer` step, same model and batch.

Each configuration runs in its own process (peak RSS is per process), on a Llama-config model built here and the
TOFU slice shipped with the package. CPU by default; `--device cuda` measures GPU peak memory instead.

    python benchmarks/strategy_step_cost.py --steps 20 --configs sft npo rmu
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(name: str, steps: int, device: str, hidden: int, layers: int, batch: int) -> dict:
    import torch
    from datasets import concatenate_datasets
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from erasus_hf import UnlearningConfig, UnlearningTrainer
    from erasus_hf.data.collator import QACollator
    from erasus_hf.data.tofu import demo_splits
    from erasus_hf.modeling import build_tiny_llama, train_tokenizer

    forget, retain = demo_splits(6)
    forget, retain = forget.select_columns(["question", "answer"]), retain.select_columns(["question", "answer"])
    rows = concatenate_datasets([forget, retain])
    tokenizer = train_tokenizer(list(rows["question"]) + list(rows["answer"]), vocab_size=2048)
    model = build_tiny_llama(
        tokenizer, hidden_size=hidden, num_layers=layers, num_heads=4, intermediate_size=4 * hidden, seed=0
    )
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    common = dict(
        output_dir="/tmp/step_cost",
        max_steps=steps,
        per_device_train_batch_size=batch,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=10**6,
        use_cpu=device == "cpu",
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if name == "sft":
        collator = QACollator(tokenizer)
        data = forget.map(collator.tokenize, remove_columns=forget.column_names)
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common, remove_unused_columns=False),
            train_dataset=data,
            data_collator=collator,
            callbacks=[Clock()],
        )
    else:
        kwargs = {"layer_id": layers - 1} if name == "rmu" else {}
        args = UnlearningConfig(**common, strategy=name, strategy_kwargs=kwargs)
        trainer = UnlearningTrainer(
            model, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer, callbacks=[Clock()]
        )
    trainer.train()
    steady = sorted(times[2:])  # skip warm-up steps; median is robust to noise
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    )
    return {
        "config": name,
        "step_ms": 1000 * steady[len(steady) // 2],
        "peak_mib": peak,
        "reference": getattr(trainer, "reference_mode", "-"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["sft", "npo", "rmu"], help="sft and strategy names")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per configuration")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the Llama-config model")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--batch", type=int, default=8, help="forget (and retain) examples per step")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.device, args.hidden, args.layers, args.batch)))
        return
    results = []
    for name in args.configs:
        command = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    base = results[0]
    print(f"{'config':<10}{'reference':<11}{'step ms':>9}{'x ' + base['config']:>9}{'peak MiB':>10}{'x':>7}")
    for r in results:
        print(
            f"{r['config']:<10}{r['reference']:<11}{r['step_ms']:>9.1f}{r['step_ms'] / base['step_ms']:>9.2f}"
            f"{r['peak_mib']:>10.1f}{r['peak_mib'] / max(base['peak_mib'], 1e-9):>7.2f}"
        )


if __name__ == "__main__":
    main()
