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


def test_a_misspelled_field_in_a_derived_preset_raises():
    from mm1_megatron.config import presets

    with pytest.raises(TypeError, match="globl_batch_size"):
        presets._sft("tiny", globl_batch_size=8)
    with pytest.raises(TypeError, match="tpp"):
        presets._with_layout(get_preset("tiny"), vision_recompute="none", tpp=2)


def test_presets_never_assign_to_config_fields():
    """Assignment (`cfg.train.lr = ...`, setattr) would take a misspelled name silently;
    presets change fields with dataclasses.replace, which refuses one."""
    import ast
    import inspect

    from mm1_megatron.config import presets

    tree = ast.parse(inspect.getsource(presets))
    offenders = [node.lineno for node in ast.walk(tree)
                 if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
                 and any(isinstance(t, ast.Attribute) for target in
                         (node.targets if isinstance(node, ast.Assign) else [node.target])
                         for t in ast.walk(target))
                 or isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setattr"]
    assert offenders == [], f"config/presets.py assigns to fields at lines {offenders}"


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


# --------------------------------------------------------------------------------------------
# Issue 14 finding 7: ranges of every field, YAML syntax errors, and the data files a run on
# this machine reads.
# --------------------------------------------------------------------------------------------


def _int_fields(obj, prefix=""):
    """Dotted names of every int / Optional[int] field, nested sections included."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _int_fields(value, name + ".")
        elif hints[f.name] in (int, typing.Optional[int]):
            yield name


ZERO_ALLOWED = {"train.warmup_steps", "train.seed", "data.prefetch", "eval.seed",
                "llm.moe.num_experts"}


def test_every_int_field_of_every_section_is_range_checked():
    names = list(_int_fields(get_preset("tiny")))
    assert {"checkpoint.save_interval", "checkpoint.keep_last", "logging.log_interval",
            "llm.moe.layer_freq", "eval.limit", "eval.max_new_tokens"} <= set(names)
    for name in names:
        if name == "vision.feature_layer":  # signed: -1 is the last layer, its own rule
            continue
        bad = -1 if name in ZERO_ALLOWED else 0
        err = _error("tiny", f"{name}={bad}")
        assert err.field_name == name, str(err)
        assert err.reason == f"must be >= {bad + 1}, got {bad}"
    # Zero where zero means something, and the optional eval fields left unset, stay valid.
    _check(load_config("tiny", [f"{name}=0" for name in sorted(ZERO_ALLOWED)]
                       + ["eval.limit=null", "eval.max_new_tokens=null"], this_machine=False))


@pytest.mark.parametrize("text, field, words", [
    ("train.lr=-1", "train.lr", "must be > 0"),
    ("train.lr=0", "train.lr", "must be > 0"),
    ("train.lr=.nan", "train.lr", "finite"),
    ("train.lr=.inf", "train.lr", "finite"),
    ("train.grad_clip=-1", "train.grad_clip", "must be >= 0"),
    ("train.grad_clip=.nan", "train.grad_clip", "finite"),
    ("train.weight_decay_ratio=-0.1", "train.weight_decay_ratio", "must be >= 0"),
    ("train.adam_eps=0", "train.adam_eps", "must be > 0"),
    ("train.adam_beta1=1", "train.adam_beta1", "[0, 1)"),
    ("train.adam_beta2=1.5", "train.adam_beta2", "[0, 1)"),
    ("train.adam_beta2=-0.5", "train.adam_beta2", "must be >= 0"),
    ("train.adam_beta2=.nan", "train.adam_beta2", "finite"),
    ("llm.norm_eps=0", "llm.norm_eps", "must be > 0"),
    ("llm.rope_theta=-1", "llm.rope_theta", "must be > 0"),
    ("vision.layernorm_eps=.inf", "vision.layernorm_eps", "finite"),
    ("llm.moe.aux_loss_coeff=-0.01", "llm.moe.aux_loss_coeff", "must be >= 0"),
    ("data.weight_text=-1", "data.weight_text", "must be >= 0"),
    ("data.weight_caption=.nan", "data.weight_caption", "finite"),
])
def test_float_fields_must_be_finite_and_in_range(text, field, words):
    err = _error("tiny", text)
    assert err.field_name == field, str(err)
    assert words in err.reason, str(err)
    # The boundary values that mean something stay valid: no clipping, no decay, beta1 = 0.
    _check(load_config("tiny", ["train.grad_clip=0", "train.weight_decay_ratio=0",
                                "train.adam_beta1=0", "data.weight_text=0", "train.lr=null",
                                "llm.moe.aux_loss_coeff=0"], this_machine=False))


def test_malformed_yaml_file_is_one_config_error_with_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n   micro_batch_size: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [], str(path), this_machine=False)
    assert info.value.field_name == f"{path}:3"
    assert "mapping values are not allowed here" in info.value.reason
    assert "\n" not in str(info.value)
    path.write_text("train: {lr: 1.0e-4\nllm:\n  num_layers: 2\n")  # unclosed flow mapping
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [], str(path), this_machine=False)
    assert info.value.field_name.startswith(f"{path}:") and "\n" not in str(info.value)
    path.write_bytes(b"train:\n  lr: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config("tiny", [], str(path), this_machine=False)


def test_config_mirrors_the_data_layers_names():
    """config sits below data, so the loader's source folders and the tokenizer's special ids
    are repeated in validate.py; they must stay equal."""
    import importlib

    from mm1_megatron.data.mixture import SOURCES
    from mm1_megatron.data.tokenizer import SPECIAL_TOKENS

    checks = importlib.import_module("mm1_megatron.config.validate")  # not the function
    assert checks.SOURCES == SOURCES
    assert checks.TOKENIZER_SPECIALS == SPECIAL_TOKENS


def _machine_error(preset: str, *overrides: str) -> ConfigError:
    """The error of a run on this machine; dry runs and plans (this_machine=False) and
    library use (the default) do not look at the data files."""
    for this_machine in (False, None):
        load_config(preset, list(overrides), this_machine=this_machine)
    with pytest.raises(ConfigError) as info:
        load_config(preset, list(overrides), this_machine=True)
    assert "\n" not in str(info.value)
    return info.value


def test_data_path_must_hold_a_dataset_on_this_machine(demo_data, tmp_path):
    tok = f"data.tokenizer_model={demo_data}/tokenizer.model"
    err = _machine_error("tiny")  # the tiny preset names no data
    assert err.field_name == "data.path" and "not set" in err.reason
    err = _machine_error("demo", f"data.path={tmp_path}/missing", tok)
    assert err.field_name == "data.path" and "no such directory" in err.reason
    err = _machine_error("demo", f"data.path={demo_data}/tokenizer.model", tok)
    assert err.field_name == "data.path" and "not a directory" in err.reason
    err = _machine_error("demo", f"data.path={tmp_path}", tok)
    assert err.field_name == "data.path" and "no dataset folder" in err.reason
    (tmp_path / "caption").symlink_to(demo_data / "caption")
    err = _machine_error("demo", f"data.path={tmp_path}", tok, "data.weight_caption=0")
    assert err.field_name == "data.path" and "data.weight_caption" in err.reason
    load_config("demo", [f"data.path={tmp_path}", tok], this_machine=True)  # caption only


def test_tokenizer_model_must_be_a_sentencepiece_file_on_this_machine(demo_data, tmp_path):
    data = f"data.path={demo_data}"
    err = _machine_error("demo", data, "data.tokenizer_model=")
    assert err.field_name == "data.tokenizer_model" and "not set" in err.reason
    err = _machine_error("demo", data, f"data.tokenizer_model={tmp_path}/missing.model")
    assert err.field_name == "data.tokenizer_model" and "no such file" in err.reason
    err = _machine_error("demo", data, f"data.tokenizer_model={demo_data}")
    assert err.field_name == "data.tokenizer_model" and "not a file" in err.reason
    (tmp_path / "junk.model").write_bytes(b"not a model\n")
    err = _machine_error("demo", data, f"data.tokenizer_model={tmp_path}/junk.model")
    assert err.field_name == "data.tokenizer_model" and "not a sentencepiece model" in err.reason


def test_tokenizer_without_the_fixed_special_ids_is_refused(demo_data, tmp_path):
    import io

    import sentencepiece as spm

    buf = io.BytesIO()  # sentencepiece's defaults: <unk>=0 <s>=1 </s>=2, no <pad>, no <image>
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a photo of a cat on a mat", "two dogs play in the park"] * 20),
        model_writer=buf, vocab_size=30, hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "plain.model").write_bytes(buf.getvalue())
    err = _machine_error("demo", f"data.path={demo_data}",
                         f"data.tokenizer_model={tmp_path}/plain.model")
    assert err.field_name == "data.tokenizer_model" and "special token" in err.reason


def test_tokenizer_vocabulary_must_fit_the_model_on_this_machine(demo_data):
    """`mm1-train --preset tiny` with the demo tokenizer (2048 pieces) used to crash in the
    embedding (512 rows) at step 1."""
    data = [f"data.path={demo_data}", f"data.tokenizer_model={demo_data}/tokenizer.model"]
    err = _machine_error("tiny", *data)
    assert err.field_name == "llm.vocab_size"
    assert "512 is smaller than the tokenizer's vocabulary of 2048" in err.reason
    load_config("tiny", data + ["llm.vocab_size=2048"], this_machine=True)
    load_config("demo", data, this_machine=True)
    # The model reads every llm.image_token_id as an image slot: not a text piece...
    err = _machine_error("tiny", *data, "llm.vocab_size=2048", "llm.image_token_id=7")
    assert err.field_name == "llm.image_token_id" and "<image> id 3" in err.reason
    # ...but an id the tokenizer never produces is fine.
    load_config("tiny", data + ["llm.vocab_size=4096", "llm.image_token_id=3000"],
                this_machine=True)


def test_a_dataset_without_this_tokenizers_token_index_is_refused_before_launch(demo_data,
                                                                               tmp_path):
    import json
    import shutil

    shutil.copytree(demo_data / "caption", tmp_path / "caption")
    tok = f"data.tokenizer_model={demo_data}/tokenizer.model"
    load_config("demo", [f"data.path={tmp_path}", tok], this_machine=True)
    manifest = json.loads((tmp_path / "caption" / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64  # indexed with another tokenizer
    (tmp_path / "caption" / "manifest.json").write_text(json.dumps(manifest))
    err = _machine_error("demo", f"data.path={tmp_path}", tok)
    assert err.field_name == "data.tokenizer_model" and "is not the tokenizer" in err.reason
    assert "tools/index_tokens.py" in err.reason
    del manifest["index"]["segments"]  # prepared without --tokenizer
    (tmp_path / "caption" / "manifest.json").write_text(json.dumps(manifest))
    err = _machine_error("demo", f"data.path={tmp_path}", tok)
    assert err.field_name == "data.path" and "no token index" in err.reason
