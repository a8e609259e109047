"""search-cnn: random vs TPE vs NSGA-II at an equal number of trials, and the front against shipped recipes.

A space over structured channel ratios per dependency group, unstructured sparsity per layer and bits per
layer (2 to 8, weight sharing + entropy coding), objectives validation accuracy, measured .dsq bytes and
measured latency; the same number of trials for each sampler, on vgg-small / Fashion-MNIST.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.runner import BenchContext

NAME = "search-cnn"
TITLE = "Policy search: random vs TPE vs NSGA-II hypervolume at equal trials; the front vs shipped recipes"
MODEL = "zoo:vgg-small@fashion-mnist"
TRIALS = 24
SAMPLERS = ("random", "tpe", "nsga2")
FLOOR_PP = 2.0  # the quality floor a user deploying this classifier would state (hv_above_floor)
SEEDS = (0, 1, 2)  # SEARCH_CNN_SEEDS=0 for one study per sampler
SPACE: dict[str, Any] = {
    "description": "search-cnn: a CNN, channel ratios, sparsity and bits per layer",
    # Latency is measured on every trial (and reported) but is not an objective the samplers chase: on this
    # shared machine its trial-to-trial noise (40 to 320 ms for models of equal speed in the first run) made
    # noise-fast points non-dominated and steered TPE and NSGA-II after them (see the notes).
    "objectives": ["quality", "bytes"],
    # No constraint: the target is the hypervolume over the whole front, which credits the smallest models
    # too; a max_drop floor (session 9) steered TPE and NSGA-II away from that end (see the notes).
    "latency": {"batch": 64, "threads": 2},
    "priors": "sensitivity",
    "stages": [
        {"type": "prune_channels", "optional": True,
         "ratio": {"per_layer": {"low": 0.0, "high": 0.375, "step": 0.125}}},
        {"type": "prune", "optional": True, "storage": "sparse",
         "sparsity": {"per_layer": {"low": 0.3, "high": 0.9, "step": 0.1}}},
        {"type": "share", "bits": {"per_layer": {"choice": [2, 3, 4, 5, 6, 8]}}},
        {"type": "encode"},
    ],
}
# Every shipped recipe that is one post-training stage and applies to a CNN classifier (the recipes that
# train -- QAT, deep compression, prune-structured, low-rank + fine-tuning -- are outside a space without
# a training stage, see the notes).
COMPARE = ("int8-dynamic", "int8-static", "w4-rtn", "w4-gptq", "mixed-precision")
SETUP = (
    f"{MODEL}, {TRIALS} measured trials per sampler (random, TPE multivariate, NSGA-II) and seed ({len(SEEDS)} "
    "seeds: the space's `seed`, which seeds the sampler and the recipes), same space; a proposal equal to an "
    "already measured recipe is not measured again and does not count. Space: an "
    "optional prune_channels stage (ratio 0-0.375 step 0.125 per dependency group), an optional unstructured prune "
    "stage (0.3-0.9 step 0.1 per layer, sparse storage), then weight sharing (k-means codebook) with 2, 3, 4, 5, 6 "
    "or 8 bits per layer and entropy coding (encode); no training stage (no fine-tuning epochs). `priors: "
    "sensitivity` enqueues the same first points for every sampler: per-layer bits from the mixed-precision "
    "sensitivity scan at mean widths 3.5, 5 and 6.5 and under the weight bytes each shipped recipe's measured "
    "file spends on the layers (re-enqueued under a budget lowered by the excess when the prior's file is the "
    "larger, at most twice), and per-layer sparsities from the pruning sensitivity scan. No constraint (the run of commit 9abaf86 had `max_drop: 2`, see the notes). Objectives: "
    "validation accuracy (fashion-mnist:val, 10k images held out of train; calibration on the other 50k) and "
    "measured .dsq bytes; latency (batch 64, 2 threads, interleaved with fp32) is measured on every trial but is "
    "not an objective (too noisy on the shared machine, see the notes). `hv_quality_bytes`: hypervolume on (validation accuracy, bytes / fp32 bytes) "
    "with reference (0, 1); `hv_above_floor`: the same with reference (fp32 validation accuracy - 2 pp, 1), "
    "counting only points within 2 pp of fp32; the `mean` rows average them over the seeds and count the seeds "
    "where the sampler beat random. Shipped single-stage post-training recipes (int8-dynamic, int8-static, w4-rtn, w4-gptq, "
    "mixed-precision) are the space's `compare` list: each study measures them like its trials (same compress, "
    "calibration on the fit split; `search_s` includes that); `refs_dominated` counts those matched or dominated "
    "on TEST accuracy (10k test split) and file bytes by a front point of that sampler (front artifacts "
    "re-scored on test)."
)


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    import optuna
    import yaml

    from deepsqueeze.artifact import load
    from deepsqueeze.data import resolve_data
    from deepsqueeze.eval import accuracy
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.search import load_space, run_search
    from deepsqueeze.search.front import hypervolume_history

    trials = 6 if ctx.quick else TRIALS
    seeds = [int(x) for x in os.environ.get("SEARCH_CNN_SEEDS", ",".join(map(str, SEEDS))).split(",")]
    if ctx.quick:
        seeds = [0, 1]
    model_ref = "zoo:vgg-small@digits" if ctx.quick else MODEL
    data_ref = model_ref.split("@")[1]
    test = resolve_data(data_ref)
    fp32 = resolve_model(model_ref, progress=False)
    fp32_acc = accuracy(fp32.module, test)
    fp32_bytes = 4 * fp32.base_params
    ctx.log(f"fp32 {model_ref}: test accuracy {fp32_acc:.4f}, {fp32_bytes:,} B")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        refs: list[dict[str, Any]] = []
        measured_refs = None
        for seed, sampler in ((seed, sampler) for seed in seeds for sampler in SAMPLERS):
            space_file = root / f"space-{seed}.yaml"
            space_file.write_text(yaml.safe_dump({**SPACE, "model": model_ref, "data": data_ref, "seed": seed,
                                                  "compare": list(COMPARE)}))
            space, base = load_space(space_file)
            name = f"{sampler}-s{seed}"
            storage = f"sqlite:///{root / name / 'study.db'}"
            if measured_refs is not None:
                # the shipped recipes have their own seed: the same artifacts in every study, measured once
                (root / name).mkdir()
                study = optuna.create_study(storage=storage, study_name=name, directions=["maximize", "minimize"])
                study.set_user_attr("references", measured_refs)
            start = time.perf_counter()
            res = run_search(space, base, root / name, sampler=sampler, trials=trials, study_name=name,
                             log=ctx.log)
            wall = time.perf_counter() - start
            study = optuna.load_study(study_name=name, storage=storage)
            measured_refs = study.user_attrs.get("references", [])
            if not refs:  # every study measures the same `compare` recipes (same bytes); score them once on test
                for ref in res.references:
                    if "error" in ref:
                        ctx.notes.append(f"shipped {ref['recipe']} did not run: {ref['error']}")
                        continue
                    refs.append({"recipe": ref["recipe"], "bytes": ref["bytes"], "compress_s": ref["compress_s"],
                                 "test_accuracy": accuracy(load(ref["artifact"]).module, test)})
                    ctx.log(f"{ref['recipe']}: {refs[-1]}")
            complete = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
                              key=lambda t: t.number)
            attrs = [t.user_attrs for t in complete]
            history = hypervolume_history(attrs, ("quality", "bytes", "latency"), res.baseline)
            history_2d = hypervolume_history(attrs, ("quality", "bytes"), res.baseline)
            floor = res.baseline["quality"] - FLOOR_PP / 100
            hv_floor = hypervolume_history(attrs, ("quality", "bytes"), res.baseline, reference={"quality": floor})
            front_test = [(r["bytes"], accuracy(load(r["artifact"]).module, test)) for r in res.front]
            covered = [ref["recipe"] for ref in refs
                       if any(b <= ref["bytes"] and a >= ref["test_accuracy"] for b, a in front_test)]
            best_test = max((a for _, a in front_test), default=None)
            half = len(history_2d) // 2
            rows.append({
                "sampler": sampler, "seed": seed, "model": model_ref, "trials": len(complete),
                "repeats": res.repeats, "failed": res.failed,
                "hv_quality_bytes": round(history_2d[-1], 4) if history_2d else None,
                f"hv_qb_at_{half}": round(history_2d[half - 1], 4) if half >= 1 else None,
                "hv_above_floor": round(hv_floor[-1], 5) if hv_floor else None,
                "feasible_trials": sum(a["quality"] >= floor for a in attrs),
                "hv_3obj": round(history[-1], 4) if history else None,
                "front_points": len(res.front),
                "smallest_front_bytes": min((b for b, _ in front_test), default=None),
                "best_front_test_acc": round(best_test, 4) if best_test is not None else None,
                "fp32_test_acc": round(fp32_acc, 4),
                "refs_dominated": f"{len(covered)}/{len(refs)}",
                "refs_not_dominated": " ".join(r["recipe"] for r in refs if r["recipe"] not in covered) or "-",
                "search_s": round(wall, 1),
                "mean_compress_s": round(sum(a.get("compress_s", 0.0) for a in attrs)
                                         / max(len(complete), 1), 2),
            })
            ctx.log(f"{sampler}: {rows[-1]}")
            ctx.log("front (bytes, test acc): " + ", ".join(f"({b}, {a:.4f})" for b, a in sorted(front_test)))
    rows += mean_rows(rows, len(refs))
    for ref in refs:
        rows.append({"sampler": f"shipped: {ref['recipe']}", "model": model_ref,
                     "smallest_front_bytes": ref["bytes"], "best_front_test_acc": round(ref["test_accuracy"], 4),
                     "fp32_test_acc": round(fp32_acc, 4), "search_s": ref["compress_s"]})
    ctx.notes.append(f"{len(seeds)} studies per sampler ({trials} trials each, seeds {seeds}). Latency is measured on a 2-core machine shared with other engineers' "
                     "jobs: latency figures (and `hv_3obj`, which uses latency / fp32 latency with reference 2) are "
                     "noisy; sizes and accuracies are not. The target is decided on `hv_quality_bytes`.")
    ctx.notes.append("Session 9's run (commit 9abaf86, same space and seeds, with the constraint `max_drop: 2` that TPE "
                     "and NSGA-II used): mean hv_quality_bytes random 0.9183, TPE 0.9081, NSGA-II 0.8974; hv above "
                     "the floor 0.01827 / 0.01819 / 0.01831. The guided samplers put 18 and 21 of 24 trials within "
                     "the floor (random 10) and never reached the smallest models random found (112-116 KB), which "
                     "the (0, 1) reference credits: the constraint was dropped from the space.")
    ctx.notes.append("Session 7's run (commit 2c6b222, one seed, reference priors at nominal bytes, repeats "
                     "measured, shipped recipes' stage rows scoring the model three times per trial): "
                     "hv_quality_bytes random 0.9188, TPE 0.9128, NSGA-II 0.8931; hv above the floor 0.01786 / "
                     "0.01790 / 0.01786; shipped recipes dominated 5/5 by each.")
    ctx.notes.append("Earlier runs on LeNet-5 (zoo:lenet5@fashion-mnist, same space without priors or constraint, "
                     "commit 49f3fc5): hv_quality_bytes random 0.9254, TPE 0.9151, NSGA-II 0.9112; shipped recipes "
                     "dominated 2/5, 0/5, 0/5.")
    ctx.notes.append("What was tried: the first run (commit c02ad88, result committed in 610b63e; same space and 24 trials, objectives "
                     "validation accuracy, bytes AND latency) gave hv_quality_bytes random 0.9254, TPE 0.9177, NSGA-II "
                     "0.9103 (hv_3obj 1.5922 / 1.4286 / 1.3905) and dominated 2/5, 0/5, 0/5 shipped recipes on test: "
                     "latency measured 40-320 ms for equally fast models under load 6-8 on 2 cores, so noise-fast "
                     "low-accuracy points were non-dominated and TPE spent its 16 model-based trials near them "
                     "(validation accuracy 0.80-0.90); NSGA-II (population 6) re-evaluated 5 duplicate points. Since "
                     "then the space searches accuracy vs bytes and keeps latency as a measured column (`hv_3obj`).")
    ctx.notes.append("Caveat on the validation split: the zoo's fp32 models are trained on all 60k training images, so "
                     "the 10k validation rows (held out from calibration, never the test split) were seen by the base "
                     "model: validation accuracy reads about 4 pp above test accuracy; the front is re-scored on test.")
    ctx.notes.append("Shipped-recipe rows: `smallest_front_bytes` is the recipe's own .dsq bytes, "
                     "`best_front_test_acc` its test accuracy and `search_s` its compress wall time. Recipes that "
                     "train (qat-*, deep-compression*, prune-structured, lowrank-*, distill-*) are not compared: the "
                     "space has no training stage (one vgg-small epoch is about 68 s here, beyond the budget).")
    return rows


def mean_rows(rows: list[dict[str, Any]], n_refs: int) -> list[dict[str, Any]]:
    """One row per sampler: hypervolumes averaged over the seeds, the seeds it beat random on, the target."""
    out = []
    random_hv = {r["seed"]: r for r in rows if r["sampler"] == "random"}
    for sampler in SAMPLERS:
        mine = [r for r in rows if r["sampler"] == sampler]
        if not mine:
            continue
        row: dict[str, Any] = {"sampler": f"{sampler}: mean of {len(mine)} seeds", "trials": mine[0]["trials"]}
        for key in ("hv_quality_bytes", "hv_above_floor", "feasible_trials"):
            values = [r[key] for r in mine if r[key] is not None]
            row[key] = round(statistics.mean(values), 5) if values else None
            if len(values) > 1:
                row[f"{key}_sd"] = round(statistics.stdev(values), 5)
        row["refs_dominated"] = " ".join(r["refs_dominated"] for r in mine)
        row["repeats"] = sum(r["repeats"] for r in mine)
        if sampler != "random":
            for key, short in (("hv_quality_bytes", "hv"), ("hv_above_floor", "hv_floor")):
                wins = sum((r[key] or 0) > (random_hv[r["seed"]][key] or 0) for r in mine if r["seed"] in random_hv)
                row[f"seeds_{short}_above_random"] = f"{wins}/{len(mine)}"
            random_mean = statistics.mean(r["hv_quality_bytes"] or 0.0 for r in random_hv.values())
            all_dominated = all(r["refs_dominated"] == f"{n_refs}/{n_refs}" for r in mine)
            row["target"] = ("mean hv_quality_bytes over the seeds > random's at equal trials; every shipped recipe "
                             "dominated or matched on test accuracy and bytes in every study")
            row["met"] = "yes" if (row["hv_quality_bytes"] or 0) > random_mean and all_dominated else "no"
        out.append(row)
    return out
