"""Config: presets, override parsing and validation errors that name the field."""

import pytest

from mm1_megatron.config import (PRESETS, Config, ConfigError, get_preset, load_config,
                                 parse_override, set_field, validate)

NO_ENV: dict = {}


def _check(cfg: Config, **kw) -> None:
    # Validation for the cluster (FP8 available) unless a test says the machine lacks TE.
    validate(cfg, environ=NO_ENV, fp8_ok=kw.get("te", True))


def _error(preset: str, *overrides: str, te: bool = True) -> ConfigError:
    cfg = get_preset(preset)
    with pytest.raises(ConfigError) as info:
        for text in overrides:
            set_field(cfg, *parse_override(text))
        _check(cfg, te=te)
    return info.value


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates(name):
    cfg = get_preset(name)
    assert cfg.preset == name
    _check(cfg)  # planned for H100s: the 30B trains in FP8


def test_presets_are_independent_copies():
    a, b = get_preset("mm1-3b"), get_preset("mm1-3b-moe64")
    a.llm.hidden_size = 1
    a.parallel.tp = 4
    assert get_preset("mm1-3b").llm.hidden_size == 2560
    assert get_preset("mm1-3b").parallel.tp == 1
    assert b.llm.moe.num_experts == 64 and get_preset("mm1-3b").llm.moe.num_experts == 0


def test_override_types_are_parsed_and_coerced():
    cfg = load_config("tiny", ["parallel.tp=2", "train.lr=3e-4", "train.fp8=null",
                               "parallel.sequence_parallel=true", "connector.type=avg_pool",
                               "llm.moe.num_experts=4", "llm.moe.layer_freq=2",
                               "run_dir=/tmp/x", "train.min_lr_ratio=0"],)
    assert cfg.parallel.tp == 2 and isinstance(cfg.parallel.tp, int)
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.fp8 is None and cfg.parallel.sequence_parallel is True
    assert cfg.connector.type == "avg_pool" and cfg.llm.moe.num_experts == 4
    assert cfg.run_dir == "/tmp/x" and cfg.train.min_lr_ratio == 0.0


@pytest.mark.parametrize("text, field, words", [
    ("parallel.tp=two", "parallel.tp", "integer"),
    ("parallel.tp=1.5", "parallel.tp", "integer"),
    ("parallel.sequence_parallel=3", "parallel.sequence_parallel", "true/false"),
    ("connector.type=mlp", "connector.type", "not one of"),
    ("train.precision=fp64", "train.precision", "not one of"),
    ("llm=3", "llm", "section"),
    ("parallel.tp.x=3", "parallel.tp", "not a section"),
])
def test_bad_override_values_name_the_field(text, field, words):
    err = _error("tiny", text)
    assert err.field_name == field and words in err.reason


def test_misspelled_key_is_refused_with_a_suggestion():
    err = _error("tiny", "parallel.tensor_parallel=2")
    assert err.field_name == "parallel.tensor_parallel"
    assert err.reason == "unknown key; this project calls it 'tp'"
    err = _error("tiny", "trian.lr=1")
    assert err.field_name == "trian" and "'train'" in err.reason
    err = _error("tiny", "llm.moe.num_expert=4")
    assert err.field_name == "llm.moe.num_expert" and "'num_experts'" in err.reason


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("parallel.tp")


@pytest.mark.parametrize("preset, overrides, field, words", [
    ("mm1-30b", ["parallel.tp=13"], "parallel.tp", "does not divide llm.num_attention_heads"),
    ("mm1-30b", ["parallel.tp=14"], "parallel.tp", "query groups"),
    ("mm1-7b", ["parallel.tp=16", "parallel.gpus_per_node=8"], "parallel.tp", "gpus_per_node"),
    ("tiny", ["parallel.world_size=6", "parallel.pp=4"], "parallel.world_size", "not divisible"),
    ("tiny", ["parallel.world_size=8", "parallel.tp=2", "parallel.dp=2"], "parallel.dp",
     "world size 8 != tp*pp*cp*dp"),
    ("mm1-3b-moe64", ["parallel.ep=3"], "parallel.ep", "does not divide llm.moe.num_experts"),
    ("mm1-3b-moe64", ["parallel.ep=8", "parallel.world_size=4"], "parallel.ep", "must divide"),
    ("tiny", ["parallel.ep=2"], "parallel.ep", "needs experts"),
    ("mm1-7b-moe32", ["llm.moe.layer_freq=5"], "llm.moe.layer_freq", "does not divide"),
    ("mm1-7b-moe32", ["llm.moe.top_k=40"], "llm.moe.top_k", "between 1"),
    ("tiny", ["data.seq_length=9"], "data.seq_length", "too short for one image"),
    ("mm1-3b", ["data.seq_length=144"], "data.seq_length", "144 tokens"),
    ("tiny", ["connector.num_tokens=8"], "connector.num_tokens", "not a square"),
    ("tiny", ["connector.num_tokens=49"], "connector.num_tokens", "exceeds"),
    ("tiny", ["vision.image_size=90"], "vision.image_size", "multiple of vision.patch_size"),
    ("mm1-3b", ["llm.num_query_groups=5"], "llm.num_query_groups", "does not divide"),
    ("mm1-30b", ["parallel.pp=3", "parallel.first_stage_layers=null"], "parallel.pp",
     "does not divide llm.num_layers"),
    ("mm1-30b", ["parallel.pp=4", "parallel.first_stage_layers=11"],
     "parallel.first_stage_layers", "do not split evenly"),
    ("tiny", ["parallel.pp=2", "parallel.virtual_stages=2"], "parallel.virtual_stages",
     "pp>2"),
    ("tiny", ["parallel.pp=4", "parallel.virtual_stages=2"], "parallel.virtual_stages",
     "does not divide llm.num_layers=4"),
    ("mm1-3b", ["parallel.pp=4", "parallel.virtual_stages=2", "parallel.world_size=4",
                "train.global_batch_size=6"], "parallel.virtual_stages", "groups of pp=4"),
    ("tiny", ["train.global_batch_size=5"], "train.global_batch_size", "not a multiple"),
    ("tiny", ["train.micro_batch_size=0"], "train.micro_batch_size", "must be >= 1"),
    ("mm1-30b", ["train.precision=fp32"], "train.fp8", "bf16"),
    ("tiny", ["train.warmup_steps=50"], "train.warmup_steps", "not below"),
    ("mm1-3b-moe64", ["parallel.tp=2", "parallel.ep=2", "parallel.world_size=4",
                      "parallel.sequence_parallel=false"], "parallel.sequence_parallel", "MoE"),
])
def test_validation_names_field_and_reason(preset, overrides, field, words):
    err = _error(preset, *overrides)
    assert err.field_name == field, str(err)
    assert words in err.reason, str(err)
    assert "\n" not in str(err)


def test_valid_parallel_layouts_pass():
    for preset, overrides in [
        ("mm1-30b", ["parallel.tp=8", "parallel.pp=4", "parallel.world_size=256"]),
        ("mm1-30b", ["parallel.tp=8", "parallel.pp=4", "parallel.first_stage_layers=10",
                     "parallel.world_size=256"]),
        ("mm1-3b-moe64", ["parallel.tp=2", "parallel.ep=8", "parallel.world_size=64"]),
        ("mm1-7b-moe32", ["parallel.tp=1", "parallel.ep=8", "parallel.world_size=8",
                          "parallel.dp=8"]),
    ]:
        cfg = get_preset(preset)
        for text in overrides:
            set_field(cfg, *parse_override(text))
        _check(cfg)


def test_fp8_accepted_when_transformer_engine_is_there():
    cfg = get_preset("mm1-3b")
    set_field(cfg, "train.fp8", "hybrid")
    _check(cfg, te=True)
    err = _error("mm1-3b", "train.fp8=hybrid", te=False)
    assert err.field_name == "train.fp8" and "Transformer Engine" in err.reason


def test_world_size_comes_from_the_launcher_environment():
    cfg = get_preset("tiny")
    set_field(cfg, "parallel.tp", 2)
    validate(cfg, environ={"WORLD_SIZE": "4"}, fp8_ok=False)
    with pytest.raises(ConfigError, match="world size 3"):
        validate(cfg, environ={"WORLD_SIZE": "3"}, fp8_ok=False)
    with pytest.raises(ConfigError, match="world size 5"):
        validate(cfg, environ={"SLURM_NTASKS": "5"}, fp8_ok=False)


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 2.0e-4\n  micro_batch_size: 1\nllm:\n  moe:\n    num_experts: 4\n"
                    "    layer_freq: 2\n")
    cfg = load_config("tiny", ["train.lr=5e-4"], str(path))
    assert cfg.train.lr == pytest.approx(5e-4)
    assert cfg.train.micro_batch_size == 1 and cfg.llm.moe.num_experts == 4
    path.write_text("train:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match="train.lrr: unknown key"):
        load_config("tiny", [], str(path))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'mm1-13b'"):
        get_preset("mm1-13b")


def test_run_config_round_trip(tmp_path):
    from mm1_megatron.config import load_run_config, save_run_config

    cfg = load_config("demo", [f"run_dir={tmp_path}", "train.lr=3e-4", "parallel.tp=2",
                               "llm.moe.num_experts=8", "parallel.sequence_parallel=true"])
    save_run_config(cfg)
    assert load_run_config(tmp_path) == cfg
    assert load_run_config(tmp_path, ["train.lr=1e-4"]).train.lr == 1e-4
    with pytest.raises(ConfigError, match="config.yaml"):
        load_run_config(tmp_path / "elsewhere")


def test_te_runs_take_one_row_per_micro_batch_with_pipeline_parallelism():
    """Under TE packed rows are one THD sequence; stages exchange [s, b, h]: b must be 1."""
    from mm1_megatron.config import set_field, validate

    cfg = get_preset("mm1-30b")  # pp=4
    set_field(cfg, "parallel.world_size", 256)
    validate(cfg, environ={}, fp8_ok=True)  # as planned: one row per micro-batch
    set_field(cfg, "train.micro_batch_size", 2)
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        validate(cfg, environ={}, fp8_ok=True)
    set_field(cfg, "parallel.pp", 1)
    set_field(cfg, "parallel.first_stage_layers", None)
    validate(cfg, environ={}, fp8_ok=True)  # without a pipeline, rows end to end are fine
