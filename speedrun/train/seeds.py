"""``speedrun seeds``: train one recipe with several seeds and say whether its mean final validation
loss is significantly below the target, or whether it differs from another set of runs.

    speedrun seeds RUNS_DIR --runs 8 -- --config record_124m --num-gpus 8 --data-path ...
    speedrun seeds RUNS_DIR --report [--against BASELINE_RUNS_DIR]

Each seed is one ordinary ``speedrun train`` process (everything after ``--`` is passed to it) with
``--seed first_seed + i --save-path RUNS_DIR/seed_<k>``, one after the other, so multi-GPU runs,
config overrides and compile caches work as in a single run (later seeds start with a warm cache).
The harness resumes: a seed whose run directory has a summary with a final validation loss is
counted, not rerun; one with checkpoints but no summary is continued from its last checkpoint
(``--resume``), exactly. A failing run stops the harness with its log's name. ``RUNS_DIR/seeds.json``
(written atomically after every run) holds every finished run and the statistics
(eval/significance.py): mean, sample std, 95% interval, one-sided t-test against the target, the
track-1 (p < 0.01) and track-3 ((target - mean) sqrt(n) >= 0.004) rules, and with ``--against`` a
Welch t-test between the two sets.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

from speedrun.config import ConfigError
from speedrun.train.significance import below_target, compare
from speedrun.utils import HelpFormatter, atomic_write_text

DEFAULT_TARGET = 3.28


class SeedsError(RuntimeError):
    """A run of the harness failed or left no result; the message names the seed and its log."""
    user_error = True   # one line from the CLI, no traceback

SEED_DIR = "seed_{:04d}"
_RESERVED = ("--seed", "--save-path", "--resume", "--overwrite")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "seeds", help="train a recipe with several seeds; significance of its mean val loss",
        usage="speedrun seeds RUNS_DIR [--runs N] [--first-seed S] [--target L] [--report] "
              "[--against DIR] [-- TRAIN_ARGS...]",
        description="Train one recipe with several seeds (each an ordinary `speedrun train` run with the "
                    "arguments after --) and test whether its mean final val loss is below the target, "
                    "or differs from another set of runs. Rerunning resumes: finished seeds are skipped, "
                    "an interrupted one continues from its last checkpoint.",
        epilog="example: speedrun seeds runs/base --runs 8 -- --config record_124m --distributed --num-gpus 8",
        formatter_class=HelpFormatter)
    p.add_argument("runs_dir", metavar="RUNS_DIR", help="one run directory per seed goes in here")
    p.add_argument("--runs", type=int, default=0, help="number of seeds to train (0: only report)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first_seed, first_seed + 1, ...")
    p.add_argument("--target", type=float, default=DEFAULT_TARGET, help="the val loss to beat")
    p.add_argument("--report", action="store_true", help="only compute the statistics of the finished runs")
    p.add_argument("--against", metavar="DIR", help="another RUNS_DIR: Welch t-test between the two sets")
    # everything after "--" (argparse leaves it unparsed: args.overrides) goes to `speedrun train`
    p.set_defaults(func=run_seeds, accepts_overrides=True)


def run_seeds(args) -> int:
    train_args = [a for a in getattr(args, "overrides", None) or [] if a != "--"]
    if args.runs < 0:
        raise ConfigError(f"--runs must be >= 0, got {args.runs}")
    if args.report or args.runs == 0:
        if train_args:
            raise ConfigError("seeds --report takes no training arguments (nothing is trained)")
        report = _write_report(args.runs_dir, args.target, args.against)
    else:
        clash = [a for a in train_args if a.split("=")[0] in _RESERVED]
        if clash:
            raise ConfigError(f"seeds: {', '.join(clash)} is set by the harness for each run; leave it out")
        os.makedirs(args.runs_dir, exist_ok=True)
        for seed in range(args.first_seed, args.first_seed + args.runs):
            _train_one(args.runs_dir, seed, train_args)
            # after each run: nothing lost; the last one's is the report
            report = _write_report(args.runs_dir, args.target, args.against)
    print(format_report(report))
    return 0


def _train_one(runs_dir: str, seed: int, train_args: list[str]) -> None:
    run_dir = os.path.join(runs_dir, SEED_DIR.format(seed))
    if finished_loss(run_dir) is not None:
        print(f"seed {seed}: finished earlier ({run_dir})", flush=True)
        return
    # --save-path always: a recipe's own train.save_path would otherwise win, also on --resume
    cmd = [sys.executable, "-m", "speedrun", "train", *train_args, "--seed", str(seed), "--save-path", run_dir]
    # a published checkpoint (`latest`): a save killed before it was published leaves only a
    # step_*.incomplete folder, which cannot be resumed
    if os.path.isfile(os.path.join(run_dir, "checkpoints", "latest")):
        cmd += ["--resume", run_dir]   # an interrupted run: continue it exactly
        print(f"seed {seed}: resuming {run_dir}", flush=True)
    else:
        # a run killed before its first checkpoint has nothing to continue: the harness owns the
        # folder, so it starts that seed again over what is left (train refuses that unless asked)
        cmd += ["--overwrite"]
        print(f"seed {seed}: training into {run_dir}", flush=True)
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, "seeds_harness.log")
    with open(log_path, "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SeedsError(f"seeds: the run of seed {seed} failed (exit code {rc}); see {log_path}")
    if finished_loss(run_dir) is None:
        raise SeedsError(f"seeds: the run of seed {seed} ended without a final val loss in "
                           f"{os.path.join(run_dir, 'summary.json')}; see {log_path}")


def _finished_summary(run_dir: str) -> dict | None:
    """A run directory's summary.json if it records a final val loss (the run finished), else None."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:
        raise SeedsError(f"seeds: cannot read {path}: {e}") from None
    return summary if summary.get("final_val_loss") is not None else None


def finished_loss(run_dir: str) -> float | None:
    """The final val loss in a run directory's summary.json, or None if the run has not finished."""
    summary = _finished_summary(run_dir)
    return None if summary is None else float(summary["final_val_loss"])


def collect(runs_dir: str) -> list[dict]:
    """Every finished run under runs_dir: seed, final val loss, train time, directory."""
    if not os.path.isdir(runs_dir):
        raise FileNotFoundError(f"seeds: no runs directory {runs_dir}")
    runs = []
    for run_dir in sorted(glob.glob(os.path.join(runs_dir, "seed_*"))):
        summary = _finished_summary(run_dir)
        if summary is None:
            continue
        runs.append({"seed": int(os.path.basename(run_dir).split("_")[1]),
                     "final_val_loss": float(summary["final_val_loss"]),
                     "train_time_s": summary.get("train_time_s"), "run_dir": run_dir})
    return runs


def _write_report(runs_dir: str, target: float, against: str | None) -> dict:
    runs = collect(runs_dir)
    if not runs:
        raise SeedsError(f"seeds: no finished run (summary.json with a final val loss) under {runs_dir}")
    losses = [r["final_val_loss"] for r in runs]
    try:
        report = {"runs_dir": runs_dir, "target": target, "runs": runs,
                  "below_target": below_target(losses, target).as_dict()}
        if against:
            other = [r["final_val_loss"] for r in collect(against)]
            report["against"] = {"runs_dir": against, **compare(losses, other).as_dict()}
    except ValueError as e:  # a diverged run (NaN loss), too few runs to compare
        raise SeedsError(f"seeds: {runs_dir}: {e}") from None
    atomic_write_text(os.path.join(runs_dir, "seeds.json"), json.dumps(report, indent=1))
    return report


def format_report(report: dict) -> str:
    s = report["below_target"]
    lines = [f"{'seed':>6} {'val loss':>9} {'train s':>9}"]
    for r in report["runs"]:
        t = f"{r['train_time_s']:9.1f}" if r.get("train_time_s") is not None else f"{'-':>9}"
        lines.append(f"{r['seed']:>6} {r['final_val_loss']:9.4f} {t}")
    std = f"{s['std']:.4f}" if s["std"] is not None else "-"
    lines.append(f"n {s['n']} | mean {s['mean']:.4f} | std {std}"
                 + (f" | 95% interval [{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]" if s["ci95"] else ""))
    if s["p_value"] is None:
        lines.append(f"target {s['target']}: one run, no test (train at least 2 seeds)")
    else:
        lines.append(f"target {s['target']}: p = {s['p_value']:.3g} that the mean is not below it "
                     f"(t = {s['t']:.2f}, {s['n'] - 1} df) -> track-1 rule (p < 0.01): "
                     f"{'met' if s['record_significant'] else 'not met'}")
    lines.append(f"track-3 rule (target - mean) * sqrt(n) = {s['track3_score']:.4f} >= 0.004: "
                 f"{'met' if s['track3_ok'] else 'not met'}")
    if "against" in report:
        c = report["against"]
        lines.append(f"against {c['runs_dir']} (n {c['n_b']}, mean {c['mean_b']:.4f}): difference "
                     f"{c['difference']:+.4f}, 95% interval [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}], "
                     f"Welch p = {c['p_value']:.3g}")
    return "\n".join(lines)
