"""``speedrun train``: the product brief's flags, dotted config overrides, and the local multi-process
launcher (``--distributed --num-gpus N`` starts N workers through torch.distributed's own launcher,
so nobody has to type torchrun; plain ``torchrun -m speedrun train`` works the same)."""
from __future__ import annotations

import argparse
import os
import sys
import time

from speedrun.config import Config, ConfigError
from speedrun.utils import HelpFormatter, missing_parents, probe_writable

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CONFIG = "tiny"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a GPT (default: the tiny recipe on the embedded Shakespeare corpus)",
        description="Train a GPT. Any config field can be overridden with a dotted flag, e.g. "
                    "--optim.muon.lr 0.02 --schedule.num_scheduled_steps 500.",
        formatter_class=HelpFormatter)
    add_train_arguments(p)
    p.set_defaults(func=run_train, accepts_overrides=True)


def add_train_arguments(p: argparse.ArgumentParser, bench: bool = False) -> None:
    """The flags of ``speedrun train``; ``bench``: those that mean something to ``speedrun bench``
    (not resuming, saving, printing the config or launching workers)."""
    default = ("record_124m on a GPU, tiny on a CPU" if bench
               else f"{DEFAULT_CONFIG}, or with --resume the run's own")
    p.add_argument("--config", help=f"recipe: a JSON file, or a bundled name ({', '.join(bundled_configs())}); "
                                    f"default: {default}")
    p.add_argument("--cuda", action="store_true", help="run on the GPU; fail if there is none")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    p.add_argument("--data-path", help="train shards: a .bin file, directory or glob (default: "
                                       + ("synthetic documents" if bench else "embedded corpus") + ")")
    p.add_argument("--val-data-path", help="validation shards: a .bin file, directory or glob")
    if bench:
        p.add_argument("--save-path", help="folder for the synthetic shards and the profiler's files "
                                           "(default: a new temporary folder)")
    else:
        p.add_argument("--save-path", help="run directory for config, metrics, loss curve and checkpoints "
                                           "(default: runs/<date>-<time>)")
        p.add_argument("--resume", metavar="DIR",
                       help="continue exactly from a checkpoint or run directory, with the run's saved config "
                            "(run settings such as --save-every or --train.max_steps may change)")
        p.add_argument("--overwrite", action="store_true",
                       help="start a new run in a --save-path that already holds one, deleting that run")
        p.add_argument("--save-every", type=int, metavar="N",
                       help="checkpoint every N steps (and always at the end)")
    p.add_argument("--use-fp8", action="store_true",
                   help="FP8 lm_head matmul in training (needs an FP8 GPU: compute capability >= 8.9)")
    p.add_argument("--no-fp8", action="store_true",
                   help="no FP8 matmuls even where FP8 is available: bf16 lm_head and MLP (model.fp8_head and "
                        "model.fp8_mlp false)")
    p.add_argument("--use-flash-attn", action="store_true",
                   help="FlashAttention-3/4 varlen kernels instead of FlexAttention (package must be installed)")
    if not bench:
        p.add_argument("--distributed", action="store_true",
                       help="run data-parallel over local GPUs (all visible ones unless --num-gpus)")
        p.add_argument("--num-gpus", type=int, metavar="N",
                       help="number of local worker processes (GPUs; on --cpu, gloo processes)")
    p.add_argument("--memory-pool", action="store_true",
                   help="use the expandable-segments CUDA caching allocator (PYTORCH_CUDA_ALLOC_CONF="
                        "expandable_segments:True): memory grows in place instead of in fixed blocks, "
                        "which avoids fragmentation when sequence shapes vary")
    p.add_argument("--micro-batch-tokens", type=int, metavar="T",
                   help="tokens per forward pass per GPU in every stage (recipe: train.sequence_tokens, or "
                        "the stage's batch / train.micro_batches_per_step); smaller fits smaller GPUs but "
                        "changes the document packing, so the trajectory differs slightly")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile (slower; for debugging)")
    p.add_argument("--seed", type=int, metavar="S",
                   help="random seed of the initialization (config train.seed; default: the recipe's)")
    if not bench:
        p.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def bundled_configs() -> list[str]:
    try:
        return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))
    except OSError:
        return []


def config_path(name: str) -> str:
    if os.path.exists(name) or name.endswith(".json") or os.sep in name:
        return name
    return os.path.join(CONFIG_DIR, name + ".json")


def parse_overrides(extra: list[str]) -> dict[str, str]:
    """['--optim.muon.lr', '0.02', '--model.smear=false'] -> {'optim.muon.lr': '0.02', 'model.smear': 'false'}"""
    out, i = {}, 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"unrecognized argument '{arg}' (config overrides look like --section.field VALUE)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra):
                raise ConfigError(f"config override '{arg}' needs a value")
            key, value = arg[2:], extra[i + 1]
            i += 2
        out[key.replace("-", "_")] = value
    return out


def build_config(args) -> Config:
    resume = getattr(args, "resume", None)
    if resume and args.config is None:
        # a resumed run keeps its own recipe, overrides included (the trainer refuses changes to it)
        from speedrun.train.checkpoint import find_checkpoint, model_config, read_meta
        ckpt = find_checkpoint(resume)
        cfg = model_config(ckpt, read_meta(ckpt))
    else:
        cfg = Config.load(config_path(args.config or DEFAULT_CONFIG))
    cfg.override(parse_overrides(getattr(args, "overrides", [])))
    if args.cuda and args.cpu:
        raise ConfigError("--cuda and --cpu contradict each other")
    if args.cuda:
        cfg.train.device = "cuda"
    if args.cpu:
        cfg.train.device = "cpu"
    if args.data_path:
        cfg.data.train_path = args.data_path
    if args.val_data_path:
        cfg.data.val_path = args.val_data_path
    if args.save_path:
        cfg.train.save_path = args.save_path
    elif resume:
        cfg.train.save_path = _run_dir_of(resume)   # the saved path may be relative to another folder
    if getattr(args, "save_every", None) is not None:
        cfg.train.save_every = args.save_every
    if args.use_fp8 and args.no_fp8:
        raise ConfigError("--use-fp8 and --no-fp8 contradict each other")
    if args.use_fp8:
        cfg.model.fp8_head = True
    if args.no_fp8:   # no FP8 anywhere: the head and record 89's MLP (model.fp8_mlp false alone is
        cfg.model.fp8_head = False   # the public record's DISABLE_FP8, whose head stays FP8)
        cfg.model.fp8_mlp = False
    if args.use_flash_attn:
        cfg.model.attention_backend = "flash"
    if args.memory_pool:
        cfg.train.memory_pool = True
    if args.micro_batch_tokens:
        cfg.train.sequence_tokens = args.micro_batch_tokens
        cfg.train.micro_batches_per_step = 0   # a fixed micro-batch, whatever the stage's batch
    if args.no_compile:
        cfg.train.compile = False
    if args.seed is not None:
        cfg.train.seed = args.seed
    return cfg.validate()


def run_train(args) -> int:
    cfg = build_config(args)
    if args.print_config:
        import json
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if cfg.train.memory_pool:
        # must be set before the first CUDA allocation (and is inherited by launched workers)
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from speedrun.distributed import launch_env
    launch = launch_env()
    wants_workers = args.distributed or (args.num_gpus or 1) > 1
    if wants_workers and launch.source == "slurm" and launch.world_size > 1:
        raise ConfigError(f"--distributed/--num-gpus start local workers, but srun already started "
                          f"{launch.world_size} tasks, each one rank: drop those flags (one srun task "
                          f"per GPU), or run one task per node that starts torchrun")
    if wants_workers and launch.source == "none":
        return launch_workers(args, cfg)
    return train_here(args, cfg)


def _default_run_dir() -> str:
    """runs/<date>-<time>, with a suffix if a run started in the same second already has that name."""
    base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def launch_workers(args, cfg: Config) -> int:
    """Re-run this command in N local processes through torch.distributed.run (torchrun's code)."""
    import torch
    from torch.distributed.run import parse_args as torchrun_args
    from torch.distributed.run import run as torchrun
    on_cpu = cfg.train.device == "cpu"
    available = 0 if on_cpu else torch.cuda.device_count()
    n = args.num_gpus or available
    if n < 1:
        raise ConfigError("--distributed: no CUDA GPU is visible; pass --cpu --num-gpus N for CPU workers")
    if not on_cpu and n > available:
        raise ConfigError(f"--num-gpus {n}: only {available} CUDA GPU(s) are visible")
    cfg.grad_accum(n)  # fails early with a clear message if the world size does not divide the batch
    if cfg.train.save_path:   # one clear error here rather than one per worker
        check_run_dir(cfg.train.save_path, args.resume, args.overwrite)
        probe_writable(cfg.train.save_path)
    full = list(getattr(args, "_argv", sys.argv[1:]))
    argv = _strip_launch_flags(full[full.index("train") + 1:])
    if not cfg.train.save_path and not args.resume:
        # every worker must write into the same run directory, so fix its name here
        argv += ["--save-path", _default_run_dir()]
    if on_cpu and "--cpu" not in argv:
        argv.append("--cpu")
    launch = ["--standalone", f"--nproc_per_node={n}", "--module", "speedrun", "train", *argv]
    torchrun(torchrun_args(launch))
    return 0


def _run_dir_of(resume: str) -> str:
    """A resumed run keeps writing into its run directory, also when a checkpoint dir was given."""
    run_dir = _resumed_run_dir(resume)
    if run_dir is None:
        raise RunDirError(f"--resume {resume}: this checkpoint is not inside a run directory "
                          f"(<run>/checkpoints/step_*); give --save-path for the continued run")
    return run_dir


def _resumed_run_dir(resume: str) -> str | None:
    from speedrun.train.checkpoint import find_checkpoint, run_dir_of
    return run_dir_of(find_checkpoint(resume))


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message says what to do instead."""
    user_error = True


# what a run writes into its directory: a directory holding any of them holds a run
RUN_OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "loss_curve.png", "checkpoints")


def run_outputs(run_dir: str) -> list[str]:
    return [name for name in RUN_OUTPUTS if os.path.lexists(os.path.join(run_dir, name))]


def check_run_dir(run_dir: str, resume: str | None, overwrite: bool) -> bool:
    """A new run never writes into another run: an existing run is continued (--resume), or
    replaced only when asked (--overwrite). Other files in the directory are left alone. Returns
    whether this run continues the run in ``run_dir`` (then a failed start leaves it as it was)."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"--save-path {run_dir}: is a file, expected a run directory")
    continuing = resume is not None and _same_dir(_resumed_run_dir(resume), run_dir)
    if continuing:
        if overwrite:
            raise RunDirError(f"--overwrite with --resume {resume}: that would delete the run being "
                              f"continued; leave out --overwrite")
        return True
    found = run_outputs(run_dir)
    if found and not overwrite:
        raise RunDirError(f"--save-path {run_dir}: already holds a run ({', '.join(found)}); continue it "
                          f"with --resume {run_dir}, or start fresh with a new --save-path or with "
                          f"--overwrite (deletes that run)")
    if found and resume is not None and _inside(resume, run_dir):
        raise RunDirError(f"--overwrite: --resume {resume} is inside {run_dir}, which --overwrite would delete")
    return False


def _same_dir(a: str | None, b: str) -> bool:
    return a is not None and os.path.realpath(a) == os.path.realpath(b)


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory + os.sep)


def clear_run(run_dir: str) -> None:
    """--overwrite: delete the run outputs of ``run_dir`` (nothing else in it)."""
    import shutil
    for name in run_outputs(run_dir):
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def discard_failed_start(run_dir: str, made: list[str]) -> None:
    """A run that failed before its first optimizer step leaves nothing behind: the outputs it wrote
    (config.json, an empty metrics file) go, and so do the folders this run made (``made``, from
    ``missing_parents`` before the run) once empty. A run that trained (a metrics record of a step,
    or a checkpoint) is kept whatever happened."""
    if not os.path.isdir(run_dir) or os.path.exists(os.path.join(run_dir, "checkpoints")):
        return
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            if any('"train_loss"' in line for line in f):
                return
    except OSError:
        pass
    for name in run_outputs(run_dir):
        try:
            os.unlink(os.path.join(run_dir, name))
        except OSError:
            return
    for directory in made:
        try:
            os.rmdir(directory)
        except OSError:
            return


def _strip_launch_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--distributed":
            continue
        if a == "--num-gpus":
            skip = True
            continue
        if a.startswith("--num-gpus="):
            continue
        out.append(a)
    return out


def train_here(args, cfg: Config) -> int:
    from speedrun.distributed import check_shared_dir, destroy_world, init_world, is_peer_failure
    from speedrun.kernels.fp8 import fp8_supported
    from speedrun.train.trainer import Trainer, resolve_device
    device = resolve_device(cfg)
    world = init_world(device, cfg.train.collective_timeout_s)
    run_dir, peer_lost = None, False
    try:
        if args.use_fp8 and not fp8_supported(world.device.type, world.device.index):
            raise ConfigError(f"--use-fp8 needs a CUDA GPU with FP8 matmuls (compute capability >= 8.9); "
                              f"this run is on {world.device}")
        run_dir = cfg.train.save_path or _default_run_dir()
        if not cfg.train.save_path:   # a timestamped name: rank 0's for all
            run_dir = world.broadcast_object(run_dir)
        check_shared_dir(world, run_dir)
        # every rank checks before any rank writes (the barrier), so all see the same directory;
        # one rank probes for writing (ranks creating and removing the same folder would race)
        continuing = check_run_dir(run_dir, args.resume, args.overwrite)
        if world.is_main:
            probe_writable(run_dir)
        made = missing_parents(run_dir)
        world.barrier()
        if args.overwrite and world.is_main:
            clear_run(run_dir)
        world.barrier()
        try:
            trainer = Trainer(cfg, world, run_dir, resume=args.resume)
            trainer.run()
        except BaseException:
            if world.is_main and not continuing:
                discard_failed_start(run_dir, made)
            raise
    except Exception as e:
        if not (world.distributed and is_peer_failure(e)):
            raise
        peer_lost = True
        raise _peer_lost(e, world, run_dir) from None
    finally:
        destroy_world(abort=peer_lost)
    return 0


def _peer_lost(e: Exception, world, run_dir: str | None) -> Exception:
    """The one-line error of a rank whose collective failed: why, which knob bounds the wait, and
    where the run can be resumed from (the newest checkpoint that all ranks completed)."""
    from speedrun.distributed import PeerLostError, short_reason
    from speedrun.train.checkpoint import CheckpointError, find_checkpoint
    resume = ""
    if run_dir:
        try:
            resume = f"; resume from {find_checkpoint(run_dir)} with --resume {run_dir}"
        except CheckpointError:
            resume = f"; {run_dir} has no complete checkpoint yet"
    return PeerLostError(f"rank {world.rank} of {world.world_size}: lost the other ranks "
                         f"({short_reason(e)}): one of them died or hangs (waits are bounded by "
                         f"train.collective_timeout_s = {world.timeout_s:g} s){resume}")
