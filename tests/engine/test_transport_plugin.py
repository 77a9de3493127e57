"""A pluggable RDMA transport (``transport.kind: rdma`` with ``transport.rdma_backend``) is loaded by a
real engine process from its configuration and carries the KV between prefill and decode engines: the
output equals full recompute and every engine reports ``dualpath_engine_transport_info{kind="rdma"}``.
The stand-in plugin (``tests.unit.engine_transfer.fake_rdma``) moves bytes over loopback TCP."""

from __future__ import annotations

import pathlib

import pytest

from dualpath_engine import config
from dualpath_engine import tokenizer as tok
from dualpath_engine.model import llama, loader
from tests.engine import harness

pytestmark = pytest.mark.timeout(180)

PLUGIN = "tests.unit.engine_transfer.fake_rdma:LoopbackRdmaTransport"


def test_rdma_plugin_from_config_carries_kv_between_engines(tmp_path: pathlib.Path) -> None:
    model = loader.build(config.ModelConfig())
    extra = {"transport": {"kind": "rdma", "rdma_backend": PLUGIN}}
    with harness.cluster(tmp_path, policy="de-only", engine_extra=extra) as cluster:
        history = tok.encode("Plug a transport in and move the KV cache through it, twice over.", bos=True)
        for turn in range(2):
            result = cluster.complete(history, 8)
            generated = result["choices"][0]["token_ids"]
            assert generated == llama.greedy_reference(model, history, 8), f"turn {turn}"
            history = [*history, *generated, *tok.encode(" again")]
        for engine in cluster.engines:
            assert engine.metric("dualpath_engine_transport_info", kind="rdma") == 1
            assert engine.metric("dualpath_engine_transport_info", kind="tcp") == 0
        assert cluster.prefill.metric("dualpath_engine_transport_bytes_total", direction="rx") > 0
