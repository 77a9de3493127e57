"""The read-side tie-break extension: ``prefill`` keeps the paper's rule, ``least_read`` evens NIC bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_engine.scheduler import policy

pytestmark = pytest.mark.timeout(60)

# --- choose_read_side --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "rq", "read", "tie_break", "expected"),
    [
        ("tie, default rule: PE even though it read more", {}, {"p": 900, "d": 0}, "prefill", "pe"),
        (
            "tie, least_read: the DE node read less",
            {"p": 7, "d": 7},
            {"p": 900, "d": 100},
            "least_read",
            "de",
        ),
        ("tie, least_read: the PE node read less", {}, {"p": 100, "d": 900}, "least_read", "pe"),
        ("tie, least_read: equal counts go to the PE", {}, {"p": 500, "d": 500}, "least_read", "pe"),
        ("tie, least_read: a node never counted has read 0", {}, {"p": 64}, "least_read", "de"),
        ("tie, least_read: nothing counted yet", {}, {}, "least_read", "pe"),
        (
            "no tie: shorter PE queue wins over fewer DE reads",
            {"p": 10, "d": 20},
            {"p": 900},
            "least_read",
            "pe",
        ),
        (
            "no tie: shorter DE queue wins over fewer PE reads",
            {"p": 20, "d": 10},
            {"d": 900},
            "least_read",
            "de",
        ),
    ],
)
def test_choose_read_side_tie_break(
    case: str, rq: dict[str, int], read: dict[str, float], tie_break: policy.TieBreak, expected: str
) -> None:
    assert policy.choose_read_side("p", "d", rq, tie_break=tie_break, read_tokens=read) == expected, case


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["p", "d"]), st.integers(0, 50)),
    st.dictionaries(st.sampled_from(["p", "d"]), st.integers(0, 50)),
)
def test_property_default_is_the_paper_rule_and_least_read_changes_only_ties(
    rq: dict[str, int], read: dict[str, int]
) -> None:
    paper = "pe" if rq.get("p", 0) <= rq.get("d", 0) else "de"
    assert policy.choose_read_side("p", "d", rq) == paper
    assert policy.choose_read_side("p", "d", rq, read_tokens=read) == paper  # counts alone change nothing
    least = policy.choose_read_side("p", "d", rq, tie_break="least_read", read_tokens=read)
    if rq.get("p", 0) != rq.get("d", 0):
        assert least == paper
    else:
        assert least == ("de" if read.get("d", 0) < read.get("p", 0) else "pe")


# --- choose_read_side_weighted -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "queued", "capacity", "read", "tie_break", "expected"),
    [
        ("equal finish, default: PE", (0.0, 0.0), (1e9, 1e9), (900.0, 0.0), "prefill", "pe"),
        (
            "equal finish, least_read: DE read less",
            (0.0, 0.0),
            (1e9, 1e9),
            (900.0, 100.0),
            "least_read",
            "de",
        ),
        (
            "equal finish, least_read: PE read less",
            (0.0, 0.0),
            (1e9, 1e9),
            (100.0, 900.0),
            "least_read",
            "pe",
        ),
        ("equal finish, least_read: equal counts", (0.0, 0.0), (1e9, 1e9), (5.0, 5.0), "least_read", "pe"),
        # PE: (0 + 100) / 1 = 100 s; DE: (100 + 100) / 2 = 100 s -> a tie on finish time, not on queues.
        ("tie by capacity, least_read", (0.0, 100.0), (1.0, 2.0), (900.0, 100.0), "least_read", "de"),
        ("no tie: PE finishes first", (0.0, 300.0), (1.0, 2.0), (900.0, 0.0), "least_read", "pe"),
        ("no tie: DE finishes first", (50.0, 0.0), (1.0, 1.0), (0.0, 900.0), "least_read", "de"),
    ],
)
def test_weighted_read_side_tie_break(
    case: str,
    queued: tuple[float, float],
    capacity: tuple[float, float],
    read: tuple[float, float],
    tie_break: policy.TieBreak,
    expected: str,
) -> None:
    side = policy.choose_read_side_weighted(
        queued[0],
        queued[1],
        capacity[0],
        capacity[1],
        100.0,
        tie_break=tie_break,
        pe_read_tokens=read[0],
        de_read_tokens=read[1],
    )
    assert side == expected, case


# --- plan_read ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["shorter_queue", "weights_aware"])
def test_plan_read_passes_the_tie_break_to_both_whole_request_rules(mode: policy.ReadMode) -> None:
    read = {"p": 640.0, "d0": 128.0}
    default = policy.plan_read(mode, False, 2, 64, "p", "d0", {}, 10.0, {}, 1e9, read_tokens=read)
    least = policy.plan_read(
        mode, False, 2, 64, "p", "d0", {}, 10.0, {}, 1e9, tie_break="least_read", read_tokens=read
    )
    assert (default.primary, default.pe_tokens, default.de_tokens) == ("pe", 128, 0)
    assert (least.primary, least.sides, least.pe_tokens, least.de_tokens) == ("de", ("de", "de"), 0, 128)


@pytest.mark.parametrize(("mode", "split"), [("pe_only", False), ("de_only", False), ("shorter_queue", True)])
def test_forced_sides_and_split_reads_ignore_the_tie_break(mode: policy.ReadMode, split: bool) -> None:
    read = {"p": 10**6}
    default = policy.plan_read(mode, split, 3, 64, "p", "d", {}, 10.0, {}, 1e9)
    least = policy.plan_read(
        mode, split, 3, 64, "p", "d", {}, 10.0, {}, 1e9, tie_break="least_read", read_tokens=read
    )
    assert least == default


# --- a 1P2D stream where every decision is a tie -----------------------------------------------

PE_NODE = "np"
DE_NODES = ("nd0", "nd1")


def replay(
    de_choices: list[int], blocks: int, tie_break: policy.TieBreak, mode: policy.ReadMode
) -> list[dict[str, float]]:
    """Bind equal-size requests one after another (read queues always empty, as with sequential turns):
    the per-node cumulative read tokens after each request, counted as ``scheduler.state`` does."""
    read: dict[str, float] = {PE_NODE: 0.0, **dict.fromkeys(DE_NODES, 0.0)}
    history = []
    for choice in de_choices:
        de_node = DE_NODES[choice]
        plan = policy.plan_read(
            mode, False, blocks, 64, PE_NODE, de_node, {}, 2.0, {}, 1e9, tie_break=tie_break, read_tokens=read
        )
        read[PE_NODE] += plan.pe_tokens
        read[de_node] += plan.de_tokens
        history.append(dict(read))
    return history


modes = st.sampled_from(["shorter_queue", "weights_aware"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1), min_size=1, max_size=60), st.integers(1, 8), modes)
def test_property_least_read_keeps_the_pe_node_within_one_request_of_the_busiest_de_node(
    de_choices: list[int], blocks: int, mode: policy.ReadMode
) -> None:
    # Whatever DE the decode selection picks, the PE node (a candidate for every request) never reads
    # more than one request above the busiest DE node, and no DE node reads more than the PE node.
    request = blocks * 64
    for read in replay(de_choices, blocks, "least_read", mode):
        busiest_de = max(read[d] for d in DE_NODES)
        assert all(read[d] <= read[PE_NODE] for d in DE_NODES)
        assert read[PE_NODE] <= busiest_de + request
    default = replay(de_choices, blocks, "prefill", mode)[-1]
    assert default[PE_NODE] == len(de_choices) * request  # the paper's rule: the PE node reads all


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=30), st.integers(1, 8), modes)
def test_property_least_read_spreads_a_balanced_1p2d_stream_over_all_three_nodes(
    pair_orders: list[bool], blocks: int, mode: policy.ReadMode
) -> None:
    # DE selection alternates the two decode nodes (each pair of requests uses both, in either order):
    # at every point the three nodes' reads differ by at most two requests, so each reads about a third.
    de_choices = [c for swap in pair_orders for c in ((1, 0) if swap else (0, 1))]
    request = blocks * 64
    history = replay(de_choices, blocks, "least_read", mode)
    for read in history:
        assert max(read.values()) - min(read.values()) <= 2 * request
    if not any(pair_orders):  # strict alternation: within one request
        assert all(max(r.values()) - min(r.values()) <= request for r in history)
