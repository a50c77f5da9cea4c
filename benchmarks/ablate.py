"""Ablation of the pre-training techniques: each one against plain tiny-zh, same seeds and tokens.

Every variant is a list of ``--set`` overrides of the ``tiny-zh`` recipe (table below), so a new
switch plugs in by its recipe keys; a variant whose keys this checkout does not know is skipped
and listed as such. Hot-start variants first pre-train their source (a dense twin, or a smaller
model) for ``pre_share`` of the step budget, then continue for the rest: the total tokens equal
the baseline's, and the source's tokens, FLOPs and wall time are counted in the variant's cost.

Runs live under ``--out`` (one folder per variant and seed); a finished run is reused, an
interrupted one resumed, so the script can be stopped and re-run (or split over machines with
``--only`` and then re-run once to write the report). The evaluation is the trainer's own:
the same held-out batches (fixed masks) for every run, never tuned per variant.

Run:  python benchmarks/ablate.py --steps 120 --seeds 0 1     (writes docs/techniques.md)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from ablate_report import Run, RunSummary, summarize_run, write_report

from myriad.config import RunConfig, load_recipe
from myriad.errors import UserError
from myriad.train import checkpoint
from myriad.train.pretrain import run_pretrain


@dataclass
class Variant:
    """One row of the ablation: overrides of the measured run, and an optional source run.

    ``{steps}``, ``{half}``, ``{third}``, ``{quarter}`` in a value are replaced by that share of
    the measured run's step budget.
    """

    sets: list[str]
    pre: list[str] | None = None  # hot-start: overrides of the source model, trained first
    pre_share: float = 0.5  # share of the step budget the source model trains for
    reference: str = "—"  # the published number to set next to ours
    notes: str = ""


# fmt: off
VARIANTS: dict[str, Variant] = {
    "baseline": Variant([]),
    "seq-len warm-up": Variant(
        ["data.curriculum.seq_len_start=32", "data.curriculum.seq_len_steps={third}"],
        notes="32 -> 64 -> 128 tokens over the first third; tokens per step kept",
    ),
    "short-docs-first order": Variant(
        ["data.curriculum.order='length'", "data.curriculum.order_steps={third}",
         "data.curriculum.order_start=0.25"],
        notes="competence 25 % -> 100 % over the first third",
    ),
    "word-vector routing": Variant(
        ["model.moe.router_input='routing_embedding'", "model.moe.routing_dim=64",
         "model.moe.balanced_init=true", "train.freeze_routing_step={quarter}"],
        reference="StableMoE: 40.9 % of tokens still switch experts after 20 % of training "
        "(learned routing)",
        notes="routing embedding, frequency-balanced init, frozen after a quarter",
    ),
    "attention reuse": Variant(
        ["model.attn_reuse.every=2", "model.attn_reuse.recompute_prob=0.25"],
        reference="HunYuan-NLP 1T: -50 % attention computation, no loss in quality",
        notes="layers 1 and 3 reuse the previous layer's attention; recompute p = 0.25",
    ),
    "upcycle (split)": Variant(
        ["train.upcycle='split'"],
        pre=["model.moe.every=0"],
        reference="sparse upcycling: matched its dense model at ~50 % of the dense "
        "pre-training cost",
        notes="dense twin (d_ff 1024) for half the steps; 8 experts take 512-unit windows",
    ),
    "grow (2x128 -> 4x256)": Variant(
        [],
        pre=["model.d_model=128", "model.n_heads=2", "model.n_layers=2", "model.d_ff=512",
             "model.moe.d_expert=256"],
        reference="bert2BERT: ~45 % of pre-training compute saved",
        notes="half the steps on a 2-layer, d 128 model; grown to tiny-zh",
    ),
}
# fmt: on


def fill(sets: list[str], steps: int) -> list[str]:
    shares = {"steps": steps, "half": steps // 2, "third": steps // 3, "quarter": steps // 4}
    return [s.format(**shares) for s in sets]


def _schedule(steps: int, eval_every: int) -> list[str]:
    warmup = max(1, steps // 10)
    return [
        f"train.steps={steps}",
        f"train.warmup_steps={warmup}",
        f"train.eval_every={eval_every}",
        f"train.checkpoint_every={max(1, steps // 2)}",
    ]


def plan_variant(name: str, v: Variant, seed: int, args, tokenizer: Path) -> list[Run]:
    """The runs of one variant and seed: an optional source run, then the measured run.

    Raises UserError if this checkout lacks one of the variant's keys.
    """
    common = [*args.set, f"train.seed={seed}", f"data.tokenizer='{tokenizer}'"]
    out = Path(args.out) / f"{_slug(name)}-seed{seed}"
    plan: list[Run] = []
    steps = args.steps
    if v.pre is not None:
        pre_steps = max(1, round(args.steps * v.pre_share))
        steps = args.steps - pre_steps
        pre_sets = [*v.pre, *common, *_schedule(pre_steps, args.eval_every)]
        plan.append((load_recipe("tiny-zh", pre_sets), out.with_name(out.name + "-source")))
        common.append(f"train.init_from='{out.with_name(out.name + '-source')}'")
    sets = [*fill(v.sets, steps), *common, *_schedule(steps, args.eval_every)]
    plan.append((load_recipe("tiny-zh", sets), out))
    return plan


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def run_once(cfg: RunConfig, out: Path, shared: Path) -> float:
    """Train (or resume, or reuse) one run; returns the seconds spent now.

    The packed corpus is hard-linked from ``shared`` (same tokenizer, same cache key), so a run
    does not tokenize the corpus again.
    """
    latest = checkpoint.latest_checkpoint(out / "checkpoints")
    done = latest is not None and latest.name == checkpoint.step_dir_name(cfg.train.steps)
    if done:
        return 0.0
    for cache in (shared / "data").glob("packed-*"):
        if not (out / "data" / cache.name).exists():
            shutil.copytree(cache, out / "data" / cache.name, copy_function=os.link)
    start = time.perf_counter()
    run_pretrain(cfg, out, resume=latest is not None, log=lambda *_: None)
    return time.perf_counter() - start


def shared_data(out: Path) -> Path:
    """Train the tokenizer and pack the corpus once; every run reuses both (hot-start needs the
    same tokenizer anyway, and the cache key depends only on corpus, tokenizer and seq_len)."""
    from myriad import data as data_pkg

    cfg = load_recipe("tiny-zh")
    folder = out / "_shared"
    data_pkg.prepare_data(
        cfg.data, vocab_size=cfg.model.vocab_size, objective="mlm", out_dir=folder, seed=0
    )
    return folder.resolve()


def interleaved_step_times(names: list[str], args, shared: Path) -> dict[str, float]:
    """Median seconds per training step of each variant's measured model, timed round-robin
    (``--time-rounds`` rounds of 3 steps each) so that every variant sees the same machine load:
    the wall clocks of runs made one after another on a shared machine do not. All variants
    step on full-length batches of the plain stream (a warm-up's shorter early steps show in
    its FLOPs instead); hot-start variants time the model they train after the hot start.
    """
    from myriad import data as data_pkg
    from myriad.train.pretrain import build_loop

    loops = {}
    configs = {}
    for name in names:
        plan = plan_variant(name, VARIANTS[name], 0, args, shared / "tokenizer.json")
        configs[name] = plan[-1][0]
        if len(plan) > 1:
            configs[f"{name} (source)"] = plan[0][0]
    for name, cfg in configs.items():
        cfg.train.init_from = ""  # weights do not change the time of a step
        m = cfg.model
        prepared = data_pkg.prepare_data(
            cfg.data, vocab_size=m.vocab_size, objective=m.objective, out_dir=shared, seed=0
        )
        loop = build_loop(cfg, shared, prepared)
        loop.stream = prepared.train_stream(cfg.train.batch_size, cfg.train.seed)
        loop.step_fn([loop.stream.next_batch()])  # warm-up step, not timed
        loops[name] = loop
    times: dict[str, list[float]] = {n: [] for n in loops}
    names_in_order = list(loops)
    for k in range(args.time_rounds):  # the order rotates, so no variant is always first
        for name in names_in_order[k % len(loops) :] + names_in_order[: k % len(loops)]:
            loop = loops[name]
            for _ in range(3):
                batch = loop.stream.next_batch()
                start = time.perf_counter()
                loop.step_fn([batch])
                times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="steps per run (tiny-zh: 600)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval-every", type=int, default=0, help="0: steps / 10")
    parser.add_argument("--only", nargs="+", default=None, help="variant names to run")
    parser.add_argument("--set", action="append", default=[], help="override for every run")
    parser.add_argument("--out", default="runs/ablate")
    parser.add_argument("--doc", default="docs/techniques.md", help="'' to skip the report")
    parser.add_argument("--section", default="cpu", help="report section (marker) to replace")
    parser.add_argument("--prepare-only", action="store_true", help="only tokenizer + packing")
    parser.add_argument("--report-only", action="store_true", help="no training: read metrics")
    parser.add_argument("--machine", default="", help="machine named in the report (default: here)")
    parser.add_argument("--time-rounds", type=int, default=0, help="interleaved step timing")
    parser.add_argument("--step-times-from", default="", help="step_times.json of a timing run")
    args = parser.parse_args()
    args.eval_every = args.eval_every or max(1, args.steps // 10)
    shared = shared_data(Path(args.out))
    if args.prepare_only:
        return
    names = args.only or list(VARIANTS)
    if "baseline" not in names and args.doc:
        names = ["baseline", *names]
    results: dict[str, list[RunSummary]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        for seed in args.seeds:
            try:
                plan = plan_variant(name, VARIANTS[name], seed, args, shared / "tokenizer.json")
            except UserError as exc:  # a key this checkout does not have (yet)
                skipped[name] = str(exc)
                break
            for cfg, folder in plan:
                spent = 0.0 if args.report_only else run_once(cfg, folder, shared)
                print(f"{name} seed {seed}: {folder} ({spent:.0f} s)", flush=True)
            try:
                results.setdefault(name, []).append(summarize_run(plan))
            except (IndexError, KeyError, ValueError, statistics.StatisticsError):
                skipped[name] = f"seed {seed} has no complete metrics (run failed or stopped)"
                results.pop(name, None)
                break
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    for name, runs in results.items():
        print(f"{name:28s} final held-out loss {statistics.mean(r.final_loss for r in runs):.4f}")
    args.step_times = {}
    times_file = Path(args.out) / "step_times.json"
    if args.time_rounds:
        args.step_times = interleaved_step_times(list(results), args, shared)
        times_file.write_text(json.dumps(args.step_times, indent=1), encoding="utf-8")
    elif args.step_times_from:
        args.step_times = json.loads(Path(args.step_times_from).read_text(encoding="utf-8"))
    print("step times:", {n: round(t, 3) for n, t in args.step_times.items()})
    if args.doc:
        write_report(Path(args.doc), results, skipped, args, VARIANTS)


if __name__ == "__main__":
    main()
