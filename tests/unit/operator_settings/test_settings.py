"""Tests of :mod:`dualpath_operator.settings`: environment parsing and the Kopf settings it produces."""

from __future__ import annotations

import logging

import kopf
import pytest

from dualpath_operator import settings

pytestmark = pytest.mark.timeout(10)


def _configured(config: settings.OperatorConfig | None = None) -> kopf.OperatorSettings:
    kopf_settings = kopf.OperatorSettings()
    settings.configure(kopf_settings, config or settings.OperatorConfig())
    return kopf_settings


def _sample_body() -> kopf.Body:
    return kopf.Body(
        {
            "apiVersion": "dualpath.io/v1alpha1",
            "kind": "DualPathCluster",
            "metadata": {"name": "demo", "namespace": "team-a"},
            "spec": {"ratio": {"mode": "Fixed", "prefill": 1, "decode": 2}},
        }
    )


def test_kopf_marks_on_objects_live_under_the_dualpath_prefix() -> None:
    kopf_settings = _configured()
    body = _sample_body()
    patch = kopf.Patch()

    diffbase = kopf_settings.persistence.diffbase_storage
    diffbase.store(body=body, patch=patch, essence=diffbase.build(body=body))
    record: kopf.ProgressRecord = {"started": "2026-11-28T12:00:00", "retries": 1}
    kopf_settings.persistence.progress_storage.store(
        key=kopf.HandlerId("reconcile"), record=record, body=body, patch=patch
    )

    annotations = dict(patch["metadata"]["annotations"])
    assert annotations, "Kopf stored nothing"
    assert all(key.startswith("dualpath.io/") for key in annotations), annotations
    assert "dualpath.io/last-handled-configuration" in annotations
    assert "dualpath.io/reconcile" in annotations
    assert kopf_settings.persistence.finalizer == "dualpath.io/finalizer"


def test_diff_base_round_trips_through_the_stored_annotation() -> None:
    kopf_settings = _configured()
    diffbase = kopf_settings.persistence.diffbase_storage
    body = _sample_body()
    patch = kopf.Patch()
    essence = diffbase.build(body=body)
    diffbase.store(body=body, patch=patch, essence=essence)

    raw: kopf.RawBody = {
        "metadata": {
            "name": "demo",
            "namespace": "team-a",
            "annotations": dict(patch["metadata"]["annotations"]),
        },
        "spec": {"ratio": {"mode": "Fixed", "prefill": 1, "decode": 2}},
    }
    stored = kopf.Body(raw)
    assert diffbase.fetch(body=stored) == essence


def test_only_warnings_and_worse_become_kubernetes_events() -> None:
    assert _configured().posting.level == logging.WARNING
    assert _configured(settings.OperatorConfig(posting_level="ERROR")).posting.level == logging.ERROR


def test_every_watch_and_request_has_an_explicit_bounded_timeout() -> None:
    config = settings.OperatorConfig(
        watch_server_timeout_seconds=30,
        watch_client_timeout_seconds=45,
        watch_connect_timeout_seconds=3,
        watch_inactivity_timeout_seconds=65,
        request_timeout_seconds=12,
        request_connect_timeout_seconds=4,
    )
    kopf_settings = _configured(config)
    assert kopf_settings.watching.server_timeout == 30
    assert kopf_settings.watching.client_timeout == 45
    assert kopf_settings.watching.connect_timeout == 3
    assert kopf_settings.watching.inactivity_timeout == 65
    assert kopf_settings.networking.request_timeout == 12
    assert kopf_settings.networking.connect_timeout == 4


def test_watch_timeout_is_sent_as_an_integer_the_api_server_accepts() -> None:
    # Kopf puts str(server_timeout) into the watch's timeoutSeconds query parameter; the API server
    # parses it with strconv.ParseInt, so "120.0" fails every watch with 400 Bad Request.
    for config in (
        settings.OperatorConfig(),
        settings.OperatorConfig.from_env({"DUALPATH_OPERATOR_WATCH_SERVER_TIMEOUT_SECONDS": "90"}),
    ):
        timeout_param = str(_configured(config).watching.server_timeout)
        assert timeout_param.isdigit(), timeout_param
    with pytest.raises(ValueError, match="DUALPATH_OPERATOR_WATCH_SERVER_TIMEOUT_SECONDS"):
        settings.OperatorConfig.from_env({"DUALPATH_OPERATOR_WATCH_SERVER_TIMEOUT_SECONDS": "90.5"})


def test_defaults_bound_what_kopf_leaves_unbounded() -> None:
    untouched = kopf.OperatorSettings()
    assert untouched.watching.server_timeout is None
    assert untouched.networking.request_timeout == 300

    kopf_settings = _configured()
    assert kopf_settings.watching.server_timeout is not None
    assert kopf_settings.watching.client_timeout is not None
    assert kopf_settings.watching.client_timeout > kopf_settings.watching.server_timeout
    assert kopf_settings.watching.connect_timeout is not None
    assert kopf_settings.networking.request_timeout is not None
    assert kopf_settings.networking.request_timeout < 300


def test_runs_standalone_without_peering() -> None:
    kopf_settings = kopf.OperatorSettings()
    kopf_settings.peering.mandatory = True
    settings.configure(kopf_settings, settings.OperatorConfig())
    assert kopf_settings.peering.standalone is True
    assert kopf_settings.peering.mandatory is False


def test_from_env_without_variables_gives_the_defaults() -> None:
    assert settings.OperatorConfig.from_env({"PATH": "/usr/bin"}) == settings.OperatorConfig()


def test_from_env_parses_the_prefixed_variables() -> None:
    config = settings.OperatorConfig.from_env(
        {
            "DUALPATH_OPERATOR_METRICS_HOST": "0.0.0.0",
            "DUALPATH_OPERATOR_METRICS_PORT": "9102",
            "DUALPATH_OPERATOR_RESYNC_INTERVAL_SECONDS": "15",
            "DUALPATH_OPERATOR_POSTING_LEVEL": "ERROR",
            "DUALPATH_OPERATOR_FIELD_MANAGER": "dp-test",
            "OTHER_VARIABLE": "ignored",
        }
    )
    assert config.metrics_host == "0.0.0.0"
    assert config.metrics_port == 9102
    assert config.resync_interval_seconds == 15.0
    assert config.posting_level == "ERROR"
    assert config.field_manager == "dp-test"


def test_from_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUALPATH_OPERATOR_METRICS_PORT", "9555")
    assert settings.OperatorConfig.from_env().metrics_port == 9555


def test_from_env_rejects_a_misspelt_variable_by_name() -> None:
    with pytest.raises(ValueError, match="DUALPATH_OPERATOR_METRICS_PROT"):
        settings.OperatorConfig.from_env({"DUALPATH_OPERATOR_METRICS_PROT": "9102"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DUALPATH_OPERATOR_METRICS_PORT", "not-a-port"),
        ("DUALPATH_OPERATOR_METRICS_PORT", "70000"),
        ("DUALPATH_OPERATOR_POSTING_LEVEL", "LOUD"),
        ("DUALPATH_OPERATOR_RESYNC_INTERVAL_SECONDS", "0"),
        ("DUALPATH_OPERATOR_REQUEST_TIMEOUT_SECONDS", "-1"),
    ],
)
def test_from_env_rejects_a_bad_value_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        settings.OperatorConfig.from_env({name: value})


def test_watch_client_timeout_must_outlive_the_server_timeout() -> None:
    with pytest.raises(ValueError, match="watch_client_timeout_seconds must be greater"):
        settings.OperatorConfig.from_env(
            {
                "DUALPATH_OPERATOR_WATCH_SERVER_TIMEOUT_SECONDS": "200",
                "DUALPATH_OPERATOR_WATCH_CLIENT_TIMEOUT_SECONDS": "150",
            }
        )


def test_config_is_frozen() -> None:
    config = settings.OperatorConfig()
    with pytest.raises(ValueError, match="frozen"):
        config.metrics_port = 1  # type: ignore[misc]
