"""A method's settings (BYOL unless a trial sets ``method``), chosen on a validation split: every
trial of the settings study in one table.

Each trial is BYOL (or the trial's ``method``) at 100% budget on the profile's train split (the
budget table's data, student, stage-one shard set and evaluation protocol) with the paper's
optimiser and the method's own views
(:data:`PAPER_SETTINGS`, not the profile's or ``train``'s defaults, so a trial means the same thing
after either changes) and some :class:`TrainConfig` fields changed, scored
by ``eval``'s linear probe and k-NN on the **validation** split carved out of the train split
(:func:`budget_table.benchmark_splits`); the test split is never read. Trials are named on the
command line as ``NAME:field=value,field=value`` (values parsed as JSON where they parse, e.g.
``0.2``, ``null``; else kept as strings), applied on top of the profile::

    python benchmarks/ssl_settings.py --profile cpu --out runs/ssl-settings \\
        --trial paper: --trial warmup-cosine:lr_schedule=cosine,warmup_epochs=2

Every finished trial is kept in ``OUT/table/trials/<name>/result.json``; rerunning skips it (a trial
name given again with other settings is refused), resumes a killed run from its last epoch, and
rewrites ``OUT/results.{csv,md}`` with every trial done so far.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from budget_table import PROFILES, RANDOM_PRIOR, BudgetTable, tiny, train_config  # noqa: E402

from rela_pipeline.errors import RelaError  # noqa: E402
from rela_pipeline.fileio import atomic_write, write_json_atomic  # noqa: E402
from rela_pipeline.stages.evaluate import EvalConfig, run_eval  # noqa: E402
from rela_pipeline.stages.train import TrainConfig, run_train  # noqa: E402

#: The profile fields a trial starts from: the paper's optimiser (AdamW, constant learning rate) and
#: BYOL's own views and teacher (lightly's), with ``train``'s trained transfer layer.
PAPER_SETTINGS = dict(lr_schedule="constant", warmup_epochs=0.0, teacher_momentum="cosine", crop_min_scale=None, transfer="trained")

#: TrainConfig fields a trial may change.
TRIAL_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig)) - {"shards", "out_dir", "resume", "overwrite", "progress", "seed"}


def parse_trial(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:field=value,...`` -> ``(name, {field: value})``.

    Raises:
        RelaError: no name, a malformed pair, or a field that is not a trial field.
    """
    name, _, rest = text.partition(":")
    if not name or "/" in name:
        raise RelaError(f"bad trial {text!r}: expected NAME:field=value,...")
    settings: dict[str, Any] = {}
    for pair in filter(None, rest.split(",")):
        field, eq, value = pair.partition("=")
        if not eq or field not in TRIAL_FIELDS:
            raise RelaError(f"bad trial setting {pair!r} in {text!r}; fields: {', '.join(sorted(TRIAL_FIELDS))}")
        try:
            settings[field] = json.loads(value)
        except json.JSONDecodeError:
            settings[field] = value
    return name, settings


def run_trial(table: BudgetTable, name: str, settings: dict[str, Any], shards: str, seed: int) -> dict[str, Any]:
    """Train (or resume) one trial and score it on the validation split; cached as ``result.json``.

    Returns:
        ``{"trial", "settings", "seed", "val_linear_probe_top1", "val_knn_top1" (fractions),
        "train_seconds", "steps", "final_loss"}``.

    Raises:
        RelaError: the trial's directory holds a result with other settings.
    """
    run = table.out / "trials" / name
    saved = run / "result.json"
    if saved.exists():
        result = json.loads(saved.read_text())
        if result["settings"] != settings or result["seed"] != seed:
            raise RelaError(f"trial {name} exists with settings {result['settings']} (seed {result['seed']}); use another name")
        return result
    splits = table.data_dirs()
    train_out = run / "train"
    summary_path = train_out / "summary.json"
    if not summary_path.exists():
        run_train(train_config(table.profile, shards=shards, out_dir=train_out, seed=seed, device=table.device, num_workers=table.num_workers, **settings))
    summary = json.loads(summary_path.read_text())
    evaluation = run_eval(
        EvalConfig(
            checkpoint=Path(summary["checkpoint"]),
            train_dir=splits.train,
            test_dir=splits.val,
            device=table.device,
            num_workers=table.num_workers,
            probe_epochs=table.profile.probe_epochs,
            seed=seed,
            progress=False,
        )
    )
    result = {
        "trial": name,
        "settings": settings,
        "seed": seed,
        "val_linear_probe_top1": evaluation["linear_probe"]["top1"],
        "val_knn_top1": evaluation["knn"]["top1"],
        "train_seconds": summary["wall_clock_s"],
        "steps": summary["budget"]["steps"],
        "final_loss": (summary.get("final") or {}).get("loss"),
    }
    write_json_atomic(saved, result)
    return result


def write_results(out: Path, results: list[dict[str, Any]]) -> str:
    """``results.csv`` and ``results.md`` (one row per trial, in the order given); returns the table."""
    fields = ("trial", "settings", "seed", "val_linear_probe_top1", "val_knn_top1", "train_seconds", "steps", "final_loss")
    with atomic_write(out / "results.csv", "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for r in results:
            writer.writerow({**r, "settings": json.dumps(r["settings"], sort_keys=True)})
    lines = [
        "| trial | settings (on top of the paper's: AdamW 1e-3 constant, the method's own views and teacher; BYOL unless set) | val linear probe | val k-NN | steps | train wall-clock |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(r["settings"].items())) or "(the paper's)"
        lines.append(
            f"| {r['trial']} | {settings} | {100 * r['val_linear_probe_top1']:.2f} | {100 * r['val_knn_top1']:.2f} "
            f"| {r['steps']} | {r['train_seconds']:.0f} s |"
        )
    table = "\n".join(lines) + "\n"
    with atomic_write(out / "results.md", "w") as handle:
        handle.write(table)
    return table


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--out", type=Path, required=True, help="output directory; rerun to resume or add trials")
    parser.add_argument("--trial", action="append", required=True, help="NAME:field=value,... (repeatable)")
    parser.add_argument(
        "--data", type=Path, default=None, help="directory with train/ and test/ ImageFolders (default: Fashion-MNIST prepared into OUT/table/data)"
    )
    parser.add_argument("--tiny", action="store_true", help="shrink the profile to seconds per run (tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=None)
    args = parser.parse_args(argv)
    profile = dataclasses.replace(tiny(PROFILES[args.profile]) if args.tiny else PROFILES[args.profile], **PAPER_SETTINGS)
    try:
        trials = [parse_trial(t) for t in args.trial]
        table = BudgetTable(profile, args.out / "table", args.data, device=args.device, num_workers=args.num_workers)
        table.out.mkdir(parents=True, exist_ok=True)
        shards = table.stage_one(RANDOM_PRIOR, table.data_dirs().train)["shards"]
        results = []
        for name, settings in trials:
            result = run_trial(table, name, settings, shards, args.seed)
            results.append(result)
            print(
                f"{name}: val linear probe {result['val_linear_probe_top1']:.2%}, k-NN {result['val_knn_top1']:.2%} "
                f"({result['steps']} steps, {result['train_seconds']:.0f} s)",
                flush=True,
            )
            write_results(args.out, results)
    except RelaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; finished trials are kept: rerun the same command to resume ({args.out})", file=sys.stderr)
        return 130
    print(write_results(args.out, results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
