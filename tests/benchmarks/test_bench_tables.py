"""benchmarks/tables.py: results files become the README tables; a malformed file is named in the error;
--check fails on out-of-date tables, and the repository's tables are up to date."""

import importlib.util
import json

import pytest
from conftest import REPO_ROOT

BENCH = REPO_ROOT / "benchmarks"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("bench_tables", BENCH / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results(date, machine, rows, command="python benchmarks/gpu_step.py --cpu"):
    return {"benchmark": "whole_step", "date": date, "machine": machine,
            "versions": {"python": "3.12.1", "torch": "2.13.0+cpu", "triton": None, "transformers": None,
                         "unlearn_fast": None},
            "command": command, "rows": rows, "notes": "a test run"}


@pytest.fixture
def two_runs(tmp_path):
    old = results("2026-01-02T10:00:00Z", {"cpu": "Test CPU 9000", "cores": 2, "gpu": None},
                  [{"mode": "naive", "s_per_step": 4.8123},
                   {"mode": "fused+cache", "s_per_step": 2.36, "x_naive": 2.04}])
    new = results("2026-03-04T10:00:00Z", {"cpu": "x", "cores": 16, "gpu": "Test GPU H999"},
                  [{"mode": "naive", "s_per_step": 0.5},
                   {"mode": "fused+cache", "s_per_step": 0.21, "x_naive": {"mean": 2.38, "sd": 0.05}, "mfu_pct": 41.5}])
    (tmp_path / "a.json").write_text(json.dumps(old))
    (tmp_path / "b.json").write_text(json.dumps(new))
    return tmp_path


def test_table_holds_both_runs_newest_first(tables, two_runs):
    text = tables.render(tables.load_results(two_runs), tables.MAIN)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| run | date | machine | mode | s per step | x naive |") and "mfu %" in table[0]
    rows = table[1:]
    assert len(rows) == 4
    assert rows[0].startswith("| 1 | 2026-03-04 | Test GPU H999 | naive | 0.5 |")
    assert "| fused+cache | 0.21 | 2.38 ± 0.05 | 41.5 |" in rows[1]
    assert rows[2].startswith("| 2 | 2026-01-02 | Test CPU 9000, 2 cores | naive | 4.8123 |")
    assert "| 2.36 | 2.04 |" in rows[3]
    assert "`python benchmarks/gpu_step.py --cpu`" in text and "torch 2.13.0+cpu" in text and "a test run" in text


def test_readme_tables_replaced_between_markers(tables, two_runs):
    generated = tables.render(tables.load_results(two_runs), tables.MAIN)
    readme = f"# Guide\n\ntext\n\n{tables.BEGIN}\nold table 1.23\n{tables.END}\n"
    new = tables.replace_tables(readme, generated)
    assert new.startswith("# Guide\n\ntext\n\n") and "old table" not in new and "4.8123" in new
    assert tables.replace_tables(new, generated) == new  # regenerating changes nothing
    with pytest.raises(tables.ResultsError, match="tables:begin"):
        tables.replace_tables("# no markers\n", generated)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not readable as JSON"),
    (json.dumps({"benchmark": "whole_step", "rows": []}), "missing 'date', 'machine', 'versions', 'command'"),
    (json.dumps(dict(results(None, {}, []), rows={"mode": "naive"})), "'rows' is not a list of objects"),
])
def test_malformed_file_gives_a_clear_error(tables, two_runs, content, message):
    (two_runs / "broken.json").write_text(content)
    with pytest.raises(tables.ResultsError, match=r"broken\.json") as err:
        tables.load_results(two_runs)
    assert message in str(err.value)


def test_check_fails_until_tables_are_regenerated(tables, two_runs, tmp_path, monkeypatch, capsys):
    readmes = {}
    for which in (tables.MAIN, tables.UNLEARNING):
        readmes[which] = tmp_path / f"{which}.md"
        readmes[which].write_text(f"# {which}\n\n{tables.BEGIN}\n{tables.END}\n")
    monkeypatch.setattr(tables, "READMES", readmes)
    assert tables.main(["--check", "--results", str(two_runs)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert tables.main(["--results", str(two_runs)]) == 0
    assert "0.21" in readmes[tables.MAIN].read_text()
    assert tables.main(["--check", "--results", str(two_runs)]) == 0
    (two_runs / "broken.json").write_text("[]")
    assert tables.main(["--check", "--results", str(two_runs)]) == 2
    assert "broken.json" in capsys.readouterr().err


def test_repository_tables_are_up_to_date(tables):
    """benchmarks/README.md and benchmarks/unlearning/README.md match benchmarks/results/
    (after adding a results file: python benchmarks/tables.py)."""
    assert tables.main(["--check"]) == 0
