"""The training job for real at tiny scale: Ray Train TorchTrainer, 2 CPU workers, FSDP2 over a 4-bit base."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jsonextract.config import core as C
from jsonextract.config.train import TrainConfig
from jsonextract.training import job as train_job
from conftest import JSONEXTRACT, SNIPS


def tiny_cfg(tiny_model: Path, tmp: Path, name: str, **over) -> TrainConfig:
    base = [f"model.name={tiny_model}", "model.quantization=nf4", "model.max_length=160",
            f"data.train_file={SNIPS / 'train.jsonl'}", f"data.dev_file={SNIPS / 'dev.jsonl'}",
            "data.max_train_records=400", "optim.batch_size=8", "optim.max_steps=6", "optim.warmup_steps=1",
            "optim.lr=3e-3", "eval.every_steps=0", "eval.loss_examples=16", "eval.decode_samples=4",
            "eval.calibration_records=0", "decoding.max_new_tokens=24", "lora.r=8", "lora.alpha=16",
            "lora.dropout=0.0", "lora.target_modules=[q_proj,v_proj,lm_head]",
            f"run.name={name}", f"run.storage_path={tmp / 'runs'}", f"run.output_dir={tmp / 'out' / name}",
            "run.checkpoint_every_steps=2", "run.log_every_steps=1", "run.keep_checkpoints=2"]
    return C.load(TrainConfig, None, base + [f"{k}={v}" for k, v in over.items()])


def run_fit(cfg: TrainConfig):
    cfg = train_job.absolute_paths(cfg)
    return Path(cfg.run.output_dir), train_job.fit_to(cfg, cfg.run.output_dir)


def history(adapter: Path) -> list[dict]:
    return json.loads((adapter / "history.json").read_text())


def test_fsdp2_qlora_two_workers_trains_only_lora(ray_session, tiny_model, tmp_path):
    from peft import PeftModel
    from jsonextract.models.loading import attach_lora, load_base

    cfg = tiny_cfg(tiny_model, tmp_path, "fsdp2")
    out, metrics = run_fit(cfg)
    assert metrics["step"] == 6 and "dev_loss" in metrics and "dev_f1" in metrics

    # loss falls over the run
    losses = [h["loss"] for h in history(out) if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]

    # only adapter files: no base weights, far smaller than the base
    for ck in [p for p in (tmp_path / "runs" / "fsdp2").glob("checkpoint_*") if p.is_dir()]:
        names = {p.name for p in ck.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "manifest.json", "trainer_state.pt"} <= names
        assert "model.safetensors" not in names
    base_bytes = (tiny_model / "model.safetensors").stat().st_size
    assert (out / "adapter_model.safetensors").stat().st_size < base_bytes / 4

    # LoRA parameters changed from their (seeded) initial values; base parameters are the untouched base
    fresh = load_base(cfg.model)
    torch.manual_seed(cfg.optim.seed)
    init = dict(attach_lora(load_base(cfg.model), cfg.lora).named_parameters())
    trained = PeftModel.from_pretrained(load_base(C.ModelConfig(name=str(tiny_model))), str(out))
    lora = {n: p for n, p in trained.named_parameters() if "lora_" in n}
    assert lora and all(not torch.allclose(p, init[n].to(p.dtype)) for n, p in lora.items() if "lora_B" in n)
    base_now = dict(trained.get_base_model().named_parameters())
    for n, p in fresh.named_parameters():
        key = n.replace("q_proj.weight", "q_proj.base_layer.weight").replace("v_proj.weight", "v_proj.base_layer.weight")
        if key in base_now and "embed" in n:
            assert torch.equal(p, base_now[key])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompt_version"] and manifest["schema"]["properties"]["intent"]
    assert manifest["config"]["model"]["quantization"] == "nf4"


def test_resume_continues_at_step_k(ray_session, tiny_model, tmp_path):
    out, m1 = run_fit(tiny_cfg(tiny_model, tmp_path, "resume", **{"optim.max_steps": 4}))
    assert m1["step"] == 4
    out, m2 = run_fit(tiny_cfg(tiny_model, tmp_path, "resume", **{"optim.max_steps": 8}))
    h = history(out)
    assert {"event": "resume", "step": 4} in h
    steps = [e["step"] for e in h if "loss" in e]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # no step trained twice
    assert m2["step"] == 8


def test_worker_failure_resumes_from_last_checkpoint(ray_session, tiny_model, tmp_path):
    out, m = run_fit(tiny_cfg(tiny_model, tmp_path, "fault", **{"run.fail_at_step": 3, "run.max_failures": 1}))
    assert m["step"] == 6
    assert {"event": "resume", "step": 2} in history(out)


def test_single_process_without_ray(tiny_model, tmp_path):
    out, m = run_fit(tiny_cfg(tiny_model, tmp_path, "local", **{"run.use_ray": False, "optim.max_steps": 3}))
    assert m["step"] == 3 and (out / "adapter_model.safetensors").is_file()


def _train_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([JSONEXTRACT, "train", *args], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.parametrize("args,expect", [
    (["optim.lr=fast"], "optim.lr"),
    (["optim.learning_rate=1"], "optim.learning_rate"),
    (["model.name=/nope/model"], "model path not found"),
    (["--config", "configs/train/missing.yaml"], "config file not found"),
])
def test_bad_config_is_clear_error(args, expect):
    r = _train_cli(*args)
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr


def test_malformed_training_file_names_file_and_line(tiny_model, tmp_path):
    bad = tmp_path / "train.jsonl"
    lines = (SNIPS / "train.jsonl").read_text().splitlines()[:5]
    bad.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:] + ['{"id": "x", "target": {}}']) + "\n")
    r = _train_cli(f"model.name={tiny_model}", f"data.train_file={bad}", f"data.schema_file={SNIPS / 'schema.json'}")
    assert r.returncode == 2 and f"{bad}:3" in r.stderr and "skip_bad_records" in r.stderr
    ok = subprocess.run([sys.executable, "-c", f"""
from jsonextract.training.batches import check_records
good, skipped = check_records({str(bad)!r}, True)
print(len(good), skipped)"""], capture_output=True, text=True, timeout=60)
    assert ok.stdout.split() == ["5", "2"]


@pytest.mark.gpu
def test_qlora_fsdp2_on_cuda(tiny_model, tmp_path):
    out, m = run_fit(tiny_cfg(tiny_model, tmp_path, "gpu", **{"run.use_gpu": True, "run.num_workers": 1,
                                                            "optim.max_steps": 2, "model.dtype": "bfloat16",
                                                            "run.use_ray": False}))
    assert m["step"] == 2


@pytest.mark.gpu
def test_ray_train_job_on_cuda(ray_session, tiny_model, tmp_path):
    """The job's GPU path under Ray: TorchTrainer with a GPU worker (NCCL), FSDP2 over a bitsandbytes 4-bit base
    with bf16 compute and storage, evaluation mid-run; the adapter it writes has trained LoRA weights, and the
    batch job's replica runs it on the GPU."""
    import math
    from safetensors.torch import load_file
    from jsonextract.batch.replica import ExtractActor
    from jsonextract.config.extract import ExtractConfig

    out, m = run_fit(tiny_cfg(tiny_model, tmp_path, "gpu-ray", **{
        "run.use_gpu": True, "run.num_workers": 1, "optim.max_steps": 4, "model.dtype": "bfloat16",
        "eval.every_steps": 2}))
    assert m["step"] == 4 and math.isfinite(m["dev_loss"])
    lora_b = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # PEFT starts B at zero: all were trained
    cfg = C.load(ExtractConfig, None, [f"adapter={out}", "pool.gpus_per_actor=1", "decoding.max_new_tokens=24"])
    actor = ExtractActor(cfg, None)
    assert actor.extractor.model.device.type == "cuda"


def _losses(adapter: Path) -> list[float]:
    return [h["loss"] for h in history(adapter) if "loss" in h]


def test_in_run_evaluation_does_not_change_training(ray_session, tiny_model, tmp_path):
    """Evaluating mid-run must leave the sharded model exactly as it was: the per-step train losses of a run that
    evaluates at every second step equal those of the same run that evaluates only at the end. (On CPUs with
    AVX512-BF16, bitsandbytes repacks 4-bit weights in place on an eval-mode forward; under FSDP2 that corrupted
    the all-gathered weights and every step after the first evaluation.)"""
    common = {"optim.max_steps": 6, "run.checkpoint_every_steps": 0}
    with_eval, _ = run_fit(tiny_cfg(tiny_model, tmp_path, "with-eval", **common, **{"eval.every_steps": 2}))
    without, _ = run_fit(tiny_cfg(tiny_model, tmp_path, "without-eval", **common, **{"eval.every_steps": 0}))
    evals = [h for h in history(with_eval) if "dev_loss" in h]
    assert [h["step"] for h in evals] == [2, 4, 6]
    assert _losses(with_eval) == pytest.approx(_losses(without), rel=1e-6, abs=1e-6)


def test_whole_frozen_base_on_every_rank_trains_as_the_sharded_one(ray_session, tiny_model, tmp_path):
    """parallel.shard_frozen=false (every rank keeps the whole frozen 4-bit base; FSDP2 wraps the root alone and
    shards only the LoRA weights, the output head's included) trains the same model as the default, where the
    frozen base is sharded too, layer by layer: the same step losses."""
    common = {"optim.max_steps": 4, "run.checkpoint_every_steps": 0, "eval.decode_samples": 0}
    sharded, _ = run_fit(tiny_cfg(tiny_model, tmp_path, "sharded", **common))
    whole, _ = run_fit(tiny_cfg(tiny_model, tmp_path, "whole", **common, **{"parallel.shard_frozen": "false"}))
    assert len(_losses(whole)) == 4
    assert _losses(whole) == pytest.approx(_losses(sharded), rel=1e-5, abs=1e-6)


def test_reported_dev_loss_equals_the_written_adapters(ray_session, tiny_model, tmp_path):
    """The dev loss the 2-worker FSDP2 job reports is the dev loss of the adapter it wrote, computed again in one
    process on the same dev examples."""
    from peft import PeftModel
    from jsonextract.models.loading import keep_4bit_layout, load_base, load_tokenizer
    from jsonextract.data.prompt import PromptBuilder
    from jsonextract.data.schema import load_schema
    from jsonextract.training.dev_eval import dev_examples, mean_loss
    from jsonextract.training.batches import check_records, tokenize

    cfg = tiny_cfg(tiny_model, tmp_path, "devloss", **{"eval.every_steps": 3, "eval.loss_examples": 40})
    out, metrics = run_fit(cfg)
    tok = load_tokenizer(str(tiny_model))
    prompt = PromptBuilder(cfg.prompt, load_schema(SNIPS / "schema.json"))
    dev = tokenize(check_records(cfg.data.dev_file, True)[0], prompt, tok, cfg.model.max_length)[0]
    model = PeftModel.from_pretrained(load_base(cfg.model), str(out))
    assert keep_4bit_layout(model) > 0  # the kernel path the job evaluates with, on every CPU
    again = mean_loss(model, dev_examples(dev, cfg.eval), cfg.optim.batch_size, tok.pad_token_id)
    assert metrics["dev_loss"] == pytest.approx(again, rel=1e-3)


def test_4bit_kernel_paths_agree_and_training_never_repacks(tiny_model):
    """Both bitsandbytes CPU paths, where this CPU has both: a pinned model (keep_4bit_layout) never repacks, even
    in eval mode; on CPUs with AVX512-BF16 an unpinned eval-mode model repacks (the fast inference kernel) and
    gives the same loss within bf16 rounding of the block scales."""
    from bitsandbytes.functional import has_avx512bf16
    from jsonextract.models.loading import keep_4bit_layout, load_base, load_tokenizer
    from jsonextract.data.prompt import PromptBuilder
    from jsonextract.data.schema import load_schema
    from jsonextract.training.dev_eval import mean_loss
    from jsonextract.training.batches import check_records, tokenize

    mcfg = C.ModelConfig(name=str(tiny_model), quantization="nf4", max_length=160)
    tok = load_tokenizer(str(tiny_model))
    prompt = PromptBuilder(C.PromptConfig(), load_schema(SNIPS / "schema.json"))
    dev = tokenize(check_records(str(SNIPS / "dev.jsonl"), True, 24)[0], prompt, tok, 160)[0]

    def repacked(model) -> bool:
        return any(getattr(getattr(p, "quant_state", None), "packing_format_for_cpu", False)
                   for p in model.parameters())

    pinned = load_base(mcfg)
    keep_4bit_layout(pinned)
    training_path = mean_loss(pinned, dev, 8, tok.pad_token_id)
    assert not repacked(pinned)
    assert mean_loss(pinned, dev, 8, tok.pad_token_id) == training_path  # nothing changed in place
    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes has only the canonical 4-bit path here")
    free = load_base(mcfg)
    inference_path = mean_loss(free, dev, 8, tok.pad_token_id)
    assert repacked(free)
    assert inference_path == pytest.approx(training_path, rel=1e-2)


def test_answer_only_logits_give_the_full_loss_and_bf16_autocast_tracks_fp32(tiny_model):
    """answer_loss (lm_head only on answer positions) is the model's own full-logit loss; the bf16 autocast path
    (where the CPU has native bf16) stays within bf16 rounding of it."""
    from jsonextract.data.records import pad_batch
    from jsonextract.models.loading import attach_lora, load_base, load_tokenizer
    from jsonextract.data.prompt import PromptBuilder
    from jsonextract.data.schema import load_schema
    from jsonextract.training.distributed import Worker
    from jsonextract.training.batches import check_records, tokenize
    from jsonextract.hardware import fast_bf16
    from jsonextract.training.recipe import agree_on_autocast, answer_loss, autocast

    cfg = tiny_cfg(tiny_model, Path("/tmp"), "loss")
    tok = load_tokenizer(str(tiny_model))
    prompt = PromptBuilder(cfg.prompt, load_schema(SNIPS / "schema.json"))
    ex = tokenize(check_records(str(SNIPS / "train.jsonl"), False, 12)[0], prompt, tok, 160)[0]
    batch = pad_batch(ex, tok.pad_token_id)
    torch.manual_seed(0)
    model = attach_lora(load_base(cfg.model), cfg.lora)
    full = float(model(**batch).loss)
    assert float(answer_loss(model, batch)) == pytest.approx(full, rel=1e-5)
    cpu = Worker(0, 1, 0, torch.device("cpu"), False, "here")
    off = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, cpu_autocast="off"))
    assert not agree_on_autocast(off, cpu)
    with autocast(False):
        assert float(answer_loss(model, batch)) == pytest.approx(full, rel=1e-5)
    if not fast_bf16():
        pytest.skip("bf16 products are not faster than fp32 on this CPU: cpu_autocast=auto trains in fp32 here")
    assert agree_on_autocast(cfg, cpu)  # auto, on a CPU where bf16 products are measured faster
    with autocast(True):
        assert float(answer_loss(model, batch)) == pytest.approx(full, rel=2e-2)


def test_tokenised_data_is_cached_once_and_keyed_by_what_it_depends_on(tiny_model, tmp_path):
    """The cache holds exactly what tokenising gives; it is written once, read after; a change of prompt or
    file content is a new entry, never a stale one."""
    from jsonextract.models.loading import load_tokenizer
    from jsonextract.data.prompt import PromptBuilder
    from jsonextract.data.schema import load_schema
    from jsonextract.training.batches import check_records, load_tokenized, tokenize

    tok = load_tokenizer(str(tiny_model))
    schema = load_schema(SNIPS / "schema.json")
    prompt = PromptBuilder(C.PromptConfig(), schema)
    data = tmp_path / "train.jsonl"
    data.write_text("".join((SNIPS / "train.jsonl").read_text().splitlines(True)[:30]))
    cache = tmp_path / "cache"
    args = (str(data), prompt, tok, 160, False, 0, str(cache))
    with pytest.raises(RuntimeError, match="not written"):
        load_tokenized(*args, builder=False)  # a non-builder never tokenises on its own
    built = load_tokenized(*args, builder=True)
    read = load_tokenized(*args, builder=False)
    direct = tokenize(check_records(str(data), False)[0], prompt, tok, 160)[0]
    assert built.examples == read.examples == direct and len(direct) == 30
    assert len(list(cache.iterdir())) == 1

    other_prompt = PromptBuilder(C.PromptConfig(instruction="Give JSON."), schema)
    assert load_tokenized(str(data), other_prompt, tok, 160, False, 0, str(cache), builder=True).examples != direct
    data.write_text("".join((SNIPS / "train.jsonl").read_text().splitlines(True)[:20]))
    assert len(load_tokenized(*args, builder=True).examples) == 20
    assert len(list(cache.iterdir())) == 3


def test_length_grouped_steps_cover_the_epoch_once_pad_less_and_plain_shuffle_is_the_previous_order():
    import random
    from jsonextract.training.batches import epoch_order

    rng = random.Random(1)
    lengths = [rng.randint(20, 120) for _ in range(1000)]
    plain = epoch_order(lengths, 32, 0, 7)
    expected = list(range(1000))
    random.Random(7).shuffle(expected)
    assert plain == expected  # data.length_group_steps=0: the order the job had before grouping
    grouped = epoch_order(lengths, 32, 8, 7)
    assert sorted(grouped) == list(range(1000)) and grouped != plain

    def padding(order):  # positions a step pads to its longest example, over the epoch's whole steps
        steps = [order[i:i + 32] for i in range(0, 992, 32)]
        return sum(max(lengths[j] for j in s) * len(s) - sum(lengths[j] for j in s) for s in steps)
    assert padding(grouped) < padding(plain) / 4
    # which lengths come when stays random: the steps of one group are not in length order
    firsts = [max(lengths[j] for j in grouped[i:i + 32]) for i in range(0, 256, 32)]
    assert firsts != sorted(firsts)


def lora_4bit_model(tiny_model: Path, dropout: float, device: str = "cpu", dtype: str = "float32"):
    """The tiny model, 4-bit, LoRA on its 7 projections with B drawn at random (a trained adapter: the LoRA branch
    and A's gradient are not zero), and a batch of 12 SNIPS training examples."""
    from jsonextract.data.prompt import PromptBuilder
    from jsonextract.data.records import pad_batch
    from jsonextract.data.schema import load_schema
    from jsonextract.models.loading import attach_lora, load_base, load_tokenizer
    from jsonextract.training.batches import check_records, tokenize

    cfg = tiny_cfg(tiny_model, Path("/tmp"), "lora4", **{"lora.dropout": dropout, "model.dtype": dtype,
                   "lora.target_modules": "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"})
    tok = load_tokenizer(str(tiny_model))
    prompt = PromptBuilder(cfg.prompt, load_schema(SNIPS / "schema.json"))
    batch = pad_batch(tokenize(check_records(str(SNIPS / "train.jsonl"), False, 12)[0], prompt, tok, 160)[0],
                      tok.pad_token_id)
    torch.manual_seed(0)
    model = attach_lora(load_base(cfg.model, device), cfg.lora)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return model, {k: v.to(device) for k, v in batch.items()}


def loss_and_grads(model, batch, bf16: bool = False):
    from jsonextract.training.loss import answer_loss
    from jsonextract.training.recipe import autocast

    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks: the same random draws in the same order
    with autocast(bf16):
        loss = answer_loss(model, batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def grad_distance(g, ref) -> float:
    return max(float((g[n] - ref[n]).float().norm() / ref[n].float().norm()) for n in ref)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_4bit_layers_give_peft_layers_loss_and_gradients(tiny_model, dropout):
    """parallel.lora_kernel=fused computes what peft's LoRA layers over the 4-bit base compute: in fp32 the same
    loss and LoRA gradients (dropout included); under bf16 autocast the same within bf16 rounding. The swapped
    layers are still peft's type."""
    from peft.tuners.lora.bnb import Linear4bit

    from jsonextract.training.lora_4bit import FusedLoraLinear4bit, fuse_lora_4bit

    model, batch = lora_4bit_model(tiny_model, dropout)
    peft32, peft16 = loss_and_grads(model, batch), loss_and_grads(model, batch, bf16=True)
    assert fuse_lora_4bit(model) == 7 * len(model.base_model.model.model.layers)
    assert all(isinstance(m, Linear4bit) for m in model.modules() if isinstance(m, FusedLoraLinear4bit))
    fused32, fused16 = loss_and_grads(model, batch), loss_and_grads(model, batch, bf16=True)
    assert fused32[0] == pytest.approx(peft32[0], rel=1e-6)
    for n in peft32[1]:
        assert torch.allclose(fused32[1][n], peft32[1][n], rtol=1e-4, atol=1e-7), n
        assert fused32[1][n].abs().sum() > 0, n
    # bf16: both differ from fp32 by bf16 rounding; the fused path by no more than about what peft's does
    assert fused16[0] == pytest.approx(peft32[0], rel=2e-2)
    assert grad_distance(fused16[1], peft32[1]) < max(3 * grad_distance(peft16[1], peft32[1]), 0.05)


@pytest.mark.gpu
def test_fused_lora_4bit_layers_on_cuda_give_peft_layers_loss_and_gradients(tiny_model):
    """The GPU configs' path: bf16 weights on CUDA (no autocast), bitsandbytes' CUDA kernels; fused and peft's
    layers agree within bf16 rounding."""
    from jsonextract.training.lora_4bit import fuse_lora_4bit

    model, batch = lora_4bit_model(tiny_model, 0.05, "cuda", "bfloat16")
    peft = loss_and_grads(model, batch)
    assert fuse_lora_4bit(model) > 0
    fused = loss_and_grads(model, batch)
    assert fused[0] == pytest.approx(peft[0], rel=2e-2)
    assert grad_distance(fused[1], peft[1]) < 0.1


def test_fused_answer_loss_is_the_models_own_loss_with_the_same_gradients(tiny_model):
    """optim.loss=fused (hidden states -> answer tokens only, one pass) gives the loss and LoRA gradients of the
    model's own full-logit loss; the bf16 autocast path stays within bf16 rounding."""
    from jsonextract.data.records import pad_batch
    from jsonextract.training.loss import answer_loss, frozen_linear
    from jsonextract.models.loading import attach_lora, load_base, load_tokenizer
    from jsonextract.data.prompt import PromptBuilder
    from jsonextract.data.schema import load_schema
    from jsonextract.training.batches import check_records, tokenize

    cfg = tiny_cfg(tiny_model, Path("/tmp"), "fused", **{"lora.target_modules": "[q_proj,v_proj]"})
    tok = load_tokenizer(str(tiny_model))
    prompt = PromptBuilder(cfg.prompt, load_schema(SNIPS / "schema.json"))
    batch = pad_batch(tokenize(check_records(str(SNIPS / "train.jsonl"), False, 12)[0], prompt, tok, 160)[0],
                      tok.pad_token_id)
    torch.manual_seed(0)
    model = attach_lora(load_base(cfg.model), cfg.lora)
    assert frozen_linear(model.get_output_embeddings())

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full, g_full = grads(lambda: model(**batch).loss)
    fused, g_fused = grads(lambda: answer_loss(model, batch, fused=True))
    assert fused == pytest.approx(full, rel=1e-5)
    for n in g_full:
        assert torch.allclose(g_fused[n], g_full[n], rtol=1e-4, atol=1e-6), n
    assert model.get_output_embeddings().forward.__self__ is model.get_output_embeddings()  # the head is itself again
