"""The Pareto frontier: non-dominated, spans the extremes, plots."""

import itertools

from rewrite.cost.pareto import dominated, frontier, plot
from rewrite.cost.ilp import Constraints, solve
from tests.rewrite.cost.test_select import problem


def test_frontier_is_exactly_the_non_dominated_set_of_all_plans():
    p = problem()
    front = frontier(p, 512, max_auc_drop=0.001, labelled=True)
    keys = ("bytes", "latency_s", "auc_drop_sum")
    for a, b in itertools.permutations(front, 2):
        assert not dominated(a, b)
    # brute force: every combination's point; the non-dominated ones must all be on the frontier
    every = []
    for combo in itertools.product(*(p.variants[t] for t in p.tables)):
        choice = dict(zip(p.tables, combo))
        every.append({"bytes": p.footprint(choice).total, "latency_s": p.plan_cost(choice, 512).total,
                      "auc_drop_sum": sum(v.auc_drop for v in combo)})
    best = [a for a in every if not any(dominated(a, b) for b in every)]
    got = {tuple(round(d[k], 15) for k in keys) for d in front}
    assert got == {tuple(round(d[k], 15) for k in keys) for d in best}
    smallest = solve(p, Constraints(), 512, objective="memory").choice
    assert front[0]["bytes"] == p.footprint(smallest).total


def test_plot_writes_an_image(tmp_path):
    p = problem()
    front = frontier(p, 512, None, labelled=False)
    plot(front, front[0], tmp_path / "pareto.png", "test")
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
