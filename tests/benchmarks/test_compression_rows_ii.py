import rewrite  # noqa: F401  (before benchmarks: registers the passes)
from benchmarks.compression_rows_ii import rows_ii
from rewrite.passinfra import parse_pass


def test_rows_are_distinct_and_survive_the_cli_grammar():
    rows = rows_ii()
    assert len({label for label, _ in rows}) == len(rows)
    assert {cp.name for _, cp in rows} == {"tt", "prune-dims", "hot-cold"}
    for _, cp in rows:
        assert parse_pass(str(cp)) == cp
