"""daemon/config.py: the settings table, the loader, its messages, the docs."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from daemon import config as cfg
from daemon.config import (
    PROTOCOL_DTYPES,
    RING_SLOT_BYTES,
    SECTIONS,
    SETTINGS,
    Config,
    ConfigError,
    LoggingConfig,
    ModelConfig,
    ServerConfig,
    TensorShape,
    load_config,
    parse_config,
    render_reference,
)

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_TOML = ROOT / "configs" / "default.toml"
DOCS = ROOT / "docs" / "config.md"
SRC = "t.toml"

MODEL = {"name": "m", "factory": "pkg.mod:build", "input": {"dtype": "float32", "shape": [4]}}


def conf(**sections):
    """A minimal valid config dict, with sections (or model keys) overridden."""
    data = {"models": [dict(MODEL)]}
    data.update(sections)
    return data


def model(**keys):
    m = dict(MODEL)
    m.update(keys)
    for k, v in list(m.items()):
        if v is None:
            del m[k]
    return parse_config({"models": [m]}, SRC).models[0]


def model_error(**keys) -> str:
    m = dict(MODEL)
    m.update(keys)
    for k, v in list(m.items()):
        if v is None:
            del m[k]
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [m]}, SRC)
    return str(e.value)


# --------------------------------------------------------------------------
# The bundled file and the defaults


def test_default_toml_loads():
    c = load_config(DEFAULT_TOML)
    assert isinstance(c, Config)
    assert c.source == str(DEFAULT_TOML)
    assert c.server == ServerConfig("127.0.0.1", 7070, 8388608, 1000, 1024, 30.0, 300.0, 30.0,
                                    None, None, 256, 1024, 300.0, 10.0, 65536, 128 * 1024 * 1024,
                                    False, ("127.0.0.1", "::1"), 0, "auto", 10.0)
    assert c.logging == LoggingConfig("info")
    (m,) = c.models
    assert (m.name, m.version, m.factory, m.artifact, m.checkpoint) == \
        ("demo", "1", "daemon.zoo:mlp_scorer", None, None)
    assert m.inputs == (("input", TensorShape("float32", (128,))),)
    assert m.single_input is True
    assert m.outputs == (("output", TensorShape("float32", (2,))),)
    assert m.single_output is True
    assert m.devices == ("cpu",)
    assert (m.max_batch, m.window_ms, m.queue_limit) == (64, 2.0, 1024)
    assert m.buckets == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    assert c.model("demo") is m and c.model("demo", "1") is m


def test_cli_check_and_markdown():
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def run(*a):
        return subprocess.run([sys.executable, "-m", "daemon.config", *a],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    ok = run("--check", str(DEFAULT_TOML))
    assert (ok.returncode, ok.stdout) == (0, "ok\n")
    bad = run("--check", "/nonexistent/x.toml")
    assert bad.returncode == 2 and "/nonexistent/x.toml" in bad.stderr
    md = run("--markdown")
    assert md.returncode == 0 and md.stdout == render_reference()


def test_every_default():
    c = parse_config(conf())
    assert dataclasses.asdict(c.server) == {
        "host": "127.0.0.1", "port": 7070, "max_frame_bytes": 8 * 1024 * 1024,
        "deadline_ms": 1000, "max_connections": 1024, "drain_timeout_s": 30.0,
        "start_timeout_s": 300.0, "restart_backoff_max_s": 30.0, "state_file": None,
        "decision_log": None, "max_connections_per_client": 256,
        "max_inflight_per_connection": 1024, "idle_timeout_s": 300.0, "header_timeout_s": 10.0,
        "min_frame_bytes_per_s": 65536, "frame_buffer_budget_bytes": 128 * 1024 * 1024,
        "proxy_protocol": False, "trusted_proxies": ("127.0.0.1", "::1"), "node_id": 0,
        "fronts": "auto", "front_heartbeat_timeout_s": 10.0}
    assert dataclasses.asdict(c.feedback) == {"window_s": 3600.0, "max_entries": 1_000_000}
    assert c.auth.timeout_s == 10.0
    assert c.logging.level == "info"
    m = c.models[0]
    assert m.version == "1"
    assert m.artifact is None and m.checkpoint is None
    assert m.outputs == () and m.single_output is None
    assert m.devices == ("cpu",)
    assert m.threads == 0
    assert m.compile == "auto"
    assert m.dtype == "float32"
    assert m.max_batch == 64
    assert m.window_ms == 2.0 and isinstance(m.window_ms, float)
    assert m.buckets == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    assert m.queue_limit == 1024
    assert m.inflight_batches == 2
    assert c.source == "<config>"


def test_every_default_passes_its_own_check():
    ctx = cfg._Context("<t>", os.getcwd())
    for s in SETTINGS:
        if s.default is cfg.REQUIRED or s.default is None or isinstance(s.default, cfg.Derived):
            continue
        toml_form = list(s.default) if isinstance(s.default, tuple) else s.default
        assert s.check(toml_form, ctx) == s.default, s.name


def test_settings_declared_once_and_sections_match_dataclasses():
    names = [(s.section, s.name) for s in SETTINGS]
    assert len(names) == len(set(names))

    def fields(cls):
        return {f.name for f in dataclasses.fields(cls)}
    assert {s.name for s in SETTINGS if s.section == "server"} == fields(ServerConfig)
    assert {s.name for s in SETTINGS if s.section == "logging"} == fields(LoggingConfig)
    declared = {s.name for s in SETTINGS if s.section == "models"}
    assert declared - {"input", "output"} | {"single_input", "single_output"} == fields(ModelConfig)
    assert {s.name for s in SECTIONS} | {"source"} == fields(Config)


# --------------------------------------------------------------------------
# Validation errors: each names the file, the key path and the bad value


@pytest.mark.parametrize("key, value, expect", [
    ("host", "", 'server.host: must be a host name'),
    ("host", 12, "server.host: must be a host name or address such as \"127.0.0.1\" or \"::\", got 12"),
    ("port", 70000, "server.port: must be an integer from 0 to 65535, got 70000"),
    ("port", -1, "server.port: must be an integer from 0 to 65535, got -1"),
    ("port", "7070", 'server.port: must be an integer from 0 to 65535, got "7070"'),
    ("port", True, "server.port: must be an integer from 0 to 65535, got true"),
    ("max_frame_bytes", 1023, "server.max_frame_bytes: must be an integer from 1024 to 1073741824, got 1023"),
    ("max_frame_bytes", 2**30 + 1, "server.max_frame_bytes: must be an integer from 1024 to 1073741824, got 1073741825"),
    ("deadline_ms", 0, "server.deadline_ms: must be an integer from 1 to 3600000, got 0"),
    ("deadline_ms", 3_600_001, "server.deadline_ms: must be an integer from 1 to 3600000, got 3600001"),
    ("max_connections", 0, "server.max_connections: must be an integer from 1 to 1000000, got 0"),
    ("drain_timeout_s", 0, "server.drain_timeout_s: must be a number greater than 0, got 0"),
    ("drain_timeout_s", float("inf"), "server.drain_timeout_s: must be a number greater than 0, got inf"),
    ("start_timeout_s", -1.5, "server.start_timeout_s: must be a number greater than 0, got -1.5"),
    ("restart_backoff_max_s", "30", 'server.restart_backoff_max_s: must be a number greater than 0, got "30"'),
])
def test_server_errors(key, value, expect):
    with pytest.raises(ConfigError) as e:
        parse_config(conf(server={key: value}), SRC)
    assert str(e.value) == f"{SRC}: {expect}" or str(e.value).startswith(f"{SRC}: {expect}")
    assert e.value.key == f"server.{key}" and e.value.source == SRC


def test_server_values_and_int_to_float():
    s = parse_config(conf(server={"port": 0, "drain_timeout_s": 5, "host": "::"})).server
    assert (s.port, s.drain_timeout_s, s.host) == (0, 5.0, "::")
    assert isinstance(s.drain_timeout_s, float)


def test_logging_level():
    assert parse_config(conf(logging={"level": "WARNING"})).logging.level == "warning"
    with pytest.raises(ConfigError) as e:
        parse_config(conf(logging={"level": "verbose"}), SRC)
    assert str(e.value) == (f'{SRC}: logging.level: must be one of "debug", "info", '
                            f'"warning", "error", got "verbose"')
    with pytest.raises(ConfigError, match='got "warn"; did you mean "warning"'):
        parse_config(conf(logging={"level": "warn"}), SRC)


@pytest.mark.parametrize("keys, expect", [
    ({"max_batch": 0}, 'models[0] ("m").max_batch: must be an integer from 1 to 4096, got 0'),
    ({"max_batch": 4097}, 'models[0] ("m").max_batch: must be an integer from 1 to 4096, got 4097'),
    ({"max_batch": 8.0}, 'models[0] ("m").max_batch: must be an integer from 1 to 4096, got 8.0'),
    ({"window_ms": 10.5}, 'models[0] ("m").window_ms: must be a number from 0 to 10, got 10.5'),
    ({"window_ms": -1}, 'models[0] ("m").window_ms: must be a number from 0 to 10, got -1'),
    ({"queue_limit": 0}, 'models[0] ("m").queue_limit: must be an integer from 1 to 1000000, got 0'),
    ({"inflight_batches": 9}, 'models[0] ("m").inflight_batches: must be an integer from 1 to 8, got 9'),
    ({"threads": -1}, 'models[0] ("m").threads: must be an integer from 0 to 1024, got -1'),
    ({"compile": "fast"}, 'models[0] ("m").compile: must be one of "auto", "off", "default", '
                          '"reduce-overhead", "max-autotune", got "fast"'),
    ({"dtype": "int8"}, 'models[0] ("m").dtype: must be one of "float32", "bfloat16", "float16", got "int8"'),
    ({"devices": []}, 'models[0] ("m").devices: must be a non-empty list of devices'),
    ({"devices": "cpu"}, 'models[0] ("m").devices: must be a non-empty list of devices'),
    ({"devices": ["cpu", "gpu0"]}, 'models[0] ("m").devices[1]: must be "cpu", "cuda" or "cuda:N", got "gpu0"'),
    ({"devices": ["cuda:-1"]}, 'models[0] ("m").devices[0]: must be "cpu", "cuda" or "cuda:N", got "cuda:-1"'),
    ({"name": "bad name"}, 'models[0].name: must be a string of 1 to 64 of'),
    ({"name": "-x"}, 'models[0].name: must be a string of 1 to 64 of'),
    ({"name": "x" * 65}, 'models[0].name: must be a string of 1 to 64 of'),
    ({"name": None}, 'models[0].name: missing; this key is required'),
    ({"version": "v 2"}, 'models[0] ("m").version: must be a string (or integer) of 1 to 64'),
    ({"version": 1.5}, 'models[0] ("m").version: must be a string (or integer) of 1 to 64'),
    ({"version": True}, 'models[0] ("m").version: must be a string (or integer) of 1 to 64'),
    ({"factory": "pkg.mod.build"}, 'models[0] ("m").factory: must be "module:function" '
                                   '(a dotted module path, a colon, a function name), such as '
                                   '"daemon.zoo:mlp_scorer", got "pkg.mod.build"'),
    ({"factory": "pkg..mod:f"}, 'models[0] ("m").factory: must be "module:function"'),
    ({"factory": "pkg:f()"}, 'models[0] ("m").factory: must be "module:function"'),
    ({"factory": None}, 'models[0] ("m"): set exactly one of factory'),
    ({"input": {"dtype": "float", "shape": [4]}},
     'models[0] ("m").input.dtype: must be one of float32, float16, bfloat16, float64, int64, '
     'int32, int16, int8, uint8, bool, got "float"'),
    ({"input": {"dtype": "float32", "shape": []}},
     'models[0] ("m").input.shape: must be a non-empty list of positive integers'),
    ({"input": {"dtype": "float32", "shape": [4, 0]}},
     'models[0] ("m").input.shape: must be a non-empty list of positive integers (the shape of '
     'one sample, no batch dimension), got [4, 0]'),
    ({"input": {"dtype": "float32", "shape": [4.0]}}, 'models[0] ("m").input.shape: must be a non-empty list'),
    ({"input": {"dtype": "float32"}}, 'models[0] ("m").input: missing shape'),
    ({"input": {"shape": [4]}}, 'models[0] ("m").input: missing dtype'),
    ({"input": [4]}, 'models[0] ("m").input: must be a table like { dtype = "float32", shape = [128] }, got [4]'),
    ({"input": None}, 'models[0] ("m"): missing input/inputs'),
    ({"inputs": {}}, 'models[0] ("m").inputs: must be a table of named tensors'),
    ({"input": None, "inputs": {"a b": {"dtype": "int64", "shape": [1]}}},
     'models[0] ("m").inputs: tensor names must be Python identifiers of at most 64 characters, got "a b"'),
    ({"input": None, "inputs": {"ids": {"dtype": "int64", "shape": [0]}}},
     'models[0] ("m").inputs.ids.shape: must be a non-empty list of positive integers'),
    ({"inputs": {"ids": {"dtype": "int64", "shape": [1]}}}, 'models[0] ("m").inputs: set input or inputs, not both'),
    ({"output": {"dtype": "float32", "shape": [1]}, "outputs": {"s": {"dtype": "float32", "shape": [1]}}},
     'models[0] ("m").outputs: set output or outputs, not both'),
    ({"output": {"dtype": "complex64", "shape": [1]}}, 'models[0] ("m").output.dtype: must be one of'),
    ({"buckets": [1, 2, 4]}, 'models[0] ("m").buckets: must be strictly increasing positive integers '
                             'ending exactly at max_batch (64), got [1, 2, 4]; end the list with 64'),
    ({"buckets": [1, 4, 4, 64]}, 'models[0] ("m").buckets: must be strictly increasing positive '
                                 'integers ending exactly at max_batch, got [1, 4, 4, 64]'),
    ({"buckets": [0, 64]}, 'models[0] ("m").buckets: must be strictly increasing'),
    ({"buckets": [8, 64, 128]}, 'models[0] ("m").buckets: must be strictly increasing positive '
                                'integers ending exactly at max_batch (64), got [8, 64, 128]'),
    ({"buckets": []}, 'models[0] ("m").buckets: must be strictly increasing'),
])
def test_model_errors(keys, expect):
    msg = model_error(**keys)
    assert msg.startswith(f"{SRC}: {expect}"), msg


def test_error_is_value_error_with_key():
    with pytest.raises(ValueError) as e:
        parse_config(conf(models=[dict(MODEL, max_batch=0)]), SRC)
    assert isinstance(e.value, ConfigError)
    assert e.value.key == 'models[0] ("m").max_batch'
    assert str(e.value) == f'{SRC}: models[0] ("m").max_batch: must be an integer from 1 to 4096, got 0'


def test_second_model_index_in_path():
    data = {"models": [dict(MODEL), dict(MODEL, name="b", window_ms=11)]}
    with pytest.raises(ConfigError, match=re.escape('models[1] ("b").window_ms: must be a number from 0 to 10, got 11')):
        parse_config(data, SRC)


def test_factory_and_artifact_exclusive(tmp_path):
    art = tmp_path / "m.pt2"
    art.write_bytes(b"x")
    msg = model_error(artifact=str(art))
    assert 'models[0] ("m"): set exactly one of factory' in msg and "both are set" in msg
    assert "neither is set" in model_error(factory=None)
    m = model(factory=None, artifact=str(art))
    assert (m.factory, m.artifact) == (None, str(art))
    msg = model_error(factory=None, artifact=str(art), checkpoint=str(art))
    assert msg.startswith(f'{SRC}: models[0] ("m").checkpoint: only applies with factory')


def test_missing_files_are_named(tmp_path):
    msg = model_error(factory=None, artifact=str(tmp_path / "nope.pt2"))
    assert msg == f'{SRC}: models[0] ("m").artifact: file not found: {tmp_path / "nope.pt2"}; fix the path or create the file'
    with pytest.raises(ConfigError) as e:
        parse_config(conf(models=[dict(MODEL, checkpoint="w/ckpt.pt")]), SRC, base_dir=tmp_path)
    assert str(e.value).startswith(f'{SRC}: models[0] ("m").checkpoint: file not found: {tmp_path / "w" / "ckpt.pt"}')
    assert f"resolved against the config file's directory, {tmp_path}" in str(e.value)
    msg = model_error(checkpoint=str(tmp_path))
    assert msg == f'{SRC}: models[0] ("m").checkpoint: is not a regular file: {tmp_path}'


def test_duplicate_name_version():
    data = {"models": [dict(MODEL), dict(MODEL, name="n"), dict(MODEL, version=1)]}
    with pytest.raises(ConfigError) as e:
        parse_config(data, SRC)
    assert str(e.value).startswith(
        f'{SRC}: models[2] ("m").version: "m" version "1" is already declared by models[0]')
    # Same name, other version: fine; Config.model picks by version, first by default.
    c = parse_config({"models": [dict(MODEL, version="a"), dict(MODEL, version="b")]})
    assert c.model("m").version == "a"
    assert c.model("m", "b").version == "b"
    assert c.model("m", "c") is None and c.model("zz") is None


def test_models_required_and_shape():
    for data, expect in [
        ({}, "models: at least 1 [[models]] table is required, found 0"),
        ({"models": []}, "models: at least 1 [[models]] table is required, found 0"),
        ({"models": dict(MODEL)}, "models: must be an array of tables, one [[models]] per entry"),
        ({"models": [dict(MODEL)], "server": 5}, "server: must be a table ([server]), got 5"),
    ]:
        with pytest.raises(ConfigError) as e:
            parse_config(data, SRC)
        assert str(e.value).startswith(f"{SRC}: {expect}"), str(e.value)


def test_ring_slot_cross_check():
    # 4096 x 128 KiB = 512 MiB > 256 MiB
    msg = model_error(max_batch=4096, input={"dtype": "float32", "shape": [32768]})
    assert msg == (f'{SRC}: models[0] ("m").max_batch: 4096 x 131072 bytes of inputs per sample '
                   f'= 536870912 bytes (512.0 MiB), more than the 256 MiB ring slot; lower '
                   f'max_batch to 2048 or less, or send smaller inputs')
    # Exactly the slot is fine; named inputs are summed.
    m = model(max_batch=2048, input={"dtype": "float32", "shape": [32768]})
    assert m.max_batch * m.sample_bytes == RING_SLOT_BYTES
    msg = model_error(max_batch=2048, input=None, inputs={
        "a": {"dtype": "float32", "shape": [32768]}, "b": {"dtype": "bool", "shape": [1]}})
    assert "2048 x 131073 bytes of inputs per sample" in msg and "lower max_batch to 2047" in msg
    msg = model_error(max_batch=1, input={"dtype": "float64", "shape": [32768, 1025]})
    assert "one sample alone is larger than the slot" in msg


# --------------------------------------------------------------------------
# Unknown keys


def test_unknown_key_suggestion():
    msg = model_error(max_bach=8)
    assert msg == f"""{SRC}: unknown key 'max_bach' in models[0] ("m"); did you mean 'max_batch'?"""
    with pytest.raises(ConfigError) as e:
        parse_config(conf(server={"prot": 1}), SRC)
    assert str(e.value) == f"{SRC}: unknown key 'prot' in server; did you mean 'port'?"
    assert e.value.key == "server"


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        parse_config(conf(logging={"zzz": 1}), SRC)
    assert str(e.value) == f"{SRC}: unknown key 'zzz' in logging; valid keys: level"


def test_unknown_section_and_nested_unknown():
    with pytest.raises(ConfigError) as e:
        parse_config(conf(modles=[]), SRC)
    assert str(e.value) == f"{SRC}: unknown section 'modles'; did you mean 'models'?"
    msg = model_error(input=None, inputs={"ids": {"dtyp": "int64", "shape": [2]}})
    assert msg == f"""{SRC}: unknown key 'dtyp' in models[0] ("m").inputs.ids; did you mean 'dtype'?"""
    msg = model_error(input={"ids": {"dtype": "int64", "shape": [2]}})
    assert msg.startswith(f"""{SRC}: unknown key 'ids' in models[0] ("m").input""")
    assert "use inputs/outputs" in msg


# --------------------------------------------------------------------------
# Frozen


def test_frozen_all_the_way_down():
    c = load_config(DEFAULT_TOML)
    m = c.models[0]
    for obj, attr, value in [(c, "source", "x"), (c.server, "port", 1), (c.logging, "level", "debug"),
                             (m, "max_batch", 1), (m.inputs[0][1], "shape", (1,))]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, value)
    with pytest.raises(AttributeError):     # slots: no new attributes either
        object.__setattr__(c, "extra", 1)

    def walk(x):
        assert not isinstance(x, (list, dict, set, bytearray)), x
        if dataclasses.is_dataclass(x):
            assert type(x).__dataclass_params__.frozen
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name))
        elif isinstance(x, tuple):
            for y in x:
                walk(y)
        else:
            assert isinstance(x, (str, int, float, bool, type(None))), x
    walk(c)
    hash(c)     # hashable, so old and new configs can be compared and used as keys


def test_pickles_and_equal():
    c = load_config(DEFAULT_TOML)
    assert pickle.loads(pickle.dumps(c)) == c
    assert load_config(DEFAULT_TOML) == c


def test_input_data_not_mutated():
    data = conf(models=[dict(MODEL, devices=["cpu"], buckets=[1, 64])])
    before = copy.deepcopy(data)
    parse_config(data)
    assert data == before


# --------------------------------------------------------------------------
# Buckets, inputs, outputs, devices, versions


@pytest.mark.parametrize("max_batch, buckets", [
    (1, (1,)), (2, (1, 2)), (3, (1, 2, 3)), (4, (1, 2, 3, 4)), (5, (1, 2, 3, 4, 5)),
    (48, (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48)),
    (64, (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)),
    (65, (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 65)),
    (4096, (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
            1536, 2048, 3072, 4096)),
])
def test_default_buckets(max_batch, buckets):
    assert model(max_batch=max_batch).buckets == buckets


def test_given_buckets():
    assert model(max_batch=100, buckets=[8, 100]).buckets == (8, 100)
    assert model(max_batch=1, buckets=[1]).buckets == (1,)


def test_single_input_form():
    m = model(input={"dtype": "int64", "shape": [3, 5]})
    assert m.single_input is True
    assert m.inputs == (("input", TensorShape("int64", (3, 5))),)
    assert m.inputs[0][1].nbytes == 3 * 5 * 8 and m.sample_bytes == 120


def test_named_inputs_both_toml_forms():
    inline = tomllib.loads("""
[[models]]
name = "r"
factory = "a.b:c"
inputs = { ids = { dtype = "int64", shape = [8] }, dense = { dtype = "float16", shape = [2, 3] } }
outputs = { score = { dtype = "float32", shape = [1] }, emb = { dtype = "bfloat16", shape = [4] } }
""")
    tables = tomllib.loads("""
[[models]]
name = "r"
factory = "a.b:c"
[models.inputs.ids]
dtype = "int64"
shape = [8]
[models.inputs.dense]
dtype = "float16"
shape = [2, 3]
[models.outputs.score]
dtype = "float32"
shape = [1]
[models.outputs.emb]
dtype = "bfloat16"
shape = [4]
""")
    a, b = parse_config(inline).models[0], parse_config(tables).models[0]
    assert a == b
    assert a.single_input is False and a.single_output is False
    assert a.inputs == (("ids", TensorShape("int64", (8,))), ("dense", TensorShape("float16", (2, 3))))
    assert a.outputs == (("score", TensorShape("float32", (1,))), ("emb", TensorShape("bfloat16", (4,))))
    assert a.sample_bytes == 8 * 8 + 6 * 2


def test_one_named_input_is_not_single():
    m = model(input=None, inputs={"x": {"dtype": "float32", "shape": [4]}})
    assert m.single_input is False and m.inputs == (("x", TensorShape("float32", (4,))),)


def test_protocol_dtypes():
    assert [d for d, _ in PROTOCOL_DTYPES] == ["float32", "float16", "bfloat16", "float64", "int64",
                                               "int32", "int16", "int8", "uint8", "bool"]
    for dtype, size in PROTOCOL_DTYPES:
        spec = model(input={"dtype": dtype, "shape": [2, 3]}).inputs[0][1]
        assert spec.itemsize == size and spec.nbytes == 6 * size


def test_devices_and_version_normalised():
    m = model(devices=["cuda", "cuda:0", "cuda:0", "cpu", "cuda:12"], version=7)
    assert m.devices == ("cuda", "cuda:0", "cuda:0", "cpu", "cuda:12")
    assert m.version == "7"
    assert model(version="2024-06-01_rc.1").version == "2024-06-01_rc.1"


def test_factory_forms():
    for f in ["m:f", "a.b.c:build_model", "_p.q2:F"]:
        assert model(factory=f).factory == f


# --------------------------------------------------------------------------
# Paths


def test_relative_paths_resolved_against_the_config_file(tmp_path, monkeypatch):
    d = tmp_path / "conf"
    (d / "art").mkdir(parents=True)
    (d / "art" / "m.pt2").write_bytes(b"x")
    (d / "w.pt").write_bytes(b"x")
    (d / "c.toml").write_text("""
[[models]]
name = "a"
artifact = "art/m.pt2"
input = { dtype = "float32", shape = [4] }
[[models]]
name = "b"
factory = "x:y"
checkpoint = "./art/../w.pt"
input = { dtype = "float32", shape = [4] }
""")
    monkeypatch.chdir(tmp_path)                 # cwd is not the file's directory
    c = load_config("conf/c.toml")
    assert c.source == "conf/c.toml"
    assert c.models[0].artifact == str(d / "art" / "m.pt2")
    assert c.models[1].checkpoint == str(d / "w.pt")
    assert os.path.isabs(c.models[0].artifact)


def test_parse_config_base_dir(tmp_path, monkeypatch):
    (tmp_path / "w.pt").write_bytes(b"x")
    data = conf(models=[dict(MODEL, checkpoint="w.pt")])
    assert parse_config(data, base_dir=tmp_path).models[0].checkpoint == str(tmp_path / "w.pt")
    monkeypatch.chdir(tmp_path)                 # "<config>": relative to the cwd
    assert parse_config(data).models[0].checkpoint == str(tmp_path / "w.pt")


# --------------------------------------------------------------------------
# Reading files


def test_toml_syntax_error(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[server]\nport = 70 70\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: invalid TOML: ")
    assert "line 2" in msg and "column" in msg


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'none.toml'}: cannot read the config file")):
        load_config(tmp_path / "none.toml")
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path)
    p = tmp_path / "latin1.toml"
    p.write_bytes(b'# caf\xe9\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p)


def test_errors_name_the_file(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text('[[models]]\nname = "demo"\nfactory = "a:b"\ninput = { dtype = "float32", shape = [1] }\nmax_batch = 0\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f'{p}: models[0] ("demo").max_batch: must be an integer from 1 to 4096, got 0'


# --------------------------------------------------------------------------
# The docs cannot drift


def _between_markers(text: str) -> str:
    begin, end = "<!-- settings:begin -->", "<!-- settings:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1
    return text.split(begin, 1)[1].split(end, 1)[0]


def test_docs_match_the_settings_table():
    text = DOCS.read_text()
    assert _between_markers(text).strip("\n") == render_reference().strip("\n"), (
        "docs/config.md is out of date: paste the output of "
        "`python -m daemon.config --markdown` between the settings markers")
    for s in SETTINGS:
        assert f"| `{s.name}` |" in text, s.name
    for section in SECTIONS:
        assert f"[{section.name}]" in text


def test_reference_lists_every_setting_with_its_doc():
    ref = render_reference()
    for s in SETTINGS:
        rows = [line for line in ref.splitlines() if line.startswith(f"| `{s.name}` |")]
        assert any(s.doc.replace("|", "\\|") in row for row in rows), s


def test_docs_full_example_parses(tmp_path):
    text = DOCS.read_text()
    example = text.split("## Full example", 1)[1]
    block = re.search(r"```toml\n(.*?)```", example, re.S).group(1)
    data = tomllib.loads(block)
    for m in data["models"]:            # the example's files, made to exist
        for key in ("artifact", "checkpoint"):
            if key in m:
                (tmp_path / m[key]).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / m[key]).write_bytes(b"x")
    c = parse_config(data, "docs/config.md", base_dir=tmp_path)
    assert [(m.name, m.version) for m in c.models] == [
        ("ranker", "2024-06-01"), ("ranker", "2024-07-15"), ("fraud", "3")]
    assert c.models[0].inputs == c.models[1].inputs
    assert c.models[2].buckets == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48)


def test_module_is_torch_free():
    code = "import sys, daemon.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))


# --------------------------------------------------------------------------
# Rollouts, experiments, shadows


def _two_versions(**sections):
    data = {"models": [dict(MODEL, version="1"), dict(MODEL, version="2")]}
    data.update(sections)
    return data


ROLLOUT = {"model": "m", "stable": "1", "candidate": "2", "salt": "s"}


def test_rollout_defaults_and_values():
    c = parse_config(_two_versions(rollouts=[ROLLOUT]), SRC)
    (r,) = c.rollouts
    assert r.stages == (0.01, 0.05, 0.10, 0.25, 1.0) and r.stage == 0 and not r.auto_advance
    assert c.experiments == () and c.shadows == ()


@pytest.mark.parametrize("change,expect", [
    ({"candidate": "3"}, 'rollouts[0].candidate: "m" version "3" is not in [[models]] (versions: 1, 2)'),
    ({"model": "x"}, 'rollouts[0].model: model "x" is not in [[models]]'),
    ({"candidate": "1"}, "candidate must differ from stable"),
    ({"stages": [0.5, 0.1]}, "strictly increasing"),
    ({"stages": [0.1, 1.5]}, "strictly increasing"),
    ({"stage": 5}, "must index stages (0 to 4), got 5"),
    ({"salt": ""}, "rollouts[0] (\"m\").salt: must be a non-empty string"),
    ({"auto_advance": "yes"}, "must be true or false"),
])
def test_rollout_errors(change, expect):
    with pytest.raises(ConfigError) as e:
        parse_config(_two_versions(rollouts=[dict(ROLLOUT, **change)]), SRC)
    assert expect in str(e.value)


def test_one_rollout_per_model():
    with pytest.raises(ConfigError, match=r"rollouts\[1\]\.model: model \"m\" is already declared"):
        parse_config(_two_versions(rollouts=[ROLLOUT, ROLLOUT]), SRC)


ARMS = [{"name": "control", "split": 0.5}, {"name": "t", "split": 0.5, "version": "2"}]


def test_experiment_arms():
    c = parse_config(_two_versions(experiments=[{"id": "e", "model": "m", "salt": "x", "arms": ARMS}]), SRC)
    (e,) = c.experiments
    assert [(a.name, a.split, a.version) for a in e.arms] == [("control", 0.5, None), ("t", 0.5, "2")]
    assert e.coverage == 1.0


@pytest.mark.parametrize("arms,expect", [
    ([{"name": "a", "split": 0.5}, {"name": "b", "split": 0.4}], "splits must sum to 1, they sum to 0.9"),
    ([{"name": "a", "split": 1.0}], "at least two arms"),
    ([{"name": "a", "split": 0.5}, {"name": "a", "split": 0.5}], 'arm name "a" is used twice'),
    ([{"name": "a", "split": 0.5}, {"name": "b", "split": 0.5, "versoin": "2"}], "did you mean 'version'"),
    ([{"name": "a", "split": 0.5}, {"name": "b", "split": 0.5, "version": "9"}],
     'experiments[0].arms[1].version: "m" version "9" is not in [[models]]'),
])
def test_experiment_errors(arms, expect):
    with pytest.raises(ConfigError) as e:
        parse_config(_two_versions(experiments=[{"id": "e", "model": "m", "salt": "x", "arms": arms}]), SRC)
    assert expect in str(e.value)


def test_shadow_needs_a_served_candidate():
    c = parse_config(_two_versions(shadows=[{"model": "m", "candidate": "2"}]), SRC)
    assert c.shadows[0].sample_rate == 0.05 and c.shadows[0].queue_limit == 256
    with pytest.raises(ConfigError, match=r'shadows\[0\]\.candidate: "m" version "7"'):
        parse_config(_two_versions(shadows=[{"model": "m", "candidate": "7"}]), SRC)


def test_a_shadow_candidate_must_take_the_models_inputs():
    import tomllib
    text = """
[[models]]
name = "m"
factory = "a:b"
input = { dtype = "float32", shape = [4] }
[[models]]
name = "m"
version = "2"
factory = "a:b"
input = { dtype = "float32", shape = [5] }
[[shadows]]
model = "m"
candidate = "2"
"""
    with pytest.raises(ConfigError, match=r"shadows\[0\].candidate: version \"2\" takes other inputs"):
        parse_config(tomllib.loads(text))


# --------------------------------------------------------------------------
# Model metadata (daemon/workers/metadata.py, docs/models.md)

META = {"data_version": "clicks-2026-11",
        "feature_schema": {"input": {"dtype": "float32", "shape": [4],
                                     "features": ["a", "b", "c", "d"]}},
        "training": {"lr": 0.01, "epochs": 3}}


def with_metadata(tmp_path, doc=META, raw: bytes | None = None, **keys):
    """A model entry with a checkpoint w.pt and, unless doc is None, w.pt.json."""
    (tmp_path / "w.pt").write_bytes(b"weights")
    if doc is not None or raw is not None:
        (tmp_path / "w.pt.json").write_bytes(raw if raw is not None else json.dumps(doc).encode())
    entry = dict(MODEL, checkpoint="w.pt", **keys)
    return {"models": [entry]}


def metadata_error(tmp_path, doc=META, raw=None, **keys) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(with_metadata(tmp_path, doc, raw, **keys), SRC, base_dir=tmp_path)
    assert e.value.key == 'models[0] ("m").metadata'
    return str(e.value)


def test_metadata_beside_the_checkpoint_is_read_at_validation(tmp_path):
    m = parse_config(with_metadata(tmp_path), SRC, base_dir=tmp_path).models[0]
    meta = m.metadata
    raw = (tmp_path / "w.pt.json").read_bytes()
    assert meta.path == str(tmp_path / "w.pt.json")
    assert meta.hash == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert meta.data_version == "clicks-2026-11"
    assert meta.features("input") == ("a", "b", "c", "d")
    assert meta.describe() == {"data_version": "clicks-2026-11", "hash": meta.hash,
                               "feature_schema": META["feature_schema"],
                               "training": {"epochs": 3, "lr": 0.01}}
    assert m.require_metadata is False
    # an explicit metadata key (relative to the config file) wins over the default place
    (tmp_path / "other.json").write_text(json.dumps(dict(META, data_version="v2")))
    m2 = parse_config(with_metadata(tmp_path, metadata="other.json"), SRC,
                      base_dir=tmp_path).models[0]
    assert m2.metadata.data_version == "v2" and m2.metadata.path == str(tmp_path / "other.json")


def test_metadata_beside_an_artifact_and_a_factory_without_weights(tmp_path):
    (tmp_path / "m.pt2").write_bytes(b"x")
    (tmp_path / "m.pt2.json").write_text(json.dumps(META))
    entry = {"name": "m", "artifact": "m.pt2", "input": {"dtype": "float32", "shape": [4]}}
    c = parse_config({"models": [entry]}, SRC, base_dir=tmp_path)
    assert c.models[0].metadata.data_version == "clicks-2026-11"
    assert model().metadata is None     # a bare factory: nothing to look beside, allowed


def test_missing_metadata_is_allowed_unless_required(tmp_path):
    m = parse_config(with_metadata(tmp_path, None), SRC, base_dir=tmp_path).models[0]
    assert m.metadata is None
    msg = metadata_error(tmp_path, None, require_metadata=True)
    assert (f"require_metadata is true but the model has no metadata file (there is no "
            f"{tmp_path / 'w.pt.json'}); write one (docs/models.md)") in msg
    with pytest.raises(ConfigError, match="a factory without a checkpoint has no file to look beside"):
        model(require_metadata=True)
    assert "file not found" in metadata_error(tmp_path, metadata="nope.json")


@pytest.mark.parametrize("inputs, schema, expect", [
    ({"input": {"dtype": "float32", "shape": [4]}},
     {"input": {"dtype": "float32", "shape": [8]}},
     "input 'input' is float32[4] in the config but the model was trained on float32[8] "
     "(config inputs: {input: float32[4]}; feature_schema of {path}, data_version "
     "'clicks-2026-11': {input: float32[8]}); declare the inputs the model was trained on"),
    ({"input": {"dtype": "float32", "shape": [4]}},
     {"input": {"dtype": "float16", "shape": [4]}},
     "input 'input' is float32[4] in the config but the model was trained on float16[4]"),
    ({"inputs": {"ids": {"dtype": "int64", "shape": [2]}, "dense": {"dtype": "float32", "shape": [3]}}},
     {"ids": {"dtype": "int64", "shape": [2]}},
     "input 'dense' is not in the model's feature_schema (config inputs: {ids: int64[2], "
     "dense: float32[3]}; feature_schema of {path}, data_version 'clicks-2026-11': "
     "{ids: int64[2]})"),
    ({"inputs": {"ids": {"dtype": "int64", "shape": [2]}}},
     {"ids": {"dtype": "int64", "shape": [2]}, "dense": {"dtype": "float32", "shape": [3]}},
     "the model was trained on input 'dense', which the config does not declare"),
    ({"inputs": {"input": {"dtype": "float32", "shape": [4]}}},     # named "input" == unnamed
     {"x": {"dtype": "float32", "shape": [4]}},
     "input 'input' is not in the model's feature_schema"),
])
def test_a_feature_schema_that_does_not_match_the_inputs_is_refused(tmp_path, inputs, schema,
                                                                    expect):
    entry = {k: v for k, v in MODEL.items() if k != "input"}
    (tmp_path / "w.pt").write_bytes(b"w")
    (tmp_path / "w.pt.json").write_text(json.dumps({"data_version": "clicks-2026-11",
                                                    "feature_schema": schema}))
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [dict(entry, checkpoint="w.pt", **inputs)]}, SRC, base_dir=tmp_path)
    assert str(e.value).startswith(f'{SRC}: models[0] ("m").metadata: ')
    assert expect.replace("{path}", str(tmp_path / "w.pt.json")) in str(e.value), str(e.value)


def test_a_schema_that_matches_named_inputs_in_another_order_passes(tmp_path):
    inputs = {"ids": {"dtype": "int64", "shape": [2]}, "dense": {"dtype": "float32", "shape": [3]}}
    (tmp_path / "w.pt").write_bytes(b"w")
    (tmp_path / "w.pt.json").write_text(json.dumps({"data_version": "1", "feature_schema": {
        "dense": inputs["dense"], "ids": inputs["ids"]}}))
    entry = {"name": "m", "factory": "a:b", "checkpoint": "w.pt", "inputs": inputs}
    assert parse_config({"models": [entry]}, SRC, base_dir=tmp_path).models[0].metadata


@pytest.mark.parametrize("doc, raw, expect", [
    (None, b"{not json", "is not valid JSON"),
    (None, b"\xff\xfe", "is not UTF-8 text"),
    (None, b'{"data_version": "a", "data_version": "b", "feature_schema": {}}',
     "key 'data_version' appears twice in one object"),
    ([1, 2], None, "must be a JSON object with data_version, feature_schema, training, got list"),
    (dict(META, data_verison="x"), None, "unknown key 'data_verison'; did you mean 'data_version'?"),
    (dict(META, epochs=3), None, 'unknown key \'epochs\'; put free training parameters under "training"'),
    ({"feature_schema": META["feature_schema"]}, None, "missing data_version"),
    (dict(META, data_version="2026/11"), None, 'data_version must be a string of 1 to 64 of '
     'A-Z a-z 0-9 . _ -, starting with a letter or digit, got "2026/11"'),
    (dict(META, data_version=7), None, "data_version must be a string"),
    ({"data_version": "1"}, None, "missing feature_schema"),
    (dict(META, feature_schema={}), None, "feature_schema must be a non-empty object"),
    (dict(META, feature_schema={"input": {"dtype": "f32", "shape": [4]}}), None,
     "feature_schema.input.dtype: must be one of float32,"),
    (dict(META, feature_schema={"input": {"dtype": "float32", "shape": [0]}}), None,
     "feature_schema.input.shape: must be a non-empty list of positive integers"),
    (dict(META, feature_schema={"input": {"dtype": "float32", "shape": [4], "order": "C"}}), None,
     "feature_schema.input: unknown key 'order' (keys: dtype, shape, features)"),
    (dict(META, feature_schema={"input": {"dtype": "float32", "shape": [4], "features": ["a"]}}),
     None, "feature_schema.input.features: lists 1 names, but shape [4] has 4 elements"),
    (dict(META, feature_schema={"input": {"dtype": "float32", "shape": [2],
                                          "features": ["a", "a"]}}),
     None, "feature_schema.input.features: 'a' is listed twice"),
    (dict(META, feature_schema={"in put": {"dtype": "float32", "shape": [4]}}), None,
     "input names are Python identifiers"),
    (dict(META, training=[1]), None, "training must be a JSON object of free parameters"),
])
def test_metadata_file_errors_name_the_file_and_the_key(tmp_path, doc, raw, expect):
    msg = metadata_error(tmp_path, doc, raw)
    assert f'models[0] ("m").metadata: {tmp_path / "w.pt.json"}: ' in msg
    assert expect in msg, msg


def test_metadata_keeps_the_config_frozen_hashable_and_comparable(tmp_path):
    c = parse_config(with_metadata(tmp_path), SRC, base_dir=tmp_path)
    meta = c.models[0].metadata
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.data_version = "x"
    assert type(meta.feature_schema) is tuple and type(meta.training) is str
    hash(c)
    assert pickle.loads(pickle.dumps(c)) == c
    assert parse_config(with_metadata(tmp_path), SRC, base_dir=tmp_path) == c
    # another file (the same schema, another data version) is another entry:
    # a reload restarts that version rather than keep it
    changed = parse_config(with_metadata(tmp_path, dict(META, data_version="clicks-2026-12")), SRC,
                           base_dir=tmp_path)
    assert changed.models[0] != c.models[0]


# --------------------------------------------------------------------------
# [models.fallback] and input defaults (daemon/serving/fallback.py, docs/operations.md "Degraded mode")

import struct  # noqa: E402


def _fallback_config(fallback: dict, primary: dict | None = None, other: dict | None = None):
    """Version "1" with ``fallback``, and version "small" (``other`` keys)."""
    def entry(base: dict, keys: dict | None) -> dict:
        e = dict(base, **(keys or {}))
        if "inputs" in (keys or {}):
            del e["input"]
        return {k: v for k, v in e.items() if v is not None}
    one = entry(dict(MODEL, version="1", output={"dtype": "float32", "shape": [2]},
                     fallback=fallback), primary)
    return {"models": [one, entry(dict(MODEL, version="small"), other)]}


def fallback_error(fallback: dict, primary=None, other=None) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        parse_config(_fallback_config(fallback, primary, other), SRC)
    return e.value


def test_a_version_fallback_and_its_defaults():
    m = parse_config(_fallback_config({"version": "small"}), SRC).models[0]
    assert m.fallback == cfg.FallbackConfig("small", None,
                                            ("no_worker", "queue_full", "deadline_near"), 256)
    m = parse_config(_fallback_config({"version": "small", "queue_limit": 8,
                                       "on": ["model_error", "no_worker"]}), SRC).models[0]
    assert m.fallback.on == ("no_worker", "model_error") and m.fallback.queue_limit == 8
    assert parse_config(conf(), SRC).models[0].fallback is None


def test_a_constant_fallback_is_held_as_the_bytes_of_the_declared_outputs():
    m = model(output={"dtype": "float32", "shape": [2]}, fallback={"outputs": [0.25, 1]})
    assert m.fallback.outputs == (("output", struct.pack("<2f", 0.25, 1.0)),)
    assert m.fallback.version is None
    # one number for every element
    assert model(output={"dtype": "int8", "shape": [2, 2]}, fallback={"outputs": -3}) \
        .fallback.outputs == (("output", struct.pack("<4b", -3, -3, -3, -3)),)
    named = model(outputs={"score": {"dtype": "float32", "shape": [1]},
                           "flag": {"dtype": "bool", "shape": [2]}},
                  fallback={"outputs": {"flag": [True, False], "score": [0.5]}})
    assert named.fallback.outputs == (("score", struct.pack("<f", 0.5)),
                                      ("flag", b"\x01\x00"))  # in the declared order
    # frozen, hashable, and a reload sees a changed constant
    hash(named)
    assert model(output={"dtype": "float32", "shape": [2]}, fallback={"outputs": [0.25, 2]}) != m


@pytest.mark.parametrize("fallback,primary,other,key,expect", [
    ({"version": "big"}, None, None, ".fallback.version",
     '"m" version "big" is not in [[models]] (other versions of "m": small)'),
    ({"version": "1"}, None, None, ".fallback.version", "names this entry's own version"),
    ({"version": "small"}, None, {"input": {"dtype": "float32", "shape": [5]}},
     ".fallback.version", 'version "small" takes other inputs than version "1"'),
    ({"version": "small"}, None, {"inputs": {"input": {"dtype": "float32", "shape": [4]}}},
     ".fallback.version", "takes other inputs"),
    ({"version": "small"}, None, {"output": {"dtype": "float16", "shape": [2]}},
     ".fallback.version", 'version "small" declares other outputs'),
    ({"version": "small", "outputs": [1, 2]}, None, None, ".fallback",
     "set exactly one of version"),
    ({}, None, None, ".fallback", "neither is set"),
    ({"version": "small", "on": ["deadline"]}, None, None, ".fallback.on",
     'unknown cause "deadline"'),
    ({"version": "small", "on": []}, None, None, ".fallback.on", "non-empty list of causes"),
    ({"version": "small", "queue_limit": 0}, None, None, ".fallback.queue_limit",
     "must be an integer from 1 to 1000000"),
    ({"outputs": [1, 2], "queue_limit": 4}, None, None, ".fallback.queue_limit",
     "only applies to a version fallback"),
    ({"version": "small", "when": "always"}, None, None, ".fallback", "unknown key 'when'"),
    ({"outputs": [1, 2, 3]}, None, None, ".fallback.outputs",
     "must be a constant float32 sample of shape [2]"),
    ({"outputs": ["a", "b"]}, None, None, ".fallback.outputs", "float32 sample of shape [2]"),
    ({"outputs": [1.5, 2]}, {"output": {"dtype": "int64", "shape": [2]}}, None,
     ".fallback.outputs", "int64 sample"),
    ({"outputs": [1, 2]}, {"output": None}, None, ".fallback.outputs",
     "declare output = "),
    ({"outputs": [1, 2]}, {"output": None, "outputs": {"a": {"dtype": "float32", "shape": [2]}}},
     None, ".fallback.outputs", "give a table of name to value"),
    ({"outputs": {"b": [1, 2]}},
     {"output": None, "outputs": {"a": {"dtype": "float32", "shape": [2]}}}, None,
     ".fallback.outputs", "unknown key 'b'"),
    ({"outputs": {}}, {"output": None, "outputs": {"a": {"dtype": "float32", "shape": [2]}}},
     None, ".fallback.outputs", "missing a"),
])
def test_fallback_errors_name_the_key(fallback, primary, other, key, expect):
    e = fallback_error(fallback, primary, other)
    assert e.key == 'models[0] ("m")' + key, (e.key, str(e))
    assert expect in str(e), str(e)


def test_an_input_default_is_held_as_its_bytes_and_checked_against_the_input():
    m = model(input={"dtype": "float32", "shape": [2], "default": [1.0, -2.5]})
    assert m.inputs[0][1].default == struct.pack("<2f", 1.0, -2.5)
    assert m.inputs[0][1] == TensorShape("float32", (2,), struct.pack("<2f", 1.0, -2.5))
    assert model(input={"dtype": "int32", "shape": [3], "default": 7}).inputs[0][1].default \
        == struct.pack("<3i", 7, 7, 7)
    named = model(input=None, inputs={"ids": {"dtype": "int64", "shape": [2]},
                                      "w": {"dtype": "float32", "shape": [1], "default": [0]}})
    assert [t.default for _, t in named.inputs] == [None, struct.pack("<f", 0.0)]
    for bad, expect in [([1.0], "sample of shape [2]"), ([1.5, float("nan")], "NaN"),
                        ("zero", "float32 sample")]:
        msg = model_error(input={"dtype": "float32", "shape": [2], "default": bad})
        assert 'models[0] ("m").input.default: must be a constant' in msg and expect in msg, msg
    msg = model_error(input=None, inputs={"ids": {"dtype": "int8", "shape": [1], "default": [300]}})
    assert 'models[0] ("m").inputs.ids.default' in msg and "int8" in msg, msg
    # an output has no default
    assert "unknown key 'default'" in model_error(
        output={"dtype": "float32", "shape": [2], "default": [0, 0]})


def test_versions_that_differ_only_in_defaults_take_the_same_requests():
    """A default is the version's own: a fallback or shadow version may
    declare others (or none)."""
    c = parse_config(_fallback_config(
        {"version": "small"}, {"input": {"dtype": "float32", "shape": [4], "default": 1}}), SRC)
    assert c.models[0].fallback.version == "small"
    c = parse_config({"models": [
        dict(MODEL, version="1", input={"dtype": "float32", "shape": [4], "default": 0}),
        dict(MODEL, version="2")], "shadows": [{"model": "m", "candidate": "2"}]}, SRC)
    assert c.shadows[0].candidate == "2"


def test_docs_fallback_example_parses(tmp_path):
    example = DOCS.read_text().split("## Fallback and input defaults example", 1)[1]
    data = tomllib.loads(re.search(r"```toml\n(.*?)```", example, re.S).group(1))
    for m in data["models"]:
        if "artifact" in m:
            (tmp_path / m["artifact"]).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / m["artifact"]).write_bytes(b"x")
    c = parse_config(data, "docs/config.md", base_dir=tmp_path)
    fraud, _, ranker = c.models
    assert fraud.fallback.version == "3-small" and fraud.fallback.queue_limit == 128
    assert ranker.fallback.outputs == (("score", b"\x00" * 4),)
    assert dict(ranker.inputs)["dense"].default == b"\x00" * 256
