from pathlib import Path

import pytest

from jsonextract.config import core as C
from conftest import JSONEXTRACT, ROOT


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("max_new_tokens: 10\nmax_new_tokenz: 3\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(C.DecodingConfig, p)
    assert "max_new_tokenz" in str(e.value) and str(p) in str(e.value)


def test_wrong_type_names_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("max_new_tokens: lots\n")
    with pytest.raises(C.ConfigError, match="max_new_tokens.*int"):
        C.load(C.DecodingConfig, p)
    with pytest.raises(C.ConfigError, match="quantization.*one of"):
        C.load(C.ModelConfig, None, ["quantization=int3"])


def test_overrides_nested_and_typed():
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Job:
        model: C.ModelConfig = field(default_factory=C.ModelConfig)
        lora: C.LoraSettings = field(default_factory=C.LoraSettings)

    job = C.load(Job, None, ["model.quantization=nf4", "lora.r=4", "lora.target_modules=[q_proj,v_proj]"])
    assert job.model.quantization == "nf4" and job.lora.r == 4
    assert job.lora.target_modules == ("q_proj", "v_proj")
    with pytest.raises(C.ConfigError, match="lora.rank"):
        C.load(Job, None, ["lora.rank=4"])
    with pytest.raises(C.ConfigError, match="key=value"):
        C.parse_overrides(["lora.r"])


def test_off_unquoted_is_the_option_named_off(tmp_path):
    # YAML reads a bare off as False; the Literal option spelled "off" is what the user meant
    assert C.load(C.DecodingConfig, None, ["grounding=off"]).grounding == "off"
    p = tmp_path / "c.yaml"
    p.write_text("grounding: off\n")
    assert C.load(C.DecodingConfig, p).grounding == "off"
    with pytest.raises(C.ConfigError, match="grounding.*one of"):  # no option named like true/on/yes
        C.load(C.DecodingConfig, None, ["grounding=on"])


def test_post_init_checks():
    with pytest.raises(C.ConfigError, match="multiple of 64"):
        C.TinyModelConfig(hidden_size=100)


def test_configs_pickle():
    import pickle
    cfg = C.load(C.LoraSettings, None, ["r=8"])
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def config_class_for(path: Path):
    """The dataclass each configs/<kind>/ folder holds."""
    kind = path.parent.name
    if kind == "tiny":
        return C.TinyModelConfig
    if kind == "train":
        from jsonextract.config.train import TrainConfig
        return TrainConfig
    if kind == "extract":
        from jsonextract.config.extract import ExtractConfig
        return ExtractConfig
    if kind == "serve":
        return "serve"  # Ray Serve's own format; our settings are each application's `args`
    if kind == "pipeline":
        from jsonextract.config.pipeline import PipelineConfig
        return PipelineConfig
    raise AssertionError(f"no config class for configs/{kind}/")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path):
    cls = config_class_for(path)
    if cls == "serve":
        import yaml
        from ray.serve.schema import ServeDeploySchema
        from jsonextract.config.serve import ServeConfig
        raw = yaml.safe_load(path.read_text())
        ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(raw)
        for app in raw["applications"]:
            C.build(ServeConfig, app["args"], source=f"{path} applications[{app['name']}].args")
    else:
        C.load(cls, path)


@pytest.mark.parametrize("command,key", [("train", "optim.lr (float"), ("extract", "pool.num_actors (int"),
                                         ("evaluate", "predictions (str"), ("run", "baseline_limit (int"),
                                         ("serve", "max_batch_size (int"), ("predict", "--adapter"),
                                         ("view", "--input"), ("prepare-base", "--out"), ("prepare-tiny", "--data")])
def test_every_command_answers_help_with_its_settings(command, key):
    import subprocess
    r = subprocess.run([JSONEXTRACT, command, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and key in r.stdout, r.stdout + r.stderr


def test_command_list_and_ray_launch_files():
    """`jsonextract --help` lists every command; the launch files for `ray job submit` are the same commands."""
    import subprocess
    import sys

    from jsonextract.cli import COMMANDS
    r = subprocess.run([JSONEXTRACT, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and all(f"  {name} " in r.stdout for name in COMMANDS)
    bad = subprocess.run([JSONEXTRACT, "fit"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown command 'fit'" in bad.stderr
    for job, key in (("train.py", "optim.lr (float"), ("extract.py", "pool.num_actors (int"),
                     ("evaluate.py", "predictions (str"), ("pipeline.py", "baseline_limit (int")):
        r = subprocess.run([sys.executable, str(ROOT / "rayjobs" / job), "--help"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and key in r.stdout, job


def test_every_setting_has_a_one_line_comment():
    from jsonextract.config.core import describe
    from jsonextract.config.extract import ExtractConfig
    from jsonextract.config.pipeline import PipelineConfig
    from jsonextract.config.serve import ServeConfig
    from jsonextract.config.train import TrainConfig

    for cls in (TrainConfig, ExtractConfig, PipelineConfig, ServeConfig):
        for line in describe(cls):
            assert not line.endswith(": "), f"{cls.__name__}: {line.strip()} has no comment"


def test_user_errors_are_one_line_exit_2_and_bugs_keep_their_traceback(capsys):
    from jsonextract import cli
    from jsonextract.errors import UserError

    def bad_input():
        raise UserError("data/x.jsonl:3: not valid JSON")

    with pytest.raises(SystemExit) as e:
        cli.run_main(bad_input)
    assert e.value.code == 2 and capsys.readouterr().err == "error: data/x.jsonl:3: not valid JSON\n"

    def bug():
        raise ValueError("inside a library")

    with pytest.raises(ValueError, match="inside a library"):
        cli.run_main(bug)


def test_the_repository_stands_on_its_own():
    """Nothing reads a folder beside the checkout: a user's clone has nothing there."""
    offenders = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", ".git", "artifacts", "runs") or not path.is_file():
            continue
        if path.suffix in (".py", ".yaml", ".sh", ".md", ".toml") or path.parent.name == ".ci":
            text = path.read_text(errors="replace")
            if any(needle in text for needle in ("../" + "shared", '"shared" / ' + '"data"', "parent / " + '"shared"')):
                offenders.append(str(rel))
    assert not offenders, offenders


def test_a_health_check_interval_the_user_exported_reaches_the_local_ray(monkeypatch):
    """The training job starts a local Ray with the controller's poll interval in its runtime environment: the
    value exported by the user, not a fixed one (the default only where nothing was exported)."""
    import ray

    from jsonextract.config.train import TrainConfig
    from jsonextract.training import job

    seen = []

    class Stop(Exception):
        pass

    def fake_init(**kw):
        seen.append(kw["runtime_env"]["env_vars"])
        raise Stop

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    cfg = C.load(TrainConfig, None, [])
    for exported, expected in (("1.5", "1.5"), (None, "0.2")):
        if exported is None:
            monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
        else:
            monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", exported)
        with pytest.raises(Stop):
            job.fit_with_ray(cfg)
        assert seen[-1]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == expected
