"""The trade-off curve of issue 27 (benchmarks/unlearning/tradeoff.py): rows, curve points and the PNG,
on hand-made figures (no model is run)."""

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def to():
    yield from benchmark_module("tradeoff")


def figures(forget, heldout, retain=1.0, ppl=31.08):
    return {"forget_accuracy": forget, "heldout_accuracy": heldout, "retain_accuracy": retain,
            "general_perplexity": ppl, "forget_loss": 1.0}


def test_point_row_converts_fractions_to_percent(to):
    row = to.point_row("eul-bounds", 4, 0, figures(0.2, 16 / 17, 1.0, 31.456), 12.34)
    assert row == {"method": "eul-bounds", "epochs": 4, "seed": 0, "forget_acc_pct": 20.0,
                   "heldout_acc_pct": 94.1, "retain_acc_pct": 100.0, "general_ppl": 31.46, "damaged": False,
                   "time_s": 12.3}
    assert to.point_row("original", 0, None, figures(1, 1, ppl=None))["general_ppl"] is None


def hand_rows(to):
    rows = [to.point_row("original", 0, None, figures(1.0, 1.0))]
    # out of order on purpose, two seeds for eul-bounds at 4 epochs
    for method, epochs, seed, f, h in [("eul-bounds", 4, 0, 0.0, 0.8), ("eul-bounds", 1, 0, 0.8, 1.0),
                                       ("eul-bounds", 4, 1, 0.2, 0.9), ("eul-bounds", 2, 0, 0.4, 0.9),
                                       ("npo-layers", 2, 0, 0.0, 0.3), ("npo-layers", 1, 0, 0.6, 0.7)]:
        rows.append(to.point_row(method, epochs, seed, figures(f, h), 1.0))
    return rows


def test_curve_points_are_ordered_by_strength_and_averaged_over_seeds(to):
    points = to.curve_points(hand_rows(to))
    assert set(points) == {"eul-bounds", "npo-layers"}  # the original is no curve
    assert [p["epochs"] for p in points["eul-bounds"]] == [1, 2, 4]
    assert [p["epochs"] for p in points["npo-layers"]] == [1, 2]
    four = points["eul-bounds"][-1]
    assert four["n"] == 2 and four["forget"] == pytest.approx(10.0) and four["heldout"] == pytest.approx(85.0)
    assert [p["heldout"] for p in points["npo-layers"]] == [70.0, 30.0]


def test_plot_writes_a_png_to_every_path(to, tmp_path):
    paths = [tmp_path / "a" / "tradeoff.png", tmp_path / "b.png"]
    to.plot(hand_rows(to), paths, "hand-made")
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_merged_rows_keep_one_original_and_every_runs_points(to):
    first = hand_rows(to)
    second = [to.point_row("original", 0, None, figures(1.0, 0.5)),  # not the first run's: dropped
              to.point_row("eul-margin-penalty-routes", 12, 0, figures(0.0, 0.96), 1.0)]
    rows = to.merged_rows([first, second])
    assert [r["method"] for r in rows].count("original") == 1 and rows[0]["heldout_acc_pct"] == 100.0
    assert rows[1:] == first[1:] + second[1:]
    assert set(to.curve_points(rows)) == {"eul-bounds", "npo-layers", "eul-margin-penalty-routes"}


def test_every_default_method_has_a_legend_label(to):
    methods = [to.eul_method(o) for o in ("bounds", "margin-penalty", "margin-penalty-routes")] + [f"{b}-layers" for b in to.BASELINES]
    assert all(m in to.LABELS and m in to.STYLE for m in methods)
    assert "old default" in to.LABELS["eul-bounds"] and "base frozen" in to.LABELS["npo-layers"]
