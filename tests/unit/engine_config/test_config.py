"""Engine and scheduler configuration: loading files, env overrides, validation errors, KV sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest

from dualpath_engine import config

pytestmark = pytest.mark.timeout(10)


def test_kv_bytes_per_token_matches_the_reference_geometry() -> None:
    # Llama-3.1-8B-sized KV: 32 layers x 8 KV heads x 128 x bf16 x (K, V) = 128 KiB per token.
    model = config.ModelConfig(
        num_layers=32, hidden_size=256, num_heads=8, num_kv_heads=8, head_dim=128, dtype="bfloat16"
    )
    assert model.kv_bytes_per_token == 128 * 1024
    assert model.kv_bytes_per_token_per_layer == 4 * 1024
    engine = config.EngineConfig(role="prefill", model=model)
    assert engine.full_block_bytes == 8 * 1024 * 1024  # 64-token Full Block = 8 MiB


def test_tiny_float32_kv_bytes() -> None:
    assert config.ModelConfig().kv_bytes_per_token == 2 * 2 * 2 * 16 * 4


def test_yaml_file_with_env_overrides(tmp_path: Path) -> None:
    path = tmp_path / "engine.yaml"
    path.write_text(
        "role: prefill\nmode: dualpath\nmodel:\n  num_layers: 4\nkv:\n  storage_backend: memory\n"
        "network:\n  emulate: true\n  storage_nic: {device: mlx5_s0, budget_bytes_per_s: 1.0e9}\n"
    )
    env = {
        "DUALPATH_ROLE": "decode",
        "DUALPATH_GROUP_ID": "3",
        "DUALPATH_NODE_NAME": "node-a",
        "DUALPATH_HOST": "127.0.0.5",
        "DUALPATH_PORT": "9100",
        "DUALPATH_SCHEDULER_URL": "http://127.0.0.2:8000/",
        "DUALPATH_TRANSPORT_PORT": "0",
        "PATH": "/usr/bin",  # unrelated variables are ignored
    }
    cfg = config.load_engine_config(path, env)
    assert cfg.role == "decode"
    assert cfg.group_id == 3
    assert cfg.node_name == "node-a"
    assert (cfg.host, cfg.port, cfg.transport.port) == ("127.0.0.5", 9100, 0)
    assert cfg.scheduler_url == "http://127.0.0.2:8000"
    assert cfg.model.num_layers == 4
    assert cfg.network.storage_nic.effective_budget_bytes_per_s == 1e9
    assert cfg.name == "de-127.0.0.5-9100"


def test_json_file_round_trips_what_the_operator_renders(tmp_path: Path) -> None:
    original = config.EngineConfig(
        role="prefill", engine_id="pe-0", mode="basic", kv=config.KVConfig(storage_path="/data/kv")
    )
    path = tmp_path / "engine.json"
    path.write_text(json.dumps(original.model_dump(mode="json")))
    assert config.load_engine_config(path, {}) == original
    sched = config.SchedulerConfig(alpha_tokens=1000)
    spath = tmp_path / "sched.yaml"
    spath.write_text(json.dumps(sched.model_dump(mode="json")))
    assert config.load_scheduler_config(spath, {"DUALPATH_PORT": "0"}) == sched.model_copy(update={"port": 0})


def test_models_are_frozen() -> None:
    cfg = config.EngineConfig(role="prefill")
    with pytest.raises(pydantic.ValidationError):
        cfg.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("document", "env", "fragment"),
    [
        ({}, {}, "role"),
        (
            {"role": "prefill", "model": {"num_heads": 4, "num_kv_heads": 3}},
            {},
            "num_kv_heads (3) must divide",
        ),
        ({"role": "prefill", "model": {"vocab_size": 256}}, {}, "model.vocab_size"),
        ({"role": "prefill", "model": {"dtype": "int8"}}, {}, "model.dtype"),
        ({"role": "prefill", "transport": {"kind": "rdma"}}, {}, "needs rdma_backend"),
        ({"role": "prefill", "transport": {"kind": "cuda"}}, {}, "needs device 'cuda'"),
        ({"role": "prefill", "mode": "basic", "layerwise": True}, {}, "basic"),
        ({"role": "prefill", "unknown_field": 1}, {}, "unknown_field"),
        ({"role": "prefill", "local_rank": 1}, {}, "local_rank 1 has no compute NIC"),
        ({"role": "prefill", "network": {"compute_nics": [{"device": "mlx5_s0"}]}}, {}, "repeated: mlx5_s0"),
        (
            {"role": "prefill", "network": {"storage_nic": {"device": "bad name"}}},
            {},
            "network.storage_nic.device",
        ),
        ({"role": "prefill"}, {"DUALPATH_PORT": "http"}, "port (from DUALPATH_PORT='http')"),
        ({"role": "prefill"}, {"DUALPATH_ROLE": "router"}, "role (from DUALPATH_ROLE='router')"),
        ({"role": "prefill"}, {"DUALPATH_SCHEDULER_URL": "sched:8000"}, "scheduler_url"),
    ],
)
def test_bad_engine_config_names_the_field(
    tmp_path: Path, document: dict[str, object], env: dict[str, str], fragment: str
) -> None:
    path = tmp_path / "engine.yaml"
    path.write_text(json.dumps(document))
    with pytest.raises(config.ConfigError) as info:
        config.load_engine_config(path, env)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load_engine_config(tmp_path / "missing.yaml", {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("role: [unclosed\n")
    with pytest.raises(config.ConfigError, match="not valid"):
        config.load_engine_config(bad, {})
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(config.ConfigError, match="must be a mapping"):
        config.load_engine_config(listing, {})


def test_layerwise_follows_mode_unless_set() -> None:
    assert config.EngineConfig(role="prefill", mode="dualpath").use_layerwise
    assert config.EngineConfig(role="prefill", mode="oracle").use_layerwise
    assert not config.EngineConfig(role="prefill", mode="basic").use_layerwise
    assert not config.EngineConfig(role="prefill", mode="dualpath", layerwise=False).use_layerwise


def test_scheduler_defaults_follow_the_paper_and_reject_bad_values(tmp_path: Path) -> None:
    cfg = config.load_scheduler_config(None, {})
    assert (cfg.z_factor, cfg.compute_quota_ms, cfg.policy) == (1.05, 300.0, "dualpath")
    assert not cfg.weights_aware_read_side and not cfg.split_reads
    path = tmp_path / "scheduler.yaml"
    path.write_text("z_factor: 0.5\npolicy: pe-only\n")
    with pytest.raises(config.ConfigError, match="z_factor"):
        config.load_scheduler_config(path, {})
    path.write_text("policy: pe-only\n")
    with pytest.raises(config.ConfigError, match=r"port \(from DUALPATH_PORT='99999'\)"):
        config.load_scheduler_config(path, {"DUALPATH_PORT": "99999"})
    assert config.load_scheduler_config(path, {"DUALPATH_HOST": "127.0.0.9"}).host == "127.0.0.9"


def test_rdma_backend_accepted_with_import_path() -> None:
    transport = config.TransportConfig(kind="rdma", rdma_backend="mooncake_plugin.transport:RdmaTransport")
    assert transport.rdma_backend == "mooncake_plugin.transport:RdmaTransport"
    with pytest.raises(pydantic.ValidationError, match=r"package\.module:Class"):
        config.TransportConfig(kind="rdma", rdma_backend="not an import path")
