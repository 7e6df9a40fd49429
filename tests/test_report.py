"""Result tables: the paper's language columns."""

from xlm_jax.tasks import report


def test_results_table_has_the_papers_column_order(tmp_path):
    record = {"epoch": 2, "step": 10, "valid/de/acc": 40.0, "valid/en/acc": 50.0}
    record |= {"valid/fr/acc": 45.0, "valid/avg/acc": 45.0}
    results = {"history": [record], "selected": {"en": record, "avg": record}}
    columns, rows = report.result_rows(results)
    assert columns == ["row", "epoch", "en", "fr", "de", "avg"]
    assert rows[0]["en"] == 50.0 and rows[0]["epoch"] == 2
