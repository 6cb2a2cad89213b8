"""Step time and peak memory of unlearning designs, side by side in one run (issue: benchmarks/perf).

For NPO, GradDiff-KL and RMU on the same Llama-config model and batch:
  (a) sft    a plain SFT `Trainer` step on the same examples (the forget and the retain batch together; the floor);
  (b) naive  the design most frameworks use: a deep-copied full reference run every step, float32 log-softmax over
             the whole vocabulary;
  (c) full   `UnlearningTrainer`, full fine-tune, reference cached where the strategy allows (NPO), else a copy;
  (d) lora   `UnlearningTrainer` with LoRA and the adapter-off model as reference.
Each configuration runs in its own process (peak memory is per process: resident set on CPU,
`torch.cuda.max_memory_allocated` on GPU); step time is the median of the steps after two warm-up steps.

    python benchmarks/perf.py                     # CPU preset: Llama 256x4, vocabulary 8192, TOFU-length rows
    python benchmarks/perf.py --preset gpu        # TinyLlama-1.1B shape, bf16, batch 8 x 512 tokens, on CUDA

Any flag given after --preset overrides the preset's value.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

STRATEGIES = {"npo": ("npo", "nll"), "grad_diff_kl": ("grad_diff", "kl"), "rmu": ("rmu", "nll")}
PRESETS = {
    "cpu": {"device": "cpu", "hidden": 256, "layers": 4, "heads": 4, "intermediate": 1024, "vocab": 8192,
            "batch": 8, "seq_len": None, "dtype": "float32"},
    # The shape of TinyLlama-1.1B (22 layers, hidden 2048, MLP 5632, 32 heads, vocabulary 32000), the H100
    # reference point: bf16, batch 8 x 512.
    "gpu": {"device": "cuda", "hidden": 2048, "layers": 22, "heads": 32, "intermediate": 5632, "vocab": 32000,
            "batch": 8, "seq_len": 512, "dtype": "bfloat16"},
}  # fmt: skip
DESIGNS = ("naive", "full", "lora")


def _naive_trainer_class():
    """`UnlearningTrainer` whose loss is computed the usual way: reference forward every step on a deep copy and
    float32 log-softmax over the vocabulary (RMU has no log-softmax: its naive form is the copy alone)."""
    import torch
    import torch.nn.functional as F

    from erasus_hf import UnlearningTrainer

    def token_logprobs(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        logp = F.log_softmax(logits, dim=-1)  # [B, T, V] in float32
        picked = logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * mask
        return logp, picked, mask

    class NaiveTrainer(UnlearningTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.strategy.name == "rmu":
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            forget, retain = inputs["forget"], inputs["retain"]
            ref = self.reference.model
            _, lp, mask = token_logprobs(model, forget)
            if self.strategy.name == "npo":
                with torch.no_grad():
                    _, ref_lp, _ = token_logprobs(ref, forget)
                ratio = lp.sum(-1) - ref_lp.sum(-1)
                forget_loss = -2 / 0.1 * F.logsigmoid(-0.1 * ratio).mean()
                _, retain_lp, retain_mask = token_logprobs(model, retain)
                retain_loss = -(retain_lp.sum(-1) / retain_mask.sum(-1)).mean()
            else:  # grad_diff with KL(ref || model) on retain
                forget_loss = (lp.sum(-1) / mask.sum(-1)).mean()
                logp, _, retain_mask = token_logprobs(model, retain)
                with torch.no_grad():
                    ref_logp, _, _ = token_logprobs(ref, retain)
                kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
                retain_loss = ((kl * retain_mask).sum(-1) / retain_mask.sum(-1)).mean()
            return forget_loss + retain_loss

    return NaiveTrainer


def _long_rows(rows):
    """Each answer followed by every other answer of `rows`: longer than any seq_len; the collator truncates."""
    answers = list(rows["answer"])
    return rows.map(lambda row, i: {"answer": " ".join([row["answer"], *answers[:i], *answers[i + 1 :]])},
                    with_indices=True)  # fmt: skip


def measure(config: str, args: argparse.Namespace) -> dict:
    import torch
    from datasets import concatenate_datasets
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from erasus_hf import UnlearningConfig, UnlearningTrainer
    from erasus_hf.data.collator import QACollator
    from erasus_hf.data.tofu import demo_splits
    from erasus_hf.modeling import build_tiny_llama, train_tokenizer

    forget, retain = (d.select_columns(["question", "answer"]) for d in demo_splits(6))
    tokenizer = train_tokenizer(list(forget["question"]) + list(retain["answer"]), vocab_size=args.vocab)
    if args.seq_len:  # rows of seq_len tokens: each answer followed by the other answers of the set, truncated
        forget, retain = (_long_rows(d) for d in (forget, retain))
    model = build_tiny_llama(
        tokenizer,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=max(256, args.seq_len or 0),
    )
    if len(tokenizer) < args.vocab:  # the tokenizer learned fewer merges: widen the head to the preset's vocabulary
        model.resize_token_embeddings(args.vocab, mean_resizing=False)
    model = model.to(getattr(torch, args.dtype))
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    common = dict(
        output_dir="/tmp/perf",
        bf16=args.dtype == "bfloat16",
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=10**6,
        use_cpu=args.device == "cpu",
    )
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if config == "sft":  # the same examples per step as an unlearning step: `batch` forget + `batch` retain rows
        collator = QACollator(tokenizer, max_length=args.seq_len or 512)
        rows = concatenate_datasets([forget, retain])
        data = rows.map(collator.tokenize, remove_columns=rows.column_names)
        sft_args = {**common, "per_device_train_batch_size": 2 * args.batch}
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**sft_args, remove_unused_columns=False),
            train_dataset=data,
            data_collator=collator,
            callbacks=[Clock()],
        )
        reference = "-"
    else:
        key, design = config.split(":")
        strategy, retain_loss = STRATEGIES[key]
        kwargs = {"layer_id": args.layers - 1} if strategy == "rmu" else {}
        reference = {"naive": "copy", "full": "auto", "lora": "adapter"}[design]
        unlearning = UnlearningConfig(
            **common,
            divergence_factor=None,  # a timing run: no stop on a runaway loss
            strategy=strategy,
            strategy_kwargs=kwargs,
            retain_loss=retain_loss,
            use_peft=design == "lora",
            reference=reference,
            max_length=args.seq_len or 512,
        )
        cls = _naive_trainer_class() if design == "naive" else UnlearningTrainer
        trainer = cls(
            model,
            unlearning,
            forget_dataset=forget,
            retain_dataset=retain,
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
        reference = trainer.reference_mode
    trainer.train()
    steady = sorted(times[2:])
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if args.device == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    )
    return {"config": config, "reference": reference, "step_ms": 1000 * steady[len(steady) // 2], "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--preset", default="cpu", choices=list(PRESETS), help="sizes and device (default: cpu)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per configuration")
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, help="hidden size of the Llama-config model")
    parser.add_argument("--layers", type=int, help="decoder layers")
    parser.add_argument("--heads", type=int, help="attention heads")
    parser.add_argument("--intermediate", type=int, help="MLP width")
    parser.add_argument("--vocab", type=int, help="vocabulary size (the log-softmax width)")
    parser.add_argument("--batch", type=int, help="forget (and retain) examples per step")
    parser.add_argument("--seq_len", type=int, help="tokens per row (default: the TOFU rows' own lengths)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    configs = ["sft"] + [f"{s}:{d}" for s in args.strategies for d in DESIGNS]
    results = {}
    for config in configs:
        command = [sys.executable, __file__, "--one", config, *sys.argv[1:]]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[config] = json.loads(out.strip().splitlines()[-1])
    sft = results["sft"]
    header = ("config", "reference", "step ms", "x (a)", "x (b)", "peak MiB", "x (a)", "x (b)")
    print("".join(f"{h:>10}" if i > 1 else f"{h:<20}" if i == 0 else f"{h:<10}" for i, h in enumerate(header)))
    for config, r in results.items():
        naive = results.get(f"{config.split(':')[0]}:naive", r)
        ratios = [
            r["step_ms"] / sft["step_ms"],
            r["step_ms"] / naive["step_ms"],
            r["peak_mib"] / max(sft["peak_mib"], 1e-9),
            r["peak_mib"] / max(naive["peak_mib"], 1e-9),
        ]
        print(
            f"{config:<20}{r['reference']:<10}{r['step_ms']:>10.1f}{ratios[0]:>10.2f}{ratios[1]:>10.2f}"
            f"{r['peak_mib']:>10.1f}{ratios[2]:>10.2f}{ratios[3]:>10.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
