"""The scheduler policy follows the DualPath paper's section 6 rules (table cases + properties)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_engine.scheduler import policy

pytestmark = pytest.mark.timeout(60)

ALPHA = 1000
BETA = 5000


def pe(engine_id: str, tok: int, node: str = "n0", seq: int = 0) -> policy.EngineView:
    return policy.EngineView(engine_id=engine_id, node=node, seq=seq, tok=tok)


def de(engine_id: str, tok: int, seq: int = 0, free: int = 10_000) -> policy.EngineView:
    return policy.EngineView(engine_id=engine_id, node="d0", seq=seq, tok=tok, free_hbm_bytes=free)


def req(request_id: str, tokens: int, hbm: int = 0) -> policy.RequestView:
    return policy.RequestView(request_id=request_id, tokens=tokens, hbm_bytes=hbm)


# --- PE selection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "engines", "rq", "expected_engine", "expected_category"),
    [
        (
            "C_short preferred over C_long even when the C_short engine has more tokens",
            [pe("long", 10, node="busy"), pe("short", 4000, node="idle")],
            {"busy": ALPHA + 1, "idle": ALPHA},
            "short",
            "short",
        ),
        (
            "argmin tok inside C_short",
            [pe("a", 300), pe("b", 200), pe("c", 250)],
            {},
            "b",
            "short",
        ),
        (
            "C_long used when no engine is in C_short",
            [pe("a", 300, node="x"), pe("b", 100, node="y")],
            {"x": ALPHA + 5, "y": ALPHA + 50},
            "b",
            "long",
        ),
        (
            "C_over never chosen, even with the shortest read queue",
            [pe("over", BETA + 1, node="idle"), pe("long", BETA, node="busy")],
            {"idle": 0, "busy": ALPHA * 10},
            "long",
            "long",
        ),
        (
            "tok exactly beta is not over; rq exactly alpha is short",
            [pe("edge", BETA, node="n")],
            {"n": ALPHA},
            "edge",
            "short",
        ),
        (
            "ties in tok go to the first engine (leader rank order)",
            [pe("first", 7), pe("second", 7)],
            {},
            "first",
            "short",
        ),
    ],
)
def test_pe_selection_table(
    case: str,
    engines: list[policy.EngineView],
    rq: dict[str, int],
    expected_engine: str,
    expected_category: str,
) -> None:
    result = policy.select_prefill_engines([req("r", 10)], engines, rq, ALPHA, BETA)
    assert [(a.engine_id, a.category) for a in result.assignments] == [
        (expected_engine, expected_category)
    ], case


def test_pe_fetch_stops_when_every_engine_is_over_beta_and_keeps_fifo() -> None:
    engines = [pe("a", BETA - 100), pe("b", BETA + 1)]
    queue = [req("r1", 150), req("r2", 1), req("r3", 1)]
    result = policy.select_prefill_engines(queue, engines, {}, ALPHA, BETA)
    # r1 pushes "a" over beta; then nobody may take r2, and r3 must not overtake r2.
    assert [a.request_id for a in result.assignments] == ["r1"]
    assert result.stop == "all_overloaded"
    assert result.tok["a"] == BETA + 50


def test_pe_fetch_updates_tok_after_each_assignment() -> None:
    engines = [pe("a", 0), pe("b", 50)]
    queue = [req("r1", 100), req("r2", 100), req("r3", 10)]
    result = policy.select_prefill_engines(queue, engines, {}, ALPHA, BETA)
    assert [(a.request_id, a.engine_id) for a in result.assignments] == [
        ("r1", "a"),
        ("r2", "b"),
        ("r3", "a"),
    ]
    assert result.stop == "empty"
    assert dict(result.tok) == {"a": 110, "b": 150}


def test_pe_fetch_respects_the_assignment_limit() -> None:
    result = policy.select_prefill_engines(
        [req("r1", 1), req("r2", 1)], [pe("a", 0)], {}, ALPHA, BETA, max_assignments=1
    )
    assert [a.request_id for a in result.assignments] == ["r1"]
    assert result.stop == "limit"


# --- DE selection ------------------------------------------------------------------------------


def test_phase1_sends_each_request_to_the_least_loaded_group_and_spreads_a_burst() -> None:
    queue = [req("r1", 100), req("r2", 100), req("r3", 100)]
    result = policy.distribute_to_decode_groups(queue, {"g0": 150, "g1": 0})
    assert result == {"g1": ["r1", "r2"], "g0": ["r3"]}  # loads 0->100->200 vs 150


def test_phase1_with_no_available_group_distributes_nothing() -> None:
    assert policy.distribute_to_decode_groups([req("r1", 1)], {}) == {}


def test_de_low_token_engines_are_chosen_by_fewest_requests() -> None:
    # Z = 1.05 * (1 + 300) / 3 = 105.35 and 100 + 1 <= Z for all: the fewest requests wins.
    engines = [de("a", 100, seq=5), de("b", 100, seq=2), de("c", 100, seq=3)]
    result = policy.select_decode_engines([req("r", 1)], engines)
    assert [(a.engine_id, a.choice) for a in result.assignments] == [("b", "normal")]


def test_de_z_threshold_excludes_high_token_engines_from_the_seq_rule() -> None:
    # Z = 1.05 * (10 + 0 + 300) / 2 = 162.75. "busy" has fewer requests but 300 + 10 > Z.
    engines = [de("busy", 300, seq=1), de("light", 0, seq=9)]
    result = policy.select_decode_engines([req("r", 10)], engines)
    assert result.z_tokens == pytest.approx(162.75)
    assert [(a.engine_id, a.choice) for a in result.assignments] == [("light", "normal")]


def test_de_falls_back_to_argmin_tok_among_fitting_engines_when_none_is_low() -> None:
    # A big request: Z = 1.05 * (1000 + 100 + 200) / 2 = 682.5; both exceed Z with it.
    engines = [de("a", 200, seq=0), de("b", 100, seq=5)]
    result = policy.select_decode_engines([req("big", 1000)], engines)
    assert [(a.engine_id, a.choice) for a in result.assignments] == [("b", "high_token")]


def test_de_only_engines_with_enough_free_hbm_are_considered() -> None:
    engines = [de("full", 0, free=99), de("roomy", 500, free=100)]
    result = policy.select_decode_engines([req("r", 10, hbm=100)], engines)
    assert [a.engine_id for a in result.assignments] == ["roomy"]
    assert result.free_hbm_bytes["roomy"] == 0


def test_de_fetch_stops_when_nothing_fits_and_keeps_private_order() -> None:
    engines = [de("a", 0, free=150), de("b", 0, free=150)]
    queue = [req("r1", 10, hbm=100), req("r2", 10, hbm=100), req("r3", 10, hbm=100), req("r4", 1, hbm=1)]
    result = policy.select_decode_engines(queue, engines)
    assert [a.request_id for a in result.assignments] == ["r1", "r2"]
    assert result.stop == "no_hbm"


def test_de_bookkeeping_updates_tok_seq_and_hbm() -> None:
    result = policy.select_decode_engines([req("r1", 10, hbm=5), req("r2", 10, hbm=5)], [de("a", 0)])
    assert (result.tok["a"], result.seq["a"], result.free_hbm_bytes["a"]) == (20, 2, 9_990)


def test_de_z_uses_only_the_prefix_that_fits_in_group_hbm() -> None:
    # Free 100 in total: only r1 (hbm 60) fits; r2 (hbm 60) would not, so Z = 1.05*(40+0)/1.
    result = policy.select_decode_engines(
        [req("r1", 40, hbm=60), req("r2", 1000, hbm=60)], [de("a", 0, free=100)]
    )
    assert result.z_tokens == pytest.approx(42.0)


# --- read side ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rq", "expected"),
    [
        ({"p": 10, "d": 20}, "pe"),
        ({"p": 20, "d": 10}, "de"),
        ({"p": 15, "d": 15}, "pe"),  # tie: PE (the paper's <=)
        ({}, "pe"),  # both empty: tie
    ],
)
def test_read_side_is_the_shorter_read_queue(rq: dict[str, int], expected: str) -> None:
    assert policy.choose_read_side("p", "d", rq) == expected


def test_plan_read_paper_rule_reads_the_whole_request_on_one_side() -> None:
    plan = policy.plan_read("shorter_queue", False, 3, 64, "p", "d", {"p": 500, "d": 100}, 10.0, {}, 1.0)
    assert plan.sides == ("de", "de", "de")
    assert (plan.pe_tokens, plan.de_tokens, plan.primary) == (0, 192, "de")


@pytest.mark.parametrize(("mode", "side"), [("pe_only", "pe"), ("de_only", "de")])
def test_forced_read_modes_ignore_queues(mode: policy.ReadMode, side: str) -> None:
    plan = policy.plan_read(mode, True, 2, 64, "p", "d", {"p": 10**9, "d": 10**9}, 1.0, {}, 1.0)
    assert plan.sides == (side, side)


def test_weights_aware_prefers_the_faster_storage_nic_with_a_longer_queue() -> None:
    # PE node: 1000 tokens queued at 1 GB/s; DE node: 1500 tokens at 4 GB/s -> DE finishes first.
    capacity = {"p": 1e9, "d": 4e9}
    plan = policy.plan_read(
        "weights_aware", False, 1, 64, "p", "d", {"p": 1000, "d": 1500}, 1e6, capacity, 1e9
    )
    assert plan.primary == "de"
    paper = policy.plan_read(
        "shorter_queue", False, 1, 64, "p", "d", {"p": 1000, "d": 1500}, 1e6, capacity, 1e9
    )
    assert paper.primary == "pe"


def test_weights_aware_with_equal_capacities_matches_the_paper_rule() -> None:
    for rq in ({"p": 1, "d": 2}, {"p": 2, "d": 1}, {"p": 3, "d": 3}):
        weighted = policy.plan_read("weights_aware", False, 2, 64, "p", "d", rq, 100.0, {}, 5e9)
        assert weighted.primary == policy.choose_read_side("p", "d", rq)


def test_split_read_balances_finish_times() -> None:
    # Empty queues, DE NIC three times faster: 1 of 4 blocks on the PE side finishes both together.
    k = policy.split_blocks(4, 100.0, 0.0, 0.0, 1.0, 3.0)
    assert k == 1
    # A long PE queue moves everything to the DE side.
    assert policy.split_blocks(4, 100.0, 10_000.0, 0.0, 1.0, 1.0) == 0


def test_expected_wait_handles_zero_capacity() -> None:
    assert policy.expected_wait_seconds(0, 0) == 0.0
    assert policy.expected_wait_seconds(10, 0) == float("inf")
    assert policy.expected_wait_seconds(10, 5) == 2.0


# --- properties --------------------------------------------------------------------------------

engine_lists = st.lists(
    st.tuples(st.integers(0, 3 * BETA), st.sampled_from(["n0", "n1", "n2"])), min_size=1, max_size=8
)
request_lists = st.lists(st.integers(1, 2 * BETA), min_size=0, max_size=30)
read_queues = st.dictionaries(st.sampled_from(["n0", "n1", "n2"]), st.integers(0, 3 * ALPHA))


@settings(max_examples=200, deadline=None)
@given(engine_lists, request_lists, read_queues)
def test_property_no_pe_over_beta_gets_work_and_each_request_once_in_fifo_order(
    engine_specs: list[tuple[int, str]], sizes: list[int], rq: dict[str, int]
) -> None:
    engines = [pe(f"e{i}", tok, node) for i, (tok, node) in enumerate(engine_specs)]
    queue = [req(f"r{i}", size) for i, size in enumerate(sizes)]
    result = policy.select_prefill_engines(queue, engines, rq, ALPHA, BETA)
    tok = {e.engine_id: e.tok for e in engines}
    ids = [a.request_id for a in result.assignments]
    assert ids == [r.request_id for r in queue[: len(ids)]]  # FIFO prefix, each at most once
    for assignment, request in zip(result.assignments, queue, strict=False):
        assert tok[assignment.engine_id] <= BETA  # never an engine over beta at decision time
        tok[assignment.engine_id] += request.tokens
    assert tok == dict(result.tok)
    if len(ids) < len(queue):
        assert all(t > BETA for t in tok.values())


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2000), st.integers(0, 10), st.integers(0, 3000)), min_size=1, max_size=8
    ),
    st.lists(st.tuples(st.integers(1, 500), st.integers(0, 1500)), max_size=30),
)
def test_property_de_assignments_fit_hbm_and_take_a_prefix_once(
    engine_specs: list[tuple[int, int, int]], request_specs: list[tuple[int, int]]
) -> None:
    engines = [de(f"e{i}", tok, seq=s, free=free) for i, (tok, s, free) in enumerate(engine_specs)]
    queue = [req(f"r{i}", tokens, hbm) for i, (tokens, hbm) in enumerate(request_specs)]
    result = policy.select_decode_engines(queue, engines)
    ids = [a.request_id for a in result.assignments]
    assert ids == [r.request_id for r in queue[: len(ids)]]
    assert all(v >= 0 for v in result.free_hbm_bytes.values())
    if result.stop == "no_hbm":
        blocked = queue[len(ids)]
        assert all(v < blocked.hbm_bytes for v in result.free_hbm_bytes.values())


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 200),
    st.floats(1, 1e6),
    st.floats(0, 1e9),
    st.floats(0, 1e9),
    st.floats(0, 1e10),
    st.floats(0, 1e10),
)
def test_property_split_read_covers_all_blocks_once_and_beats_one_side(
    n: int, block: float, q_pe: float, q_de: float, c_pe: float, c_de: float
) -> None:
    k = policy.split_blocks(n, block, q_pe, q_de, c_pe, c_de)
    assert 0 <= k <= n
    plan = policy.plan_read("weights_aware", True, n, 64, "p", "d", {}, 1.0, {"p": c_pe, "d": c_de}, 1.0)
    assert len(plan.sides) == n
    assert plan.pe_tokens + plan.de_tokens == n * 64
    assert plan.sides == tuple(sorted(plan.sides, key=lambda s: s != "pe"))  # PE prefix, DE suffix
    if n and c_pe > 0 and c_de > 0:

        def finish(j: int) -> float:
            pe_t = (q_pe + j * block) / c_pe if j else 0.0
            de_t = (q_de + (n - j) * block) / c_de if j < n else 0.0
            return max(pe_t, de_t)

        assert finish(k) <= min(finish(0), finish(n)) * (1 + 1e-9)
