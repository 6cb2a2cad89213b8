"""Step time and peak memory of unlearning designs, side by side in one run (issue: benchmarks/perf).

For NPO, GradDiff-KL and RMU on the same Llama-config model and batch:
  (a) sft    a plain SFT `Trainer` step on the same examples (the forget and the retain batch together; the floor);
  (b) naive  the design most frameworks use: a deep-copied full reference run every step, float32 log-softmax over
             the whole vocabulary;
  (c) full   `UnlearningTrainer`, full fine-tune, reference cached where the strategy allows (NPO), else a copy;
  (d) lora   `UnlearningTrainer` with LoRA and the adapter-off model as reference.
Each configuration runs in its own process (peak memory is per process: resident set on CPU,
`torch.cuda.max_memory_allocated` on GPU); step time is the median of the steps after two warm-up steps, and with
`--rounds R` every configuration runs R times in turn (sft, npo:naive, ..., then again), each number the median over
the rounds, so that a machine shared with other work slows every configuration alike.

The timed steps are also timed in sections (policy forwards, reference forwards, the strategy's loss arithmetic,
metric bookkeeping, backward, clipping, optimizer, the rest of the Trainer's loop): the profile table says where each
step's time goes. On CUDA every section boundary synchronises, so there the sections are timed in `--profile_steps`
further steps instead.

    python benchmarks/perf.py                     # CPU preset: Llama 256x4, vocabulary 8192, TOFU-length rows
    python benchmarks/perf.py --preset gpu        # TinyLlama-1.1B shape, bf16, batch 8 x 512 tokens, on CUDA
    python benchmarks/perf.py --rounds 3 --json benchmarks/results/perf_cpu.json   # also writes perf_cpu.md
    python benchmarks/perf.py --preset cpu_weights --strategies npo --steps 4   # LoRA's memory where weights dominate

Any flag given after --preset overrides the preset's value.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

STRATEGIES = {"npo": ("npo", "nll"), "grad_diff_kl": ("grad_diff", "kl"), "rmu": ("rmu", "nll")}
PRESETS = {
    "cpu": {"device": "cpu", "hidden": 256, "layers": 4, "heads": 4, "intermediate": 1024, "vocab": 8192,
            "batch": 8, "seq_len": None, "dtype": "float32"},
    # weights dominate memory (the setting of the LoRA memory target): Llama 768x6 (69M parameters, 277 MB in
    # float32) on batches of 2 x 128 tokens, whose activations are a few MB; slow on CPU, so a few steps
    "cpu_weights": {"device": "cpu", "hidden": 768, "layers": 6, "heads": 12, "intermediate": 3072, "vocab": 8192,
                    "batch": 2, "seq_len": 128, "dtype": "float32"},
    # The shape of TinyLlama-1.1B (22 layers, hidden 2048, MLP 5632, 32 heads, vocabulary 32000), the H100
    # reference point: bf16, batch 8 x 512.
    "gpu": {"device": "cuda", "hidden": 2048, "layers": 22, "heads": 32, "intermediate": 5632, "vocab": 32000,
            "batch": 8, "seq_len": 512, "dtype": "bfloat16"},
}  # fmt: skip
DESIGNS = ("naive", "full", "lora")
# the profile's sections, in the order the table prints them; "other" is the step less all of them
SECTIONS = (
    "policy forward",
    "reference forward",
    "loss arithmetic",
    "metrics",
    "backward",
    "clip + grad norm",
    "optimizer",
    "other",
)


class Sections:
    """Per-step wall time of named sections of a training step, recorded while `active`. On CUDA every boundary
    synchronises (a section's kernels finish inside it), so the profiled steps are not the timed ones."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.active = False
        self.steps: list[dict[str, float]] = []
        self.calls: dict[str, int] = {}

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        if self.active:
            step = self.steps[-1]
            step[name] = step.get(name, 0.0) + seconds
            self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, owner: object, attribute: str, name: str) -> None:
        """Time every call of `owner.attribute` (set on the instance) as section `name`."""
        inner = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = self.now()
            try:
                return inner(*args, **kwargs)
            finally:
                self.add(name, self.now() - start)

        setattr(owner, attribute, timed)

    def hook_forwards(self, module) -> None:
        """Time `module`'s forward passes: with gradients the policy's, without them a reference's (the copy, or
        the policy with its adapter off)."""
        starts: list[float] = []

        def pre(*_):
            starts.append(self.now())

        def post(*_):
            import torch

            name = "policy forward" if torch.is_grad_enabled() else "reference forward"
            self.add(name, self.now() - starts.pop())

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def summary(self) -> dict[str, dict[str, float]]:
        """Median ms per step of each section, and how many calls a step makes."""
        table = {}
        for name in SECTIONS:
            values = sorted(1000 * step.get(name, 0.0) for step in self.steps)
            if values and any(values):
                table[name] = {"ms": values[len(values) // 2], "calls": self.calls.get(name, 0) / len(self.steps)}
        table["step"] = {"ms": sorted(1000 * s["step"] for s in self.steps)[len(self.steps) // 2], "calls": 1}
        return table


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


def stacked_scores(objective, model, forget: dict, retain: dict, left: bool = False) -> tuple:
    """The forget and the retain side scored in one forward pass: both padded to the wider one's length (on the
    padding side, `left`; the collator's `position_ids` count real tokens only, so the padding changes no real
    token's score), stacked, scored, and each side's rows and columns cut back out. The same `Scores` as scoring
    each side alone, up to the float rounding of other matrix shapes (tests/test_step_floor.py); whether one pass is
    faster than two is what `--stacked_probe` measures, per device."""
    import torch
    import torch.nn.functional as F

    from erasus_hf.objectives import Scores

    width = max(forget["input_ids"].shape[1], retain["input_ids"].shape[1])
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100, "position_ids": 0}

    def padded(side: dict) -> dict:
        extra = width - side["input_ids"].shape[1]
        return {k: F.pad(side[k], (extra, 0) if left else (0, extra), value=v) for k, v in fill.items() if k in side}

    sides = [padded(forget), padded(retain)]
    both = objective.score(model, {k: torch.cat([s[k] for s in sides]) for k in sides[0]})
    n = forget["input_ids"].shape[0]
    out = []
    for rows, side in ((slice(0, n), forget), (slice(n, None), retain)):
        length = side["input_ids"].shape[1] - 1  # a causal LM scores every position but the last
        cols = slice(width - 1 - length, None) if left else slice(0, length)
        out.append(
            Scores(
                token_logprobs=both.token_logprobs[rows, cols],
                mask=both.mask[rows, cols],
                logits=both.logits[rows, cols],
            )
        )
    return tuple(out)


def stacked_probe(args: argparse.Namespace, rounds: int = 3) -> dict:
    """Policy forward + backward of NPO's two sides (the forget sequence log-prob, the retain NLL) on the preset's
    model and batches: two passes against one stacked pass (`stacked_scores`), alternating on the same batches in
    one process. The trainer scores the sides separately; this says, per device, whether stacking would be faster."""
    import torch

    trainer = _build("npo:full", args, [])[0]
    model, objective = trainer.model, trainer.model_objective
    left = trainer.processing_class.padding_side == "left"
    batches = [trainer._prepare_inputs(b) for b in trainer.get_train_dataloader()]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def separate(batch: dict) -> None:
        forget, retain = objective.score(model, batch["forget"]), objective.score(model, batch["retain"])
        (forget.sequence_logprob.mean() + retain.mean_nll.mean()).backward()

    def stacked(batch: dict) -> None:
        forget, retain = stacked_scores(objective, model, batch["forget"], batch["retain"], left)
        (forget.sequence_logprob.mean() + retain.mean_nll.mean()).backward()

    times: dict[str, list[float]] = {"separate": [], "stacked": []}
    autocast = trainer.compute_loss_context_manager  # bf16 autocast as the training step runs it
    for r in range(rounds + 1):  # the first round warms up
        for batch in batches:
            order = (("separate", separate), ("stacked", stacked))
            for name, run in order if r % 2 else order[::-1]:
                model.zero_grad()
                sync()
                start = time.perf_counter()
                with autocast():
                    run(batch)
                sync()
                if r:
                    times[name].append(time.perf_counter() - start)
    separate_ms, stacked_ms = (1000 * sorted(v)[len(v) // 2] for v in times.values())
    widths = [(b["forget"]["input_ids"].shape[1], b["retain"]["input_ids"].shape[1]) for b in batches]
    return {"separate_ms": separate_ms, "stacked_ms": stacked_ms, "ratio": stacked_ms / separate_ms, "widths": widths}


def _long_rows(rows):
    """Each answer followed by every other answer of `rows`: longer than any seq_len; the collator truncates."""
    answers = list(rows["answer"])
    return rows.map(lambda row, i: {"answer": " ".join([row["answer"], *answers[:i], *answers[i + 1 :]])},
                    with_indices=True)  # fmt: skip


def _build(config: str, args: argparse.Namespace, callbacks: list) -> tuple:
    """The model and the trainer of `config` ("sft", or "<strategy>:<design>"); with the reference mode and the
    peak resident set before the trainer was built (the model's own weights are not counted in the peak)."""
    import torch
    from datasets import concatenate_datasets
    from transformers import Trainer, TrainingArguments

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
    common = dict(
        output_dir="/tmp/perf",
        bf16=args.dtype == "bfloat16",
        max_steps=args.steps + (args.profile_steps if args.device == "cuda" else 0),
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
            callbacks=callbacks,
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
            callbacks=callbacks,
        )
        reference = trainer.reference_mode
    return trainer, reference, rss_before


def measure(config: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import TrainerCallback

    times: list[float] = []
    sections = Sections(cuda=args.device == "cuda")

    class Clock(TrainerCallback):
        """Times the first `args.steps` steps whole, and the profiled steps in sections."""

        def on_step_begin(self, args_, state, control, **__):
            # on CPU the timers cost nothing: the timed steps are the profiled ones (after the warm-up); on CUDA the
            # profile's synchronisations would slow the timed steps, so the profiled steps come after them
            profiled = state.global_step >= args.steps if args.device == "cuda" else state.global_step >= 2
            sections.active = profiled and state.global_step < args.steps + args.profile_steps
            if sections.active:
                sections.steps.append({})
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_pre_optimizer_step(self, *_, **__):
            self.optimizer_start = sections.now()

        def on_optimizer_step(self, *_, **__):
            sections.add("optimizer", sections.now() - self.optimizer_start)

        def on_step_end(self, args_, state, control, **__):
            if args.device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - self.start
            if sections.active:
                sections.steps[-1]["step"] = elapsed
            if state.global_step <= args.steps:  # (on_step_end comes after the step's global_step += 1)
                times.append(elapsed)

    trainer, reference, rss_before = _build(config, args, [Clock()])
    if config != "sft":
        if config.endswith(":naive") or trainer.reference_mode == "copy":
            sections.hook_forwards(trainer.reference.model)
        sections.wrap(trainer, "_store_metrics", "metrics")
    sections.hook_forwards(trainer.model)
    sections.wrap(trainer, "compute_loss", "loss arithmetic")  # less the forwards and metrics inside it, below
    sections.wrap(trainer.accelerator, "backward", "backward")
    sections.wrap(trainer, "_clip_grad_norm", "clip + grad norm")
    trainer.train()
    for step in sections.steps:  # compute_loss holds the forwards and the metrics: its own part is the rest
        inside = sum(step.get(k, 0.0) for k in ("policy forward", "reference forward", "metrics"))
        step["loss arithmetic"] = step.get("loss arithmetic", 0.0) - inside
        step["other"] = step["step"] - sum(v for k, v in step.items() if k not in ("step", "other"))
    steady = sorted(times[2:])
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if args.device == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    )
    profile = sections.summary() if sections.steps else {}
    return {
        "config": config,
        "reference": reference,
        "step_ms": 1000 * steady[len(steady) // 2],
        "peak_mib": peak,
        "profile": profile,
    }


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def _combine(rounds: list[dict]) -> dict:
    """One configuration's rounds as one result: the median round's step time and peak, the profile of that round."""
    ordered = sorted(rounds, key=lambda r: r["step_ms"])
    middle = ordered[len(ordered) // 2]
    return {
        **middle,
        "step_ms_rounds": [r["step_ms"] for r in rounds],
        "peak_mib": _median([r["peak_mib"] for r in rounds]),
    }


def tables(results: dict[str, dict]) -> tuple[list[str], list[str]]:
    """The ratio table (step time and peak memory against (a) and against the strategy's (b)) and the profile table
    (median ms per step of each section, its share of the step), as Markdown rows."""
    sft = results["sft"]
    ratio = [
        "| config | reference | step ms | x (a) | x (b) | peak MiB | x (a) | x (b) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for config, r in results.items():
        naive = results.get(f"{config.split(':')[0]}:naive", r)
        ratio.append(
            f"| {config} | {r['reference']} | {r['step_ms']:.1f} | {r['step_ms'] / sft['step_ms']:.2f} | "
            f"{r['step_ms'] / naive['step_ms']:.2f} | {r['peak_mib']:.1f} | "
            f"{r['peak_mib'] / max(sft['peak_mib'], 1e-9):.2f} | {r['peak_mib'] / max(naive['peak_mib'], 1e-9):.2f} |"
        )
    names = [n for n in SECTIONS if any(n in r.get("profile", {}) for r in results.values())]
    profile = [
        "| config | " + " | ".join(names) + " | step |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for config, r in results.items():
        p = r.get("profile", {})
        if not p:
            continue
        cells = []
        for name in names:
            if name not in p:
                cells.append("-")
                continue
            calls = p[name]["calls"]
            count = f" x{calls:g}" if name.endswith("forward") and calls != 1 else ""
            cells.append(f"{p[name]['ms']:.1f}{count} ({100 * p[name]['ms'] / p['step']['ms']:.0f}%)")
        profile.append(f"| {config} | " + " | ".join(cells) + f" | {p['step']['ms']:.1f} |")
    return ratio, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--preset", default="cpu", choices=list(PRESETS), help="sizes and device (default: cpu)")
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per configuration")
    parser.add_argument("--profile_steps", type=int, default=6, help="on CUDA: profiled steps after the timed ones")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every configuration, in turn")
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, help="hidden size of the Llama-config model")
    parser.add_argument("--layers", type=int, help="decoder layers")
    parser.add_argument("--heads", type=int, help="attention heads")
    parser.add_argument("--intermediate", type=int, help="MLP width")
    parser.add_argument("--vocab", type=int, help="vocabulary size (the log-softmax width)")
    parser.add_argument("--batch", type=int, help="forget (and retain) examples per step")
    parser.add_argument("--seq_len", type=int, help="tokens per row (default: the TOFU rows' own lengths)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--no_stacked_probe", action="store_true", help="skip the stacked-forward measurement")
    parser.add_argument("--json", help="also write the results here, and the tables next to it (.md)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.one:
        print(json.dumps(stacked_probe(args) if args.one == "stacked" else measure(args.one, args)))
        return
    configs = ["sft"] + [f"{s}:{d}" for s in args.strategies for d in DESIGNS]
    rounds: dict[str, list[dict]] = {config: [] for config in configs}
    for _ in range(args.rounds):
        for config in configs:
            command = [sys.executable, __file__, "--one", config, *sys.argv[1:]]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rounds[config].append(json.loads(out.strip().splitlines()[-1]))
    results = {config: _combine(runs) for config, runs in rounds.items()}
    ratio, profile = tables(results)
    probe = None
    if not args.no_stacked_probe:
        command = [sys.executable, __file__, "--one", "stacked", *sys.argv[1:]]
        probe = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    print("\n".join(ratio))
    print("\nProfile: median ms per step of each section (share of the step)\n")
    print("\n".join(profile))
    stacked_line = (
        f"Stacked forward probe (NPO's policy forward + backward on the same batches): two passes "
        f"{probe['separate_ms']:.1f} ms, one stacked pass {probe['stacked_ms']:.1f} ms, ratio {probe['ratio']:.2f} "
        f"(forget/retain widths {probe['widths']})"
        if probe
        else ""
    )
    print("\n" + stacked_line)
    if args.json:
        import platform

        import torch
        import transformers

        machine = {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device == "cuda" else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
        command = threads + "python " + " ".join(["benchmarks/perf.py", *sys.argv[1:]])
        with open(args.json, "w") as f:
            record = {"command": command, "machine": machine, "args": vars(args), "results": results}
            json.dump({**record, "stacked_probe": probe}, f, indent=2)
        with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
            f.write(f"`{command}`\n\n{json.dumps(machine)}\n\n" + "\n".join(ratio) + "\n\n")
            f.write("Profile: median ms per step of each section (share of the step)\n\n" + "\n".join(profile) + "\n")
            f.write(f"\n{stacked_line}\n")


if __name__ == "__main__":
    main()
