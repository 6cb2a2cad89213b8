"""Deletion requests over time: four requests applied one after another with the deletion ledger
(`erasus_hf.ledger`), against retraining from scratch after every request, on two corpora.

    python -m benchmarks.sequential                    # both corpora; npo, ce_u, wga; adapter and full; seeds 0 1 2
    python -m benchmarks.sequential --corpora tofu --methods npo --modes adapter --seeds 0

- `tofu` (TOFU-mini): the finetuned model learns retain authors 0-4 (100 rows) and the four request authors
  (forget05's first four, TOFU authors 190-193, 20 rows each). Request k forgets author 189 + k. After each request:
  forget quality of every author requested so far against the model retrained without them (KS p-value of the
  truth ratios) and model utility (retain authors), as `benchmarks.tofu_mini` measures them.
- `muse` (MUSE-style raw text, `../shared/data/muse/news/`): request 1 is the first 5 distinct articles of
  `raw/forget` (MUSE's `sust/forget_1`), requests 2-4 the first 5 of `sust/forget_{2,3,4}`; the retain set is 20
  articles of `privleak/retain`, the holdout 20 of `privleak/holdout`. Each article enters as its first 256 tokens,
  cut into four 64-token text rows (so every request is 20 rows, as on TOFU). After each request: the NLL per token of
  the articles requested so far and of the retain articles, and MUSE's PrivLeak, (AUC - AUC_retrained) /
  AUC_retrained, with the loss attack's AUC of the requested rows against the holdout (0: as the retrained model).

Both: the models are trained from scratch by benchmarks/tofu_mini's recipe (`models.train_model`: the small preset's
0.85M-parameter Llama, TRL's SFTTrainer) and cached under --cache_dir; the model retrained after request k learns the
retain rows and the requests not yet applied (k = 4: the retain rows alone), from the same initialisation. After
each request, also the loss attack's MIA AUC of every request's rows against the holdout (0.5: as unseen; the rows
of requests not yet applied show they are still known), the request's training seconds and the retraining's.

Each method runs the four requests in order with `apply_request` in one of two modes: `adapter` (a LoRA adapter per
request, trained on the model as the earlier requests left it, merged for the next one) or `full` (full fine-tuning
applied in sequence: one model trained on through). The reference of request k is the model after request k-1 (the
ledger's default, as MUSE's sequential runs). Settings: the method's TOFU-mini learning rate for the mode, 10
epochs, batch 8, constant schedule; seeds 0, 1, 2 (the seed sets the runs' data order and adapter initialisation;
the models stay those of seed 0), every method's number a mean and standard deviation over them.

Chains of requests go to --workers processes (one torch thread each). Writes
benchmarks/results/sequential_{tofu,muse}.{md,json,png}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from datasets import Dataset, concatenate_datasets
from tqdm.auto import tqdm

from erasus_hf import UnlearningConfig
from erasus_hf.data.formats import TextFormat
from erasus_hf.data.muse import load_muse_split, shared_muse_dir
from erasus_hf.data.tofu import QA_PER_AUTHOR, TOFUDataset
from erasus_hf.evaluation import MIAEvaluator, TOFUEvaluator
from erasus_hf.evaluation.rows import RowsEvaluator
from erasus_hf.ledger import apply_request, load_state, open_ledger
from erasus_hf.modeling import train_tokenizer

from .tofu_mini.methods import methods
from .tofu_mini.models import add_data_options, load_splits, train_model, trained_models
from .tofu_mini.presets import PRESETS
from .tofu_mini.report import environment

TOFU_PRESET = replace(PRESETS["small_forget05"], name="sequential", retain_authors=range(0, 5))
"""forget05's authors and holdout (170-179) on the small model, retain authors 0-4 (they hold the 100 retain
evaluation rows): five models to train instead of two, on 2 CPU cores."""
MUSE_PRESET = replace(TOFU_PRESET, name="sequential_muse", sft_epochs=40)
"""The same model; 40 epochs, as 64-token news rows take longer to learn by heart than TOFU's answers."""
REQUESTS = 4
METHODS = ("npo", "ce_u", "wga")
MODES = ("adapter", "full")
MUSE_ARTICLES, MUSE_RETAIN_ARTICLES, MUSE_TOKENS, MUSE_ROW_TOKENS = 5, 20, 256, 64


@dataclass
class Corpus:
    """One corpus of the benchmark: its requests' training rows, the retain rows, the models, how a state is scored.

    `columns`: the table's per-state metrics, (key, header, format); `utility` / `forgetting`: the keys plotted."""

    name: str
    requests: list[Dataset]
    retain: Dataset
    holdout: Dataset
    tokenizer: Any
    finetuned: Any
    retrained: list[dict]  # per k = 1..REQUESTS: {model, seconds, rows}
    meta: dict
    columns: tuple = ()
    utility: str = ""
    forgetting: str = ""
    extra: dict = field(default_factory=dict)

    def request_aucs(self, model) -> list[float]:
        """The loss attack's AUC of each request's rows against the holdout."""
        out = []
        for rows in self.requests:
            mia = MIAEvaluator(rows, self.holdout, attacks=("loss",), batch_size=32)
            out.append(mia.evaluate(model, self.tokenizer).summary["mia/loss_auc"])
        return out


class TofuCorpus(Corpus):
    def evaluate(self, model, k: int, reference) -> dict:
        """After k requests: the TOFU metrics on the authors requested so far (forget quality against `reference`,
        the retrained model's evaluation of the same rows; None: none) and every request's AUC."""
        forget = concatenate_datasets(self.extra["perturbed"][:k] or self.extra["perturbed"])  # k = 0: every author
        tofu = TOFUEvaluator(
            TOFUDataset(forget=forget, retain=self.extra["retain_eval"], forget_split=TOFU_PRESET.forget_split),
            batch_size=TOFU_PRESET.eval_batch_size,
            max_new_tokens=TOFU_PRESET.max_new_tokens,
        )
        result = tofu.evaluate(model, self.tokenizer, reference=reference)
        metrics = {name.removeprefix("tofu/"): value for name, value in result.summary.items()}
        if reference is None:  # the retrained model against itself; no value for the finetuned one
            metrics["forget_quality"] = 1.0 if k else None
        return {"metrics": metrics, "request_auc": self.request_aucs(model), "reference": result}


class MuseCorpus(Corpus):
    def evaluate(self, model, k: int, reference) -> dict:
        """After k requests: the NLL per token of the requested and the retain articles, PrivLeak of the requested
        rows against `reference` (the retrained model's AUC; None: none), and every request's AUC."""
        requested = concatenate_datasets(self.requests[:k] or self.requests)
        rows = RowsEvaluator(
            {"requested": requested, "retain": self.retain}, TextFormat(), max_length=MUSE_ROW_TOKENS + 8
        )
        summary = rows.evaluate(model, self.tokenizer).summary
        auc = MIAEvaluator(requested, self.holdout, attacks=("loss",), batch_size=32).evaluate(model, self.tokenizer)
        auc = auc.summary["mia/loss_auc"]
        metrics = {
            "requested_nll": summary["rows/requested_nll"],
            "retain_nll": summary["rows/retain_nll"],
            "requested_auc": auc,
            "privleak": None if reference is None else 100 * (auc - reference) / reference,
        }
        if reference is None:  # the retrained model against itself; no value for the finetuned one
            metrics["privleak"] = 0.0 if k else None
        return {"metrics": metrics, "request_auc": self.request_aucs(model), "reference": auc}


# ---- building the corpora


def _qa(rows: Dataset) -> Dataset:
    return rows.select_columns(["question", "answer"])


def _cached_model(path: Path, train) -> tuple[Any, float]:
    """The model saved at `path` with its training seconds, or `train()` -> (model, seconds) saved there."""
    if (path / "seconds.json").is_file():
        return transformers.AutoModelForCausalLM.from_pretrained(path), json.loads(
            (path / "seconds.json").read_text()
        )["seconds"]
    model, seconds = train()
    model.save_pretrained(path)
    (path / "seconds.json").write_text(json.dumps({"seconds": seconds}))
    return model, seconds


def _retrained(preset, retain: Dataset, requests: list[Dataset], tokenizer, cache: str, quiet: bool, last=None):
    """The models retrained without requests 1..k, k = 1..REQUESTS (`last`: the k = REQUESTS one, already trained),
    cached as `{cache}-retrained-after-{k}`."""
    out = []
    for k in range(1, REQUESTS + 1):
        rows = concatenate_datasets([retain, *requests[k:]])
        if k == REQUESTS and last is not None:
            model, seconds = last
        else:

            def train(k=k, rows=rows):
                print(f"Retraining without requests 1-{k}: {len(rows)} rows from scratch...")
                return train_model(preset, tokenizer, rows, 0, quiet)

            model, seconds = _cached_model(Path(f"{cache}-retrained-after-{k}"), train)
        out.append({"model": model.eval(), "seconds": seconds, "rows": len(rows)})
    return out


def tofu_corpus(data_dir: str | None, cache_dir: str, quiet: bool, retrain: bool = True) -> TofuCorpus:
    """The TOFU corpus (module doc); `retrain=False` leaves out the retrained models (the workers need none)."""
    splits = load_splits(TOFU_PRESET, data_dir)
    perturbed = [splits.forget.select(range(k * QA_PER_AUTHOR, (k + 1) * QA_PER_AUTHOR)) for k in range(REQUESTS)]
    splits = replace(splits, forget=concatenate_datasets(perturbed))  # forget05 holds its authors in order
    trained = trained_models(TOFU_PRESET, splits, cache_dir, quiet=quiet)
    requests = [_qa(rows) for rows in perturbed]
    cache = str(Path(cache_dir) / TOFU_PRESET.name / trained["meta"]["key"])
    retain_model = (trained["retain"], trained["meta"]["retain_train_seconds"])
    retrained = (
        _retrained(TOFU_PRESET, splits.train_retain, requests, trained["tokenizer"], cache, quiet, retain_model)
        if retrain
        else []
    )
    meta = {k: trained["meta"][k] for k in ("parameters", "finetuned_train_seconds", "finetuned_train_rows")}
    return TofuCorpus(
        "tofu", requests, splits.train_retain, splits.holdout, trained["tokenizer"], trained["finetuned"].eval(),
        retrained, meta, columns=(("forget_quality", "FQ", "{:.1e}"), ("model_utility", "MU", "{:.3f}")),
        utility="model_utility", forgetting="forget_quality",
        extra={"perturbed": perturbed, "retain_eval": splits.retain_eval},
    )  # fmt: skip


def muse_corpus(data_dir: str | None, cache_dir: str, quiet: bool, retrain: bool = True) -> MuseCorpus:
    """The MUSE-style corpus (module doc); `retrain=False` leaves out the retrained models."""
    news = Path(data_dir) if data_dir else shared_muse_dir("news")
    if news is None:
        raise SystemExit("The MUSE-News slice is not beside the checkout (../shared/data/muse/news): pass --muse_dir.")
    sources = [load_muse_split("raw", "forget", news)]  # MUSE's sust/forget_1, then its three later requests
    sources += [load_muse_split("sust", f"forget_{i}", news) for i in (2, 3, 4)]
    seen: set[str] = set()

    def first(rows: Dataset, n: int) -> list[str]:  # distinct articles (the slice repeats some)
        picked = [t for t in dict.fromkeys(rows["text"]) if t not in seen][:n]
        seen.update(picked)
        return picked

    articles = [first(rows, MUSE_ARTICLES) for rows in sources]
    retain = first(load_muse_split("privleak", "retain", news), MUSE_RETAIN_ARTICLES)
    holdout = first(load_muse_split("privleak", "holdout", news), MUSE_RETAIN_ARTICLES)
    every = [t for group in (*articles, retain, holdout) for t in group]
    key = hashlib.sha256(json.dumps([asdict(MUSE_PRESET.model), MUSE_PRESET.sft_epochs, every]).encode()).hexdigest()
    cache = str(Path(cache_dir) / MUSE_PRESET.name / key[:16])
    saved = Path(f"{cache}-finetuned")  # the finetuned model with its tokenizer, once trained
    if (saved / "seconds.json").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(saved)
    else:
        tokenizer = train_tokenizer(every, vocab_size=MUSE_PRESET.model.vocab_size)

    def rows(texts: list[str]) -> Dataset:  # each article's first MUSE_TOKENS tokens as MUSE_ROW_TOKENS-token rows
        chunks = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:MUSE_TOKENS]
            chunks += [tokenizer.decode(ids[i : i + MUSE_ROW_TOKENS]) for i in range(0, len(ids), MUSE_ROW_TOKENS)]
        return Dataset.from_dict({"text": chunks})

    requests, retain_rows, holdout_rows = [rows(a) for a in articles], rows(retain), rows(holdout)
    everything = concatenate_datasets([retain_rows, *requests])
    print(f"MUSE-style: {len(everything)} rows of {MUSE_ROW_TOKENS} tokens ({len(retain_rows)} retain)...")
    finetuned, seconds = _cached_model(saved, lambda: train_model(MUSE_PRESET, tokenizer, everything, 0, quiet))
    tokenizer.save_pretrained(saved)
    retrained = _retrained(MUSE_PRESET, retain_rows, requests, tokenizer, cache, quiet) if retrain else []
    meta = {"parameters": finetuned.num_parameters(), "finetuned_train_seconds": seconds,
            "finetuned_train_rows": len(everything)}  # fmt: skip
    return MuseCorpus(
        "muse", requests, retain_rows, holdout_rows, tokenizer, finetuned.eval(), retrained, meta,
        columns=(("requested_nll", "requested NLL", "{:.2f}"), ("retain_nll", "retain NLL", "{:.3f}"),
                 ("privleak", "PrivLeak %", "{:+.1f}")),
        utility="retain_nll", forgetting="privleak",
    )  # fmt: skip


CORPORA = {"tofu": tofu_corpus, "muse": muse_corpus}


# ---- the sequences of requests (in worker processes)

_STATE: dict = {}


def _start_worker(name: str, data_dir: str | None, cache_dir: str, references: list) -> None:
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    _STATE.update(corpus=CORPORA[name](data_dir, cache_dir, True, retrain=False), references=references)


def _chain(method_name: str, mode: str, seed: int) -> dict:
    """The four requests of one method, mode and seed, each evaluated after it is applied."""
    corpus: Corpus = _STATE["corpus"]
    method = methods(TOFU_PRESET.model.num_layers)[method_name]
    steps = []
    with tempfile.TemporaryDirectory() as workdir:
        base, run = Path(workdir) / "finetuned", Path(workdir) / "run"
        corpus.finetuned.save_pretrained(base)
        corpus.tokenizer.save_pretrained(base)
        ledger = open_ledger(str(run), base_model=str(base), mode=mode)
        args = UnlearningConfig(
            output_dir=str(run), divergence_factor=None, strategy=method.strategy, strategy_kwargs=method.kwargs,
            retain_loss=method.retain_loss, use_peft=mode == "adapter", lora_r=8, lora_alpha=16,
            learning_rate=method.lora_lr if mode == "adapter" else method.full_lr,
            num_train_epochs=TOFU_PRESET.unlearn_epochs, per_device_train_batch_size=TOFU_PRESET.batch_size,
            per_device_eval_batch_size=TOFU_PRESET.eval_batch_size, lr_scheduler_type="constant", logging_steps=5,
            report_to="none", disable_tqdm=True, use_cpu=True, seed=seed, **method.config,
        )  # fmt: skip
        retain = corpus.retain if method.retain_loss != "none" else None
        for k, rows in enumerate(corpus.requests, 1):
            outcome = apply_request(ledger, rows, args, retain=retain, source=f"request {k}")
            model, _ = load_state(ledger)
            state = corpus.evaluate(model, k, _STATE["references"][k - 1])
            steps.append(
                {"request": k, "seconds": outcome.record.seconds, "metrics": state["metrics"],
                 "request_auc": state["request_auc"], "state_sha256": outcome.record.state_sha256}
            )  # fmt: skip
    return {"method": method_name, "mode": mode, "seed": seed, "learning_rate": args.learning_rate, "steps": steps}


# ---- the report


def summarise(chains: list[dict], keys: list[str]) -> list[dict]:
    """Per method, mode and request: mean and standard deviation over the seeds of `keys`, each request's AUC and
    the request's seconds."""
    groups: dict[tuple, list[dict]] = {}
    for chain in chains:
        groups.setdefault((chain["method"], chain["mode"]), []).append(chain)
    rows = []
    for (method, mode), members in groups.items():
        for k in range(REQUESTS):
            steps = [m["steps"][k] for m in members]
            values = {key: [s["metrics"][key] for s in steps] for key in keys}
            values["seconds"] = [s["seconds"] for s in steps]
            values.update({f"auc_r{j + 1}": [s["request_auc"][j] for s in steps] for j in range(REQUESTS)})
            row = {"method": method, "mode": mode, "request": k + 1, "seeds": len(members)}
            row["learning_rate"] = members[0]["learning_rate"]
            for name, vals in values.items():
                row[name] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
            rows.append(row)
    return rows


def _stat(stat: dict, fmt: str) -> str:
    return f"{fmt.format(stat['mean'])} ± {fmt.replace('+', '').format(stat['std'])}"


def _value(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def markdown(results: dict) -> str:
    env, columns = results["environment"], results["columns"]
    lines = [
        f"`{results['command']}` on {env['machine']} ({results['workers']} processes, 1 torch thread each), torch "
        f"{env['torch']}, transformers {env['transformers']}, erasus_hf {env['erasus_hf']}; corpus "
        f"`{results['corpus']}`, {results['seconds']:.0f} s in all; training its five models from scratch takes "
        f"{results['training_seconds']:.0f} s of that (they are cached under --cache_dir once trained).",
        "",
        f"{results['parameters'] / 1e6:.2f}M-parameter Llama, finetuned on {results['finetuned_rows']} rows; "
        f"requests of {', '.join(map(str, results['request_rows']))} rows. AUC rj: loss-attack MIA AUC of request "
        "j's rows against the holdout (0.5: as "
        "unseen; bold: requests not yet applied); s: the request's training seconds (retrained: the whole training "
        f"from scratch). Methods: mean ± standard deviation over seeds {results['seeds']}.",
        "",
        f"| model | after request | {' | '.join(c[1] for c in columns)} | AUC r1 | AUC r2 | AUC r3 | AUC r4 | s |",
        "|---|---|" + "---|" * (len(columns) + REQUESTS + 1),
    ]

    def aucs(values: list[str], k: int) -> str:
        return " | ".join(f"**{a}**" if j > k else a for j, a in enumerate(values, 1))

    ft = results["finetuned"]
    cells = " | ".join(_value(ft["metrics"].get(key), fmt) for key, _, fmt in columns)
    lines.append(f"| finetuned | 0 | {cells} | {aucs([f'{a:.3f}' for a in ft['request_auc']], 0)} | - |")
    for k, r in enumerate(results["retrained"], 1):
        cells = " | ".join(_value(r["metrics"].get(key), fmt) for key, _, fmt in columns)
        auc = aucs([f"{a:.3f}" for a in r["request_auc"]], k)
        lines.append(f"| retrained | {k} | {cells} | {auc} | {r['seconds']:.0f} |")
    for r in results["summary"]:
        cells = " | ".join(_stat(r[key], fmt) for key, _, fmt in columns)
        auc = aucs([_stat(r[f"auc_r{j}"], "{:.2f}") for j in range(1, REQUESTS + 1)], r["request"])
        name = f"{r['method']} ({r['mode']}, lr {r['learning_rate']:.0e})"
        lines.append(f"| {name} | {r['request']} | {cells} | {auc} | {_stat(r['seconds'], '{:.1f}')} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {key: label for key, label, _ in results["columns"]}
    utility, forgetting = results["utility"], results["forgetting"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ks = list(range(1, REQUESTS + 1))
    retrained = results["retrained"]
    for ax, key in zip(axes, (utility, forgetting, "auc_r1")):
        values = [r["request_auc"][0] if key == "auc_r1" else r["metrics"][key] for r in retrained]
        ax.plot(ks, values, color="black", linewidth=2.5, marker="o", label="retrained")
    for method, mode in dict.fromkeys((r["method"], r["mode"]) for r in results["summary"]):
        rows = [r for r in results["summary"] if (r["method"], r["mode"]) == (method, mode)]
        style = {"marker": "o" if mode == "adapter" else "s", "linestyle": "-" if mode == "adapter" else "--",
                 "capsize": 2, "label": f"{method} ({mode})"}  # fmt: skip
        for ax, key in zip(axes, (utility, forgetting, "auc_r1")):
            ax.errorbar(ks, [r[key]["mean"] for r in rows], yerr=[r[key]["std"] for r in rows], **style)
    axes[0].set(ylabel=labels[utility], title=f"{labels[utility]} after each request")
    axes[1].set(ylabel=labels[forgetting], title=f"{labels[forgetting]} of every request so far")
    if forgetting == "forget_quality":
        axes[1].set_yscale("log")
    axes[2].set(ylabel="MIA AUC of request 1's rows", ylim=(0, 1.02), title="Does request 1 come back? (0.5: unseen)")
    for ax in axes:
        ax.set(xlabel="requests applied", xticks=ks)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Sequential deletion requests, corpus {results['corpus']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _public(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "reference"}


def run_corpus(name: str, args: argparse.Namespace, argv: list[str]) -> dict:
    start = time.perf_counter()
    data_dir = args.muse_dir if name == "muse" else args.data_dir
    corpus = CORPORA[name](data_dir, args.cache_dir, args.quiet)
    print(f"{name}: evaluating the retrained models (the references) and the finetuned model...")
    references, retrained = [], []
    for k, entry in enumerate(corpus.retrained, 1):
        state = corpus.evaluate(entry["model"], k, None)
        references.append(state["reference"])
        retrained.append({**_public(state), "seconds": entry["seconds"], "rows": entry["rows"]})
    finetuned = _public(corpus.evaluate(corpus.finetuned, 0, None))

    chains = []
    context = multiprocessing.get_context("spawn")
    initargs = (name, data_dir, args.cache_dir, references)
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_start_worker, initargs=initargs) as pool:
        jobs = [(m, mode, seed) for m in args.methods for mode in args.modes for seed in args.seeds]
        futures = [pool.submit(_chain, *job) for job in jobs]
        for future in tqdm(as_completed(futures), total=len(futures), desc=f"{name}: request sequences"):
            chain = future.result()
            chains.append(chain)
            last = chain["steps"][-1]
            shown = ", ".join(f"{label} {_value(last['metrics'][key], fmt)}" for key, label, fmt in corpus.columns)
            tqdm.write(f"{chain['method']} ({chain['mode']}, seed {chain['seed']}) after {REQUESTS} requests: {shown}")
    chains.sort(key=lambda c: (args.methods.index(c["method"]), args.modes.index(c["mode"]), c["seed"]))
    results = {
        "command": shlex.join(["python", "-m", "benchmarks.sequential", *argv]),
        "environment": {**environment("cpu"), "threads": 1},
        "workers": args.workers,
        "corpus": name,
        "preset": asdict(MUSE_PRESET if name == "muse" else TOFU_PRESET) | {"retain_authors": [0, 4],
                                                                             "holdout_authors": [170, 179]},
        "columns": [list(c) for c in corpus.columns],
        "utility": corpus.utility,
        "forgetting": corpus.forgetting,
        "parameters": corpus.meta["parameters"],
        "finetuned_rows": corpus.meta["finetuned_train_rows"],
        "request_rows": [len(rows) for rows in corpus.requests],
        "finetuned": finetuned,
        "retrained": retrained,
        "seeds": args.seeds,
        "chains": chains,
        "summary": summarise(chains, [key for key, _, _ in corpus.columns]),
        "training_seconds": corpus.meta["finetuned_train_seconds"] + sum(r["seconds"] for r in retrained),
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sequential_{name}.json").write_text(json.dumps(results, indent=1))
    (out / f"sequential_{name}.md").write_text(markdown(results))
    plot(results, out / f"sequential_{name}.png")
    print(markdown(results))
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sequential",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=f"default: {' '.join(METHODS)}")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="unlearning seeds (default 0 1 2)")
    add_data_options(parser)
    parser.add_argument("--muse_dir", default=None, help="the MUSE-News slice (default: ../shared/data/muse/news)")
    parser.add_argument("--out_dir", default="benchmarks/results")
    parser.add_argument("--workers", type=int, default=2, help="processes running chains side by side (default 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars while training the models")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.quiet:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    return {name: run_corpus(name, args, argv) for name in args.corpora}


if __name__ == "__main__":
    main()
