"""Time to evaluate TOFU (forget + retain + real_authors + world_facts), batched against one example at a time.

Both runs use the same `TOFUEvaluator` on the same model, side by side in one process; only `batch_size` differs
(32 against 1). The model is a Llama-config model built here with a tokenizer trained on TOFU text; its weights are
random (timing does not depend on what it knows), so every generation runs the full `--max_new_tokens`.

    python benchmarks/eval_speed.py --data_dir ../shared/data/tofu --forget_split forget10
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None, help="TOFU folder (default: ../shared/data/tofu).")
    parser.add_argument("--forget_split", default="forget10")
    parser.add_argument("--max_examples", type=int, default=None, help="First N rows of each set (quick runs).")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Generation length for ROUGE.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64, help="Hidden size of the Llama-config model.")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch
    import transformers

    from erasus_hf.data.tofu import TOFUDataset, load_tofu, shared_tofu_dir
    from erasus_hf.evaluation.tofu import TOFUEvaluator
    from erasus_hf.modeling import build_tiny_llama, train_tokenizer

    data_dir = args.data_dir or shared_tofu_dir()
    if data_dir is None:
        raise SystemExit("No TOFU data: pass --data_dir (a folder of TOFU *.json files).")
    data = TOFUDataset.load(args.forget_split, data_dir=data_dir)
    if args.max_examples:
        data = data.select(args.max_examples)
    full = load_tofu("full", data_dir=data_dir)
    tokenizer = train_tokenizer(list(full["question"]) + list(full["answer"]), vocab_size=4096)
    model = build_tiny_llama(
        tokenizer, hidden_size=args.hidden, num_layers=args.layers, num_heads=4, intermediate_size=4 * args.hidden
    ).to(args.device)
    rows = {split: len(d) for split, d in data.splits().items()}
    timings, results = {}, {}
    for label, batch_size in (("batched", args.batch_size), ("one_at_a_time", 1)):
        evaluator = TOFUEvaluator(data, batch_size=batch_size, max_new_tokens=args.max_new_tokens)
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        results[label] = evaluator.evaluate(model, tokenizer).summary
        if args.device == "cuda":
            torch.cuda.synchronize()
        timings[label] = time.perf_counter() - start
    agree = max(abs(results["batched"][k] - results["one_at_a_time"][k]) for k in results["batched"])
    report = {
        "rows": rows,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "speedup": round(timings["one_at_a_time"] / timings["batched"], 2),
        "max_metric_difference": agree,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": f"Llama {args.hidden}x{args.layers}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params",
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
