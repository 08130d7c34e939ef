"""`flextron report`: what a reader of index.html sees, and what a crafted run directory cannot do."""

import base64
import hashlib
import json
import math
import shutil
from html.parser import HTMLParser

import pandas as pd
import pytest

from flextron.errors import FlextronError
from reports.build import ReportConfig, build_report

REGIME = "prefill:b1:s64"


@pytest.fixture(scope="module")
def searched(tiny_run, tmp_path_factory, profiled_copy):
    """A profiled, fitted, searched and verified tiny run (search results in RUN/search/<regime>/<weights>/)."""
    from flextron.elastic import ElasticModel
    from profiler.latency_model import LatencyModels
    from search.optuna_search import SearchConfig, feasible_range, search
    from search.verify import VerifyConfig, verify

    run = profiled_copy(tiny_run, tmp_path_factory.mktemp("report") / "run", REGIME, 8)
    models = LatencyModels.load(run)
    lo, hi = feasible_range(models.get(models.resolve(None)), ElasticModel.load(run / "elastic").spec)
    budgets = (3 * hi, 4 * hi)  # generous: CPU timing noise
    search(SearchConfig(run=str(run), budget_ms=budgets, trials=3, eval_windows=2, eval_seq_len=32))
    verify(VerifyConfig(run=str(run), rounds=2, reps=2, warmup=1))
    return run


@pytest.fixture
def run(searched, tmp_path):
    """A private copy of the searched run, for tests that change or break its artifacts."""
    dst = tmp_path / "run"
    shutil.copytree(searched, dst, ignore=shutil.ignore_patterns("reports"))
    return dst


class _Page(HTMLParser):
    """The parts of index.html a reader sees: headings, table rows (cell texts), images, captions, text."""

    def __init__(self, text: str):
        super().__init__()
        self.headings, self.rows, self.imgs, self.captions, self.tags = [], [], [], [], []
        self._text, self._row, self._in = [], None, []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in.append(tag)
        if tag == "tr":
            self._row = []
        elif tag == "img":
            self.imgs.append(dict(attrs)["src"])
        if tag in ("h1", "h2", "td", "th", "figcaption"):
            self._text = []

    def handle_endtag(self, tag):
        if self._in and self._in[-1] == tag:
            self._in.pop()
        text = "".join(self._text).strip()
        if tag in ("h1", "h2"):
            self.headings.append(text)
        elif tag in ("td", "th") and self._row is not None:
            self._row.append(text)
        elif tag == "tr":
            self.rows.append(self._row)
            self._row = None
        elif tag == "figcaption":
            self.captions.append(text)

    def handle_data(self, data):
        self._text.append(data)


def _page(run) -> _Page:
    return _Page((run / "reports" / "index.html").read_text())


def _regime(run) -> str:
    return str(pd.read_parquet(run / "profile" / "e2e.parquet")["regime"].iloc[0])


def test_report_tables_show_the_latency_models_heldout_error_and_the_verified_budgets(searched):
    build_report(ReportConfig(run=str(searched)))
    page = _page(searched)
    assert page.headings[0] == "flextron report" and "pre" not in page.tags
    assert not any(h.startswith("#") for h in page.headings)
    regime = _regime(searched)
    held = json.loads((searched / "latency_model" / "metrics.json").read_text())[regime]["heldout"]
    assert [regime, f"{held['mape_pct']:.2f}", f"{held['max_ape_pct']:.2f}"] in [r[:3] for r in page.rows]
    verified = pd.read_parquet(searched / "verify" / "verified.parquet")
    assert len(verified) == 2  # one row per budget
    for v in verified.itertuples():
        assert [regime, "elastic", v.quantile, f"{v.budget_frac:.3f}", f"{v.budget_ms:.3f}", f"{v.predicted_latency_ms:.3f}",
                f"{v.measured_latency_ms:.3f}", f"{v.ratio:.3f}", f"{v.ratio_hi:.3f}", str(v.rounds), v.verdict,
                f"{v.ppl:.2f}", v.source] in page.rows
    summary = (searched / "reports" / "summary.md").read_text()
    assert f"| {regime} | elastic | p50 | {verified['budget_frac'].iloc[0]:.3f} | {verified['budget_ms'].iloc[0]:.3f} |" \
        in summary  # same numbers, Markdown


def test_each_figure_is_embedded_as_a_png_and_search_is_shown_per_regime_and_weights(searched):
    r = build_report(ReportConfig(run=str(searched)))
    reports = searched / "reports"
    page = _page(searched)
    assert len(page.imgs) == len(r["plots"]) >= 4
    for src, name in zip(page.imgs, r["plots"]):
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        png = base64.b64decode(src[len(prefix):])
        assert png.startswith(b"\x89PNG") and png == (reports / name).read_bytes()
    regime = _regime(searched)
    assert any(regime in c and "elastic weights" in c for c in page.captions if c.startswith("Search progress"))
    assert sorted(p.name for p in reports.iterdir()) == sorted(r["plots"] + ["index.html", "summary.md"])


def test_report_of_a_run_with_no_search_yet(run):
    shutil.rmtree(run / "search")
    shutil.rmtree(run / "verify")
    r = build_report(ReportConfig(run=str(run)))
    page = _page(run)
    assert not any(h.startswith(("Search", "Budgets")) for h in page.headings)
    assert any(h.startswith("Latency model") for h in page.headings)
    assert len(r["plots"]) == len(page.imgs) == 3  # Pareto, heatmap, predicted vs measured


def test_trained_and_one_shot_results_are_kept_apart(run):
    """A run searched with both weights: each has its own search row, figure, budgets and qualities."""
    regime = _regime(run)
    one_shot = next(run.glob("search/*/elastic"))
    trained = one_shot.with_name("trained")
    shutil.copytree(one_shot, trained)
    best = json.loads((trained / "best.json").read_text())
    best.update(weights="trained", quality_setting=best["quality_setting"] + ":trained")
    (trained / "best.json").write_text(json.dumps(best))
    pd.read_parquet(trained / "trials.parquet").assign(weights="trained").to_parquet(trained / "trials.parquet")
    setting = {"elastic": best["quality_setting"].removesuffix(":trained"), "trained": best["quality_setting"]}
    loss = {"elastic": 2.0, "trained": 1.0}
    e2e = pd.read_parquet(run / "profile" / "e2e.parquet")
    uniform = e2e[e2e["uniform"]]["config_key"].tolist()
    with open(run / "search" / "quality_cache.jsonl", "a") as f:
        for w in ("elastic", "trained"):
            for key in uniform:
                f.write(json.dumps({"key": key, "setting": setting[w], "loss": loss[w]}) + "\n")
    verified = pd.read_parquet(run / "verify" / "verified.parquet")
    pd.concat([verified, verified.assign(weights="trained", ppl=1.5)]).to_parquet(run / "verify" / "verified.parquet")

    build_report(ReportConfig(run=str(run)))
    page = _page(run)
    for w in ("elastic", "trained"):
        uniform_rows = [row for row in page.rows if row[:2] == [regime, w] and row[2] in uniform]
        assert len(uniform_rows) == len(uniform)
        assert {row[-1] for row in uniform_rows} == {f"{math.exp(loss[w]):.2f}"}  # never the other weights' loss
        assert any(c.startswith("Search progress") and f"{w} weights" in c for c in page.captions)
        assert sum(1 for row in page.rows if row[:2] == [regime, w] and len(row) == 13) == len(verified)
    assert {row[11] for row in page.rows if row[:2] == [regime, "trained"] and len(row) == 13} == {"1.50"}


def _snapshot(root, skip):
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in root.rglob("*") if p.is_file() and skip not in p.parents}


def test_crafted_regime_and_device_strings_stay_inside_reports_and_are_escaped(run, tmp_path):
    """Strings in the artifacts are data: no path outside RUN/reports, no markup in the page."""
    old = _regime(run)
    regime = "x/../../../escaped<img src=x onerror=alert(1)>"
    device = "<script>alert(1)</script> $\\frac$"
    for name in ("profile/e2e.parquet", "profile/layers.parquet", "latency_model/predictions.parquet",
                 "verify/verified.parquet"):
        df = pd.read_parquet(run / name)
        df["regime"] = df["regime"].replace(old, regime)
        if "device_name" in df:
            df["device_name"] = device
        df.to_parquet(run / name)
    metrics = json.loads((run / "latency_model" / "metrics.json").read_text())
    (run / "latency_model" / "metrics.json").write_text(json.dumps({regime: metrics[old]}))
    for best_path in run.glob("search/*/*/best.json"):
        best = json.loads(best_path.read_text())
        best_path.write_text(json.dumps({**best, "regime": regime, "weights": "w<script>x</script>"}))
    dev = json.loads((run / "profile" / "device.json").read_text())
    (run / "profile" / "device.json").write_text(json.dumps({**dev, "device_name": device}))
    for sub in ("pareto_x", "heatmap_x"):  # a crafted run can ship the folders a traversal needs
        (run / "reports" / sub).mkdir(parents=True)
    before = _snapshot(tmp_path, run / "reports")

    build_report(ReportConfig(run=str(run)))
    assert _snapshot(tmp_path, run / "reports") == before  # nothing written outside RUN/reports
    assert not (tmp_path / "escaped<img src=x onerror=alert(1)>.png").exists()
    text = (run / "reports" / "index.html").read_text()
    assert "<script" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert regime in [row[0] for row in _page(run).rows]  # shown as text, verbatim


@pytest.mark.parametrize("artifact, damage, command", [
    ("profile/e2e.parquet", "truncate", "flextron profile"),
    ("latency_model/metrics.json", "{", "flextron fit"),
    ("latency_model/metrics.json", "{}", "flextron fit"),
    ("search/*/elastic/trials.parquet", "truncate", "flextron search"),
    ("search/*/elastic/best.json", "[", "flextron search"),
    ("verify/verified.parquet", "truncate", "flextron verify"),
    ("search/quality_cache.jsonl", "[1]", "flextron search"),
])
def test_corrupt_artifact_names_the_file_and_its_rebuild_command(run, artifact, damage, command):
    build_report(ReportConfig(run=str(run)))
    good = (run / "reports" / "index.html").read_bytes()
    path = next(run.glob(artifact))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text(damage)
    with pytest.raises(FlextronError, match=rf"{path.name}.*{command} --run"):
        build_report(ReportConfig(run=str(run)))
    assert (run / "reports" / "index.html").read_bytes() == good  # the previous report is kept


def test_report_shows_the_noise_floor_the_verdict_and_the_lookup(run):
    """The latency model's error stands beside the profile's noise floor with a verdict saying what
    limits it; the lookup a deployment reads and each stage's measurement noise are tables too."""
    from search.export import ExportConfig, export

    export(ExportConfig(run=str(run), lookup=True))
    build_report(ReportConfig(run=str(run)))
    page = _page(run)
    regime = _regime(run)
    m = json.loads((run / "latency_model" / "metrics.json").read_text())[regime]
    row = next(r for r in page.rows if r[0] == regime and r[1] == f"{m['heldout']['mape_pct']:.2f}")
    assert row[4] == f"{m['ratio_noise_floor_pct']:.2f}" and row[-1] == m["verdict"] and "noise floor" in row[-1]
    lookup = json.loads((run / "export" / "lookup.json").read_text())["rows"]
    for r in lookup:
        assert [regime, r["weights"], r["quantile"], f"{r['budget_frac']:.3f}", f"{r['budget_ms']:.3f}"] in [x[:5] for x in page.rows]
    assert any(h.startswith("Lookup") for h in page.headings) and any(h.startswith("Measurement noise") for h in page.headings)
    noise = json.loads((run / "verify" / "noise.json").read_text())["regimes"][regime]
    assert ["verify", regime, f"{noise['noise_floor_pct']:.2f}", f"{noise['ratio_noise_floor_pct']:.2f}",
            str(noise["rounds"])] in page.rows
