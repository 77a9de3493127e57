"""The preview CLI: ``python -m dualpath_operator.planning --spec S --observed O [--now T]``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dualpath_operator.planning import __main__ as cli
from tests.unit.planning import samples

pytestmark = pytest.mark.timeout(60)

NIC = {
    "snicRxBps": 10e9,
    "snicCapacityBps": 50e9,
    "snicKvRxBps": 10e9,
    "cnicTxBps": 5e9,
    "cnicRxBps": 5e9,
    "cnicCapacityBps": 400e9,
}


def observed(ttft_s: float = 4.0, **extra: Any) -> dict[str, Any]:
    return {
        "takenAt": "2026-11-28T12:00:00Z",
        "current": "1P:2D",
        "nodes": {"n-p0": NIC, "n-d0": NIC | {"snicCapacityBps": 25e9}, "n-d1": NIC},
        "engines": [
            {"pod": "pe-0", "node": "n-p0", "role": "prefill", "queuedTokens": 1000, "ttftP90S": ttft_s},
            *(
                {
                    "pod": f"de-{i}",
                    "node": f"n-d{i}",
                    "role": "decode",
                    "queuedTokens": 1000,
                    "hbmUsedRatio": 0.3,
                    "tpotP90S": 0.02,
                }
                for i in range(2)
            ),
        ],
        **extra,
    }


def write(tmp_path: Path, spec: Any, obs: Any) -> list[str]:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "o.yaml").write_text(yaml.safe_dump(obs))
    return ["--spec", str(tmp_path / "s.yaml"), "--observed", str(tmp_path / "o.yaml")]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any, str]:
    rc = cli.main(args)
    captured = capsys.readouterr()
    return rc, yaml.safe_load(captured.out) if rc == 0 else None, captured.err


def test_prints_weights_and_decision(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(write(tmp_path, samples.cluster_body(windows=1), observed()), capsys)
    assert rc == 0
    weights = {w["node"]: w["weight"] for w in out["pathWeights"]["status"]}
    assert weights == pytest.approx({"n-d0": 0.2, "n-d1": 0.4, "n-p0": 0.4})
    assert out["pathWeights"]["adminBody"]["weights"][0] == {
        "node": "n-d0",
        "capacity_bytes_per_second": pytest.approx(25e9),
    }
    assert out["decision"]["action"] == "ShiftToPrefill"
    assert out["decision"]["inputs"]["ttftP90Ms"] == "4000.0"
    assert (out["desiredRatio"], out["changed"]) == ("2P:1D", True)
    assert out["limits"]["validityBound"] == "1/7 <= P/D <= 3.5"
    assert out["limits"]["feasible"][0] == "1P:1-7D"
    assert out["state"]["lastChangeAt"] == "2026-11-28T12:00:00Z"


def test_state_output_feeds_the_next_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Hysteresis across runs: the printed state is the next run's input."""
    spec = samples.cluster_body(windows=2)
    rc, first, _ = run_cli(write(tmp_path, spec, observed()), capsys)
    assert (rc, first["decision"]["action"]) == (0, "HoldStabilizing")
    nxt = observed(
        takenAt="2026-11-28T12:00:30Z",
        state=first["state"],
        previousWeights=first["pathWeights"]["status"],
    )
    rc, second, _ = run_cli(write(tmp_path, spec, nxt), capsys)
    assert (rc, second["decision"]["action"], second["desiredRatio"]) == (0, "ShiftToPrefill", "2P:1D")


def test_spec_alone_and_params_and_now(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_only = samples.cluster_body(windows=1)["spec"]
    obs = observed(
        lastChange="2026-11-28T11:58:00Z",
        params={"ratio": {"deadband": 0.5}, "weights": {"alpha": 1.0}},
    )
    args = [*write(tmp_path, spec_only, obs), "--now", "2026-11-28T12:01:00Z"]
    rc, out, _ = run_cli(args, capsys)
    assert rc == 0
    assert out["decision"]["action"] == "HoldCooldown"
    assert out["decision"]["time"] == "2026-11-28T12:01:00Z"


def test_incomplete_sample_holds_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prev = [{"node": "n-p0", "snicCapacityBps": 1, "snicUtilization": 0, "cnicHeadroom": 1, "weight": 1}]
    obs = observed(problems=["prometheus: connection refused"], previousWeights=prev)
    rc, out, _ = run_cli(write(tmp_path, samples.cluster_body(windows=1), obs), capsys)
    assert rc == 0
    assert out["pathWeights"]["held"] is True
    assert out["pathWeights"]["status"] == prev
    assert out["decision"]["action"] == "HoldNoTelemetry"
    assert out["desiredRatio"] == "1P:2D"


@pytest.mark.parametrize(
    ("spec", "obs", "extra", "message"),
    [
        ({"spec": {"model": {}}}, observed(), [], "error:"),
        (samples.cluster_body(), {"current": "two"}, [], "current"),
        (samples.cluster_body(), observed(takenAt=None), [], "give --now"),
        (samples.cluster_body(), observed(takenAt="2026-11-28T12:00:00"), [], "timezone"),
    ],
)
def test_bad_input_exits_2_with_a_message(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    spec: Any,
    obs: Any,
    extra: list[str],
    message: str,
) -> None:
    rc, _, err = run_cli([*write(tmp_path, spec, obs), *extra], capsys)
    assert rc == 2
    assert message in err


def test_missing_file_and_naive_now(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(["--spec", str(tmp_path / "nope.yaml"), "--observed", str(tmp_path / "x")], capsys)
    assert rc == 2 and "nope.yaml" in err
    args = write(tmp_path, samples.cluster_body(), observed())
    with pytest.raises(SystemExit) as exc:
        cli.main([*args, "--now", "2026-11-28T12:00:00"])
    assert exc.value.code == 2
    assert "time zone" in capsys.readouterr().err


def test_module_entry_point(tmp_path: Path) -> None:
    args = write(tmp_path, samples.cluster_body(windows=1), observed())
    proc = subprocess.run(
        [sys.executable, "-m", "dualpath_operator.planning", *args],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["decision"]["action"] == "ShiftToPrefill"


def test_the_documented_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = (Path(__file__).parents[3] / "docs" / "rebalancing.md").read_text()
    section = doc[doc.index("## Preview what it would do") :]
    example = section[
        section.index("```yaml") + len("```yaml") : section.index("```", section.index("```yaml") + 7)
    ]
    obs = yaml.safe_load(example)
    rc, out, _ = run_cli(write(tmp_path, samples.cluster_body(), obs), capsys)
    assert rc == 0
    assert out["pathWeights"]["held"] is False
    assert {w["node"]: w["weight"] for w in out["pathWeights"]["status"]} == pytest.approx(
        {"node-a": 2 / 3, "node-b": 1 / 3}, abs=5e-4
    )
    assert out["decision"]["action"] == "HoldStabilizing"
