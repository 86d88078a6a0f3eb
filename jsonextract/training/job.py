"""Fine-tune a causal LM with LoRA/QLoRA, sharded by FSDP2, inside Ray Train's TorchTrainer.

    jsonextract train --config configs/train/snips_cpu.yaml [key=value ...]   # starts (or joins) a local Ray
    jsonextract train --config configs/train/snips_cpu.yaml run.use_ray=false  # one process, no Ray
    ray job submit --working-dir . -- python rayjobs/train.py --config configs/train/snips_cpu.yaml [key=value ...]

Running again with the same run.name and run.storage_path resumes from the latest checkpoint. What each worker
runs is the Recipe in jsonextract/training/recipe.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from jsonextract.config.core import parse_args
from jsonextract.config.train import TrainConfig
from jsonextract.data.io import is_uri, put_folder, storage_env
from jsonextract.data.schema import load_schema
from jsonextract.lazy import lazy
from jsonextract.logs import library_log_level, ray_init_options
from jsonextract.models.loading import check_model_name
from jsonextract.training.batches import check_records, schema_path
from jsonextract.training.checkpoint import local_checkpoints
from jsonextract.training.recipe import train_loop_per_worker
from jsonextract.training.temperature import calibrate_adapter

ray = lazy("ray")
ray_torch = lazy("ray.train.torch")
ray_train = lazy("ray.train")


def preflight(cfg: TrainConfig) -> None:
    """Fail before any worker starts: bad model path, schema, or training file (file and line named)."""
    check_model_name(cfg.model.name)
    load_schema(schema_path(cfg))
    good, skipped = check_records(cfg.data.train_file, cfg.data.skip_bad_records, cfg.data.max_train_records)
    print(f"[train] {cfg.data.train_file}: {len(good)} usable records" + (f", {skipped} bad lines skipped" if skipped else ""))
    if cfg.data.dev_file:
        check_records(cfg.data.dev_file, True)


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Workers may start in another directory (Ray's working_dir): pass them absolute local paths."""
    def absol(p: str) -> str:
        return str(Path(p).resolve()) if p and "://" not in p and Path(p).exists() else p

    cache = cfg.data.cache_dir and str(Path(cfg.data.cache_dir).resolve())
    data = dataclasses.replace(cfg.data, train_file=absol(cfg.data.train_file), dev_file=absol(cfg.data.dev_file),
                               schema_file=absol(str(schema_path(cfg))), cache_dir=cache)
    storage = cfg.run.storage_path if "://" in cfg.run.storage_path else str(Path(cfg.run.storage_path).resolve())
    return dataclasses.replace(cfg, data=data, model=dataclasses.replace(cfg.model, name=absol(cfg.model.name)),
                               run=dataclasses.replace(cfg.run, storage_path=storage))


def fit_with_ray(cfg: TrainConfig):
    # How often Ray Train's controller polls the workers: a report waits for the next poll, and the CPU job's two
    # FSDP2 workers also trained slower at Ray's 2 s default (docs/experiments.md, "Ray's share of a training
    # job"). A value the user exported is kept, and handed to the workers of a local Ray as it is.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if not ray.is_initialized():
        env = {"TOKENIZERS_PARALLELISM": "false",
               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]} | storage_env()
        ray.init(runtime_env={"env_vars": env}, **ray_init_options())
    trainer = ray_torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg},
        torch_config=ray_torch.TorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo"),
        scaling_config=ray_train.ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker={"CPU": cfg.run.cpus_per_worker},
                                     placement_strategy=cfg.run.placement_strategy),
        run_config=ray_train.RunConfig(name=cfg.run.name, storage_path=cfg.run.storage_path,
                             checkpoint_config=ray_train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
                             failure_config=ray_train.FailureConfig(max_failures=cfg.run.max_failures),
                             logging_config=ray_train.LoggingConfig(log_level=library_log_level())),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return result.checkpoint.to_directory(tempfile.mkdtemp(prefix="final-checkpoint-")), result.metrics


def fit_locally(cfg: TrainConfig):
    train_loop_per_worker({"cfg": cfg})

    latest = local_checkpoints(Path(cfg.run.storage_path) / cfg.run.name)[-1]
    return str(latest), json.loads((latest / "manifest.json").read_text())["metrics"]


def save_output(ckpt_dir: str, out_dir: str | Path) -> None:
    """The final adapter for extract/serve: PEFT files + tokenizer + manifest (trainer state left out)."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(ckpt_dir, out, ignore=shutil.ignore_patterns("trainer_state.pt"))


def fit_to(cfg: TrainConfig, out_dir: str | Path) -> dict:
    """Train, write the final adapter to the local folder `out_dir`, and return the final metrics."""
    ckpt, metrics = fit_with_ray(cfg) if cfg.run.use_ray else fit_locally(cfg)
    save_output(ckpt, out_dir)
    if cfg.run.use_ray:
        shutil.rmtree(ckpt, ignore_errors=True)  # the temporary local copy of the stored final checkpoint
    return metrics


def main(argv: list[str]) -> int:
    cfg = parse_args(TrainConfig, argv, __doc__)
    preflight(cfg)
    cfg = absolute_paths(cfg)
    t0 = time.time()
    # The adapter is finished in a local folder (calibration writes its manifest), then copied where it belongs.
    local_out = Path(tempfile.mkdtemp(prefix="adapter-")) / "adapter" if is_uri(cfg.run.output_dir) else cfg.run.output_dir
    metrics = fit_to(cfg, local_out)
    if cfg.eval.calibration_records and cfg.data.dev_file:
        t1 = time.time()
        cal = calibrate_adapter(str(local_out), cfg.model, cfg.decoding, cfg.data.dev_file,
                                cfg.eval.calibration_records)
        if cal["values"]:
            print(f"[train] confidence temperature {cal['temperature']:g} fitted on the {cal['values']} values "
                  f"predicted for {cal['records']} dev records: NLL of their rightness {cal['dev_value_nll_at_1']:.4f} "
                  f"at 1 -> {cal['dev_value_nll']:.4f}, calibration error {cal['dev_ece_at_1']:.3f} -> "
                  f"{cal['dev_ece']:.3f} ({time.time() - t1:.0f}s)")
        else:
            print("[train] no dev record gave a valid output with values: confidence left uncalibrated")
    shown = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    print(f"[train] done in {time.time() - t0:.0f}s: {shown}")
    if is_uri(cfg.run.output_dir):
        put_folder(local_out, cfg.run.output_dir)
        shutil.rmtree(Path(local_out).parent, ignore_errors=True)
    print(f"[train] adapter written to {cfg.run.output_dir}")
    return 0

