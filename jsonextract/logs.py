"""A quiet, useful log: the libraries' messages that need no action are silenced at their source, in every process
a job starts; the job's own lines (one per step, progress with rates and ETA) stay. `jsonextract --verbose ...`
(JSONEXTRACT_VERBOSE=1) keeps everything.

What is silenced, and why each needs no action:
- weight-loading and conversion progress bars (transformers, huggingface_hub, tqdm): the jobs print one line per
  loaded model;
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" on AVX512-BF16 CPUs: it tries a
  kernel from the Hugging Face kernel hub, which an offline or untrusted machine cannot use, and falls back to its
  own CPU kernel, the path this project runs and measures everywhere;
- transformers' FutureWarning that PEFT's `is_gradient_checkpointing` check is deprecated (PEFT calls it, not us);
- transformers' note that dequantised NF4 modules are cast to the model's dtype (the inference path asks for it);
- Ray Data's INFO lines (execution plan, execution finished, sink finished), its warning that the progress
  bars are off (the batch job prints its own progress line instead), and its high-memory heuristic, which asks
  for a per-replica memory reservation every 30 s;
- Ray's start-up INFO lines and Ray Train's INFO lines (resources requested, worker group started, every result
  reported, every checkpoint created): the jobs print their own step, evaluation and checkpoint lines; warnings
  and errors from Ray stay.
"""
from __future__ import annotations

import logging
import os
import warnings

from jsonextract.lazy import lazy

ray = lazy("ray", "ray.data")

VERBOSE = "JSONEXTRACT_VERBOSE"

# Set in this process and inherited by every process it starts (Ray workers, replicas, the pipeline's steps).
# TQDM_DISABLE is read when tqdm is imported: it reaches bars that no library switch controls, such as transformers'
# GGUF conversion in prepare-base.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def clock(seconds: float) -> str:
    """`M:SS` for a progress line's ETA; rounded to whole seconds first, so 59.7 s reads 1:00, not 0:60."""
    minutes, secs = divmod(round(max(seconds, 0.0)), 60)
    return f"{minutes}:{secs:02d}"


def verbose() -> bool:
    return os.environ.get(VERBOSE, "") not in ("", "0")


def detail(message: str) -> None:
    """A line for --verbose only: what a process decided on its own (repeated by every replica that loads a model)."""
    if verbose():
        print(message, flush=True)


def quiet_libraries() -> None:
    """Silence, in this process, what the module docstring lists (no-op with --verbose). Called where a job starts
    and where a model is loaded, so Ray workers, which import that code, are quiet too."""
    if verbose():
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("transformers.integrations.bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def quiet_train_worker() -> None:
    """In a Ray Train worker: its "Reporting training result N: TrainingReport(...)" line per report and rank comes
    from a logger named by its file path, which RunConfig's log level does not reach."""
    if verbose():
        return
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: nothing to quiet, or a different place
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def quiet_ray_data() -> None:
    """In the batch job's driver, after Ray Data has configured its loggers; its progress bars off."""
    ray.data.DataContext.get_current().enable_progress_bars = verbose()
    if verbose():
        return
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Ray Data's memory heuristic asks for a `memory=` reservation per replica (a model's size, every 30 s); the
    # pool is sized by CPUs and replicas, which the job's settings already bound. Its other detectors stay.
    ray.data.DataContext.get_current().issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def library_log_level() -> str:
    """The level of the libraries' own log lines that the jobs pass on (Ray Train's RunConfig)."""
    return "INFO" if verbose() else "WARNING"


def ray_init_options() -> dict:
    """Keyword arguments for `ray.init` in the jobs: Ray's own INFO lines only with --verbose."""
    if verbose():
        return {}
    return {"logging_level": logging.WARNING, "logging_config": ray.LoggingConfig(log_level=library_log_level())}
