"""The figures' readable parts: one colour scale across methods, a labelled colour bar with the
count uniform sketches expect, short module labels, integer round ticks, and titles that say
what was run."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.ticker import MaxNLocator

from fslora_min import plots
from fslora_min.study import plots as plots_compare
from fslora_min.experiment import describe, write_outputs
from tests.tiny import tiny_experiment, tiny_federation


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions close, kept open for inspection."""
    kept, close = [], plt.close
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def test_module_labels_name_each_block_once_then_the_projections():
    names = [f"blocks.{b}.{part}.{p}" for b in range(2)
             for part, ps in (("attn", "q k v out"), ("mlp", "fc proj")) for p in ps.split()]
    assert plots.module_labels(names) == ["block 0: q", "k", "v", "out", "fc", "proj",
                                          "block 1: q", "k", "v", "out", "fc", "proj"]


def test_expected_count_is_what_uniform_sketches_expect():
    fed = tiny_federation([1, 2, 4], 4)
    history = fed.run(progress=False)
    cov = np.array(list(history.coverage.values()))  # (modules, r)
    # each update of a rank-k client trains each of the r indices with probability k / r
    expected = sum(k / 4 for r in history.rounds for k, c in zip(r.client_ranks, r.participants)
                   if c not in r.dropped and c not in r.rejected)
    assert plots.expected_count(cov) == pytest.approx(expected, rel=1e-12)


def test_compare_coverage_puts_every_method_on_one_colour_scale(figures, tmp_path):
    rng = np.random.default_rng(0)
    names = [f"blocks.0.attn.{p}" for p in "qkv"]
    rows = [SimpleNamespace(label=label, runs=[{"coverage": {n: rng.integers(lo, hi, 4).tolist()
                                                             for n in names}}])
            for label, lo, hi in (("fslora", 260, 330), ("fslora-topk", 9, 630))]
    plots_compare.plot_coverage(rows, "what was run", tmp_path / "coverage.png")
    fig, = figures
    images = [im for ax in fig.axes for im in ax.get_images()]
    vmax = max(max(max(c) for c in row.runs[0]["coverage"].values()) for row in rows)
    assert len(images) == 2 and all(im.get_clim() == (0, vmax) for im in images)
    assert any(ax.get_ylabel().startswith("times trained") for ax in fig.axes)  # one colour bar
    assert fig.get_suptitle() == "what was run"
    assert "expected under uniform sketches" in fig.axes[0].get_title()


def test_demo_figure_says_what_was_run_and_marks_the_expected_count(figures, tmp_path):
    cfg = tiny_experiment(str(tmp_path), rounds=3)
    fed = tiny_federation([1, 2, 4], 4)
    history = fed.run(progress=False)
    info = {"wall_seconds": 0.0}
    write_outputs(cfg, history, info)
    fig, = figures
    assert fig.get_suptitle() == describe(cfg)
    assert "4 clients (4 a round), 3 rounds of H = 4 local steps, seed 0" in describe(cfg)
    loss, acc, _, heatmap, bar = fig.axes
    for ax in (loss, acc):
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            "each client, on its own held-out set", "global model, on the global held-out set"]
        assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
        assert all(float(t).is_integer() for t in ax.get_xticks())
    assert bar.get_ylabel() == "times trained"
    cov = np.array(list(history.coverage.values()))
    assert [line.get_ydata()[0] for line in bar.lines] == [pytest.approx(cov.mean())]
    assert heatmap.get_yticklabels()[0].get_text() == "block 0: q"
