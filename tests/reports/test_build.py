"""`flextron report`: what a reader of index.html sees, and what a crafted run directory cannot do."""

import base64
import csv
import hashlib
import json
import math
import shutil
from html.parser import HTMLParser

import pandas as pd
import pytest

from flextron.errors import FlextronError
from flextron.spec import SubnetConfig
from reports.build import ReportConfig, build_report

REGIME = "prefill:b1:s64"
SECTIONS = ["Headline", "Lookup table", "Verified budgets", "Pareto frontier", "Routers", "Latency model",
            "Quality model", "Per-layer latency", "Search", "Training", "Measurement quality: noise, drift, throttling"]
HEADLINE = ["regime", "full model ms", "fastest sub-network ms", "fastest × full", "latency model error %",
            "noise floor %", "latency model", "picks within budget"]
LOOKUP = ["budget ms", "budget × full", "q", "sub-network", "measured ms at q", "× full", "95% upper", "perplexity",
          "source"]
VERIFY = ["budget ms", "budget × full", "q", "sub-network", "predicted ms", "measured ms", "× full", "95% upper",
          "verdict", "perplexity", "source"]


@pytest.fixture(scope="module")
def staged(trained_run, tmp_path_factory, profiled_copy):
    """A trained tiny run taken through every stage: profile, fit, route, search, verify, export, timed
    by the known-latency timer (tests/known_latency.py): which picks verify within their budgets, and so
    what the lookup holds, never depends on the machine's load."""
    from known_latency import KnownLatency

    from flextron.elastic import ElasticModel
    from profiler.latency_model import LatencyModels
    from search.export import ExportConfig, export
    from search.optuna_search import SearchConfig, feasible_range, search
    from search.route import RouteConfig, route
    from search.verify import VerifyConfig, verify

    with pytest.MonkeyPatch.context() as mp:
        KnownLatency().install(mp)
        run = profiled_copy(trained_run, tmp_path_factory.mktemp("report") / "run", REGIME, 8)
        route(RouteConfig(run=str(run), surrogate_samples=8, surrogate_threshold=0.5, static_steps=40,
                          dynamic_steps=2, eval_windows=2, eval_seq_len=32, calib_windows=1, batch_size=1, seq_len=32,
                          select_windows=2, select_rounds=2, select_reps=1))
        models = LatencyModels.load(run)
        lo, hi = feasible_range(models.get(models.resolve(None)), ElasticModel.load(run / "elastic").spec)
        search(SearchConfig(run=str(run), budget_ms=(3 * hi, 4 * hi), trials=3, eval_windows=2, eval_seq_len=32))
        verify(VerifyConfig(run=str(run), rounds=2, reps=2, warmup=1))
        export(ExportConfig(run=str(run), lookup=True))
    return run


@pytest.fixture
def run(staged, tmp_path):
    """A private copy of the staged run, for tests that change or break its artifacts."""
    dst = tmp_path / "run"
    shutil.copytree(staged, dst, ignore=shutil.ignore_patterns("reports"))
    return dst


class _Page(HTMLParser):
    """What a reader of index.html sees: headings, the "what this is" line, tables (per section, with
    caption, header, cell texts and hover titles), images, figure captions, and the not-yet list."""

    def __init__(self, text: str):
        super().__init__()
        self.h1, self.h2, self.imgs, self.captions, self.tables, self.not_yet = [], [], [], [], [], []
        self.paragraphs, self.tags, self.metas, self.about = [], [], [], ""
        self._text, self._section, self._table, self._row, self._titles, self._cls = [], None, None, None, None, None
        self._folded = ""  # the <summary> of a folded table: its caption
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self._section = a.get("id")
        elif tag == "table":
            self._table = {"section": self._section, "caption": self._folded, "header": [], "rows": [],
                           "titles": [], "num": [], "header_num": []}
            self._folded = ""
            self.tables.append(self._table)
        elif tag == "tr":
            self._row, self._titles = [], []
        elif tag in ("td", "th"):
            self._titles.append(a.get("title", ""))
            self._cls = a.get("class", "")
        elif tag == "img":
            self.imgs.append(a["src"])
        elif tag == "meta":
            self.metas.append(a)
        elif tag == "p":
            self._cls = a.get("class", "")
        if tag in ("h1", "h2", "td", "th", "figcaption", "caption", "li", "p", "summary"):
            self._text = []

    def handle_endtag(self, tag):
        text = " ".join("".join(self._text).split())
        if tag == "h1":
            self.h1.append(text)
        elif tag == "h2":
            self.h2.append(text)
        elif tag == "caption":
            self._table["caption"] = text
        elif tag == "summary":
            self._folded = text.rsplit(" (", 1)[0]
        elif tag in ("td", "th") and self._row is not None:
            self._row.append(text)
            if tag == "td" and self._table is not None and len(self._table["rows"]) == 0:
                self._table["num"].append(self._cls == "num")
            elif tag == "th" and self._table is not None:
                self._table["header_num"].append(self._cls == "num")
        elif tag == "tr" and self._table is not None:
            if self._table["header"]:
                self._table["rows"].append(self._row)
                self._table["titles"].append(self._titles)
            else:
                self._table["header"] = self._row
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "figcaption":
            self.captions.append(text)
        elif tag == "li" and self._section == "not-yet":
            self.not_yet.append(text)
        elif tag == "p":
            self.paragraphs.append(text)
            if self._cls == "about":
                self.about = text
        elif tag == "section":
            self._section = None

    def handle_data(self, data):
        self._text.append(data)

    def in_section(self, section: str) -> list[dict]:
        return [t for t in self.tables if t["section"] == section]


def _page(run) -> _Page:
    return _Page((run / "reports" / "index.html").read_text())


def _regime(run) -> str:
    return str(pd.read_parquet(run / "profile" / "e2e.parquet")["regime"].iloc[0])


def _shows(cell: str, value: float) -> bool:
    """Whether a table cell shows `value` at the precision it prints."""
    text = cell.replace(",", "")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return abs(float(text) - value) <= 0.5 * 10 ** -decimals + 1e-9


def _row_shows(row: list[str], expected: list) -> bool:
    return len(row) == len(expected) and all(e is None or (_shows(c, e) if isinstance(e, float) else c == e)
                                             for c, e in zip(row, expected))


def test_the_page_is_html_with_one_title_sections_and_what_it_is(staged):
    r = build_report(ReportConfig(run=str(staged)))
    text = (staged / "reports" / "index.html").read_text()
    page = _Page(text)
    assert len(page.h1) == 1 and page.h1[0].startswith("flextron report: tiny-llama on ")
    assert not any(h.lstrip().startswith("#") for h in page.h1 + page.h2 + page.paragraphs)
    assert "pre" not in page.tags and "\n#" not in text
    assert page.h2 == SECTIONS + ["Not in this run yet"] and r["sections"] == SECTIONS
    assert len(page.not_yet) == 1 and page.not_yet[0].startswith("Energy: not measured")  # a CPU profile
    device = json.loads((staged / "profile" / "device.json").read_text())
    for fact in ("tiny-llama", device["device_name"], "engine: transformers (torch ", _regime(staged),
                 "weights: one-shot and trained", "profiled 20"):
        assert fact in page.about
    bridges = json.loads((staged / "elastic" / "convert_report.json").read_text())["bridges"]["layers"]
    assert f"skipped layers: a linear bridge in their place in {bridges} of 3 layers" in page.about
    csp = [m for m in page.metas if m.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]
    assert all(t["header"] and all(len(row) == len(t["header"]) for row in t["rows"]) for t in page.tables)


def test_headline_shows_the_full_model_the_fastest_the_model_error_and_the_verdicts(staged):
    build_report(ReportConfig(run=str(staged)))
    (table,) = _page(staged).in_section("headline")
    regime = _regime(staged)
    from flextron.spec import ElasticSpec

    e2e = pd.read_parquet(staged / "profile" / "e2e.parquet")
    full_key = ElasticSpec.load(staged / "elastic" / "elastic_spec.json").full().key
    full = float(e2e.loc[e2e["config_key"] == full_key, "latency_ms_median"].iloc[0])
    fastest = e2e.sort_values("latency_ms_median").iloc[0]
    m = json.loads((staged / "latency_model" / "metrics.json").read_text())[regime]
    verified = pd.read_parquet(staged / "verify" / "verified.parquet")
    assert table["header"] == HEADLINE and len(table["rows"]) == 1
    row = table["rows"][0]
    assert _row_shows(row, [regime, full, float(fastest["latency_ms_median"]), float(fastest["ratio_to_full"]),
                            m["heldout"]["mape_pct"], m["ratio_noise_floor_pct"], m["verdict"].split(" (")[0],
                            f"{int(verified['within_budget'].sum())} of {len(verified)}"])
    numeric = [False, True, True, True, True, True, False, False]
    assert table["num"] == table["header_num"] == numeric  # numbers and their headers right-aligned


def test_lookup_table_has_one_row_per_lookup_row_with_its_numbers(staged):
    build_report(ReportConfig(run=str(staged)))
    page = _page(staged)
    rows = json.loads((staged / "export" / "lookup.json").read_text())["rows"]
    (table,) = page.in_section("lookup")
    assert table["header"] == LOOKUP and len(table["rows"]) == len(rows) >= 1
    assert table["caption"] == f"{_regime(staged)}, trained elastic model weights"
    for r, row, titles in zip(sorted(rows, key=lambda r: r["budget_ms"]), table["rows"], table["titles"]):
        assert _row_shows(row, [r["budget_ms"], r["budget_frac"], r["quantile"], None, r["latency_ms_p50"],
                                r["ratio_to_full"], r["ratio_hi"], r["ppl"], r["source"]])
        cfg = r["config"]
        assert titles[3] == SubnetConfig.from_dict(cfg).key  # a skipped layer shows width and heads 0
        c = SubnetConfig.from_dict(cfg)
        assert row[3].startswith("mixed · " if not c.is_uniform() else "depth · " if c.skip else "uniform · ")


def test_verify_table_has_one_row_per_verified_pick_with_its_numbers(staged):
    build_report(ReportConfig(run=str(staged)))
    (table,) = _page(staged).in_section("verify")
    verified = pd.read_parquet(staged / "verify" / "verified.parquet").sort_values("budget_ms")
    assert table["header"] == VERIFY and len(table["rows"]) == len(verified) == 2  # one per budget
    assert table["caption"].endswith(f"{int(verified['rounds'].iloc[0])} interleaved rounds")
    for v, row in zip(verified.itertuples(), table["rows"]):
        assert _row_shows(row, [v.budget_ms, v.budget_frac, v.quantile, None, v.predicted_latency_ms,
                                v.measured_latency_ms, v.ratio, v.ratio_hi, v.verdict, v.ppl, v.source])
    summary = (staged / "reports" / "summary.md").read_text()  # the same table, as Markdown
    assert "| " + " | ".join(VERIFY) + " |" in summary
    assert f"| {table['rows'][0][0]} | {table['rows'][0][1]} | {verified['quantile'].iloc[0]} |" in summary


def test_router_and_training_sections_show_their_artifacts(staged):
    r = build_report(ReportConfig(run=str(staged)))
    page = _page(staged)
    meta = json.loads(next(staged.glob("router/*/*/router.json")).read_text())
    (routers,) = page.in_section("routers")
    answers = sorted(meta["static_answers"], key=lambda s: s["router_frac"])
    assert len(routers["rows"]) == len(answers) == 9
    for s, row in zip(answers, routers["rows"]):
        assert _shows(row[0], s["router_frac"]) and _shows(row[1], s["budget_ms"]) and _shows(row[3], s["predicted_ms"])
    calib = {round(d["router_frac"], 4): d for d in meta["dynamic_calibration"]}
    assert [row[6] for row in routers["rows"]] == [("yes" if calib[round(s["router_frac"], 4)]["meets"] else "no")
                                                   for s in answers]
    assert any(c.startswith("Routers, ") for c in page.captions) and any(p.startswith("router_") for p in r["plots"])

    (training,) = page.in_section("training")
    with open(staged / "train" / "metrics.csv") as f:
        steps = list(csv.DictReader(f))
    assert training["header"] == ["sub-network", "loss at step 1", f"loss at step {len(steps)}", "change %"]
    full = next(row for row in training["rows"] if row[0] == "full model")
    assert _shows(full[1], float(steps[0]["loss_full"])) and _shows(full[2], float(steps[-1]["loss_full"]))
    assert any(c.startswith("Training: ") for c in page.captions) and "training.png" in r["plots"]


def test_sections_without_their_data_name_the_command_that_makes_it(run):
    for stage in ("router", "train", "trained", "search", "verify", "export", "quality"):
        shutil.rmtree(run / stage)
    r = build_report(ReportConfig(run=str(run)))
    page = _page(run)
    assert page.h2 == ["Headline", "Latency model", "Per-layer latency", SECTIONS[-1], "Not in this run yet"]
    lines = dict(line.split(": ", 1) for line in page.not_yet)
    expected = {"Lookup table": f"flextron export --run {run} --lookup",
                "Verified budgets": f"flextron verify --run {run}", "Pareto frontier": f"flextron search --run {run}",
                "Routers": f"flextron route --run {run}", "Quality model": f"flextron quality --run {run}",
                "Search": f"flextron search --run {run}", "Training": f"flextron train --run {run}",
                "Energy": f"flextron profile --run {run} --device cuda"}
    assert list(lines) == list(expected)
    assert all(expected[k] in lines[k] for k in expected)
    assert sorted(p.split("_")[0] for p in r["plots"]) == ["heatmap", "predicted"]
    headline = page.in_section("headline")[0]["rows"][0]
    assert headline[-1] == "not verified yet"
    summary = (run / "reports" / "summary.md").read_text()
    assert "## Not in this run yet" in summary and f"`flextron train --run {run}`" in summary


def test_energy_and_throttling_are_shown_when_the_profile_measured_them(run):
    e2e = pd.read_parquet(run / "profile" / "e2e.parquet")
    uniform = e2e["uniform"].astype(bool)
    e2e["energy_mj_per_token"] = (e2e["latency_ms_median"] * 3.0).where(uniform)
    e2e.to_parquet(run / "profile" / "e2e.parquet")
    layers = pd.read_parquet(run / "profile" / "layers.parquet")
    layers["throttled"] = [i % 4 == 0 for i in range(len(layers))]
    layers["sm_clock_mhz"], layers["temp_c"] = 1755.0, 61.0
    layers.loc[layers.index[0], "sm_clock_mhz"] = 1400.0
    layers.to_parquet(run / "profile" / "layers.parquet")

    build_report(ReportConfig(run=str(run)))
    page = _page(run)
    assert "Energy" in page.h2 and not page.not_yet
    (energy,) = page.in_section("energy")
    assert energy["header"] == ["sub-network", "measured ms", "× full", "energy mJ/token", "tokens per J"]
    rows = e2e[uniform].sort_values("latency_ms_median")
    assert len(energy["rows"]) == len(rows)
    for (_, r), row in zip(rows.iterrows(), energy["rows"]):
        assert _shows(row[1], r["latency_ms_median"]) and _shows(row[3], 3 * r["latency_ms_median"])
    drift = next(t for t in page.in_section("measurement") if t["caption"] == "Drift and throttling (profile)")
    ok = layers[layers["status"] == "ok"]
    assert drift["rows"][0][4:] == [f"{int(ok['throttled'].sum())} of {len(ok)}", "1400–1755", "61"]


def test_each_figure_is_embedded_as_a_png_and_search_is_shown_per_regime_and_weights(staged):
    r = build_report(ReportConfig(run=str(staged)))
    reports = staged / "reports"
    page = _page(staged)
    assert len(page.imgs) == len(r["plots"]) == len(page.captions) >= 6
    for src, name in zip(page.imgs, r["plots"]):
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        png = base64.b64decode(src[len(prefix):])
        assert png.startswith(b"\x89PNG") and png == (reports / name).read_bytes()
    regime = _regime(staged)
    assert any(regime in c and "trained weights" in c for c in page.captions if c.startswith("Search progress"))
    assert sorted(p.name for p in reports.iterdir()) == sorted(r["plots"] + ["index.html", "summary.md"])
    summary = (reports / "summary.md").read_text()
    assert summary.startswith("# flextron report: tiny-llama") and all(f"]({p})" in summary for p in r["plots"])


def test_trained_and_one_shot_results_are_kept_apart(run):
    """A run searched with both weights: each has its own search row, figure, budgets and qualities."""
    regime = _regime(run)
    trained = next(run.glob("search/*/trained"))
    one_shot = trained.with_name("elastic")
    shutil.copytree(trained, one_shot)
    best = json.loads((one_shot / "best.json").read_text())
    setting = {"trained": best["quality_setting"], "elastic": best["quality_setting"].rsplit(":", 1)[0]}
    assert setting["elastic"] != setting["trained"]
    best.update(weights="elastic", quality_setting=setting["elastic"])
    (one_shot / "best.json").write_text(json.dumps(best))
    pd.read_parquet(one_shot / "trials.parquet").assign(weights="elastic").to_parquet(one_shot / "trials.parquet")
    loss = {"elastic": 2.0, "trained": 1.0}
    e2e = pd.read_parquet(run / "profile" / "e2e.parquet")
    uniform = e2e[e2e["uniform"]]["config_key"].tolist()
    with open(run / "search" / "quality_cache.jsonl", "a") as f:
        for w in ("elastic", "trained"):
            for key in uniform:
                f.write(json.dumps({"key": key, "setting": setting[w], "loss": loss[w]}) + "\n")
    verified = pd.read_parquet(run / "verify" / "verified.parquet")
    pd.concat([verified, verified.assign(weights="elastic", ppl=1.5)]).to_parquet(run / "verify" / "verified.parquet")

    build_report(ReportConfig(run=str(run)))
    page = _page(run)
    for w, label in (("elastic", "one-shot, untrained"), ("trained", "trained elastic model")):
        (baseline,) = [t for t in page.in_section("pareto") if t["caption"].endswith(f"{regime}, {label} weights")]
        assert len(baseline["rows"]) == len(uniform)
        assert {row[-1] for row in baseline["rows"]} == {f"{math.exp(loss[w]):.1f}"}  # never the other weights' loss
        assert any(c.startswith("Search progress") and f"{w} weights" in c for c in page.captions)
        (v,) = [t for t in page.in_section("verify") if t["caption"].startswith(f"{regime}, {label} weights")]
        assert len(v["rows"]) == len(verified)
    (v,) = [t for t in page.in_section("verify") if "one-shot" in t["caption"]]
    assert {row[9] for row in v["rows"]} == {"1.5"}
    headline = page.in_section("headline")[0]["rows"][0]
    assert "(one-shot, untrained)" in headline[-1] and "(trained elastic model)" in headline[-1]


def _snapshot(root, skip):
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in root.rglob("*") if p.is_file() and skip not in p.parents}


def test_crafted_strings_stay_inside_reports_and_are_escaped(run, tmp_path):
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
    router = next(run.glob("router/*/*/router.json"))
    meta = json.loads(router.read_text())
    meta.update(regime=regime, table={**meta["table"], "source": "<b onmouseover=alert(1)>t</b>"})
    router.write_text(json.dumps(meta))
    convert = json.loads((run / "convert_config.json").read_text())
    (run / "convert_config.json").write_text(json.dumps({**convert, "model": "<i>model</i>\"'"}))
    dev = json.loads((run / "profile" / "device.json").read_text())
    (run / "profile" / "device.json").write_text(json.dumps({**dev, "device_name": device}))
    for sub in ("pareto_x", "heatmap_x"):  # a crafted run can ship the folders a traversal needs
        (run / "reports" / sub).mkdir(parents=True)
    before = _snapshot(tmp_path, run / "reports")

    build_report(ReportConfig(run=str(run)))
    assert _snapshot(tmp_path, run / "reports") == before  # nothing written outside RUN/reports
    assert not (tmp_path / "escaped<img src=x onerror=alert(1)>.png").exists()
    text = (run / "reports" / "index.html").read_text()
    for markup in ("<script", "<img src=x", "<b onmouseover", "<i>model"):
        assert markup not in text
    for escaped in ("&lt;script&gt;alert(1)&lt;/script&gt;", "&lt;img src=x onerror=alert(1)&gt;",
                    "&lt;b onmouseover=alert(1)&gt;", "&lt;i&gt;model&lt;/i&gt;&quot;&#x27;"):
        assert escaped in text
    page = _page(run)
    assert regime in [row[0] for row in page.in_section("headline")[0]["rows"]]  # shown as text, verbatim
    assert page.h1 == [f"flextron report: <i>model</i>\"' on {device}"]


@pytest.mark.parametrize("artifact, damage, command", [
    ("profile/e2e.parquet", "truncate", "flextron profile"),
    ("latency_model/metrics.json", "{", "flextron fit"),
    ("latency_model/metrics.json", "{}", "flextron fit"),
    ("search/*/trained/trials.parquet", "truncate", "flextron search"),
    ("search/*/trained/best.json", "[", "flextron search"),
    ("verify/verified.parquet", "truncate", "flextron verify"),
    ("search/quality_cache.jsonl", "[1]", "flextron search"),
    ("router/*/trained/router.json", "[", "flextron route"),
    ("router/*/trained/router.json", '{"static_answers": 3}', "flextron route"),
    ("train/metrics.csv", "a,b\n1,2\n", "flextron train"),
    ("export/lookup.json", '{"rows": [{"regime": 1}]}', "flextron export"),
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


def test_latency_model_error_stands_beside_the_noise_floor_with_its_verdict(staged):
    """The latency model's error stands beside the profile's noise floor with a verdict saying what
    limits it; each stage's measurement noise is a table too."""
    build_report(ReportConfig(run=str(staged)))
    page = _page(staged)
    regime = _regime(staged)
    m = json.loads((staged / "latency_model" / "metrics.json").read_text())[regime]
    (table,) = page.in_section("latency-model")
    assert _row_shows(table["rows"][0], [regime, m["heldout"]["mape_pct"], m["heldout"]["max_ape_pct"],
                                         m["heldout"]["spearman"], m["ratio_noise_floor_pct"],
                                         m["naive_sum_heldout"]["mape_pct"], float(m["heldout"]["n"]), m["form"]])
    assert f"Verdict, {regime}: {m['verdict']}." in page.paragraphs and "noise floor" in m["verdict"]
    assert any(c.startswith(f"Latency model, {regime}") and "noise floor" in c for c in page.captions)
    noise = json.loads((staged / "verify" / "noise.json").read_text())["regimes"][regime]
    (floors,) = [t for t in page.in_section("measurement") if t["caption"].startswith("Noise floors")]
    i = noise["interference"]
    seen = {k: f"{i[k + '_median']:.1f} / {i[k + '_max']:.1f}" for k in ("steal_pct", "other_pct")}
    assert any(_row_shows(row, ["verify", regime, noise["noise_floor_pct"], noise["ratio_noise_floor_pct"],
                                float(noise["rounds"]), seen["steal_pct"], seen["other_pct"],
                                float(i["remeasured_rounds"]), None]) for row in floors["rows"])
    # the profile's end-to-end set says what it added toward its target floor, and why it stopped
    r = json.loads((staged / "profile" / "noise.json").read_text())[regime]["refine"]
    assert any(row[:2] == ["profile", regime] and row[-1].startswith(
        f"{r['rounds_added']} for {r['configs_refined']} configs (target {r['target_floor_pct']}%") for row in
        floors["rows"])


def test_report_config_documents_its_flags():
    from flextron.cli import field_docs

    assert set(field_docs(ReportConfig)) == {"run", "dpi"}
    with pytest.raises(FlextronError, match="--dpi"):
        ReportConfig(run="r", dpi=0)


def test_uniform_baselines_print_achieved_bandwidth_and_throughput(staged):
    """Beside each uniform baseline's measured time the page prints what it achieved: the bytes a step
    moves and the FLOPs it does over that time (the profile's achieved_gbps and achieved_tflops)."""
    build_report(ReportConfig(run=str(staged)))
    e2e = pd.read_parquet(staged / "profile" / "e2e.parquet")
    tables = [t for t in _page(staged).in_section("pareto") if "achieved GB/s" in t.get("header", [])]
    assert tables
    shown = 0
    for t in tables:
        i, j, k = (t["header"].index(h) for h in ("measured ms", "achieved GB/s", "achieved TFLOP/s"))
        for row in t["rows"]:
            near = pd.Series([_shows(row[i], v) for v in e2e["latency_ms_median"]], index=e2e.index)
            match = e2e[e2e["uniform"].astype(bool) & near]
            assert len(match)
            r = match.iloc[0]
            assert _shows(row[j], float(r["achieved_gbps"])) and _shows(row[k], float(r["achieved_tflops"]))
            shown += 1
    assert shown


def test_the_quality_section_shows_the_depth_path_and_the_order_depth_k_skips(run):
    rec = json.loads(next((run / "quality").glob("*/quality_model.json")).read_text())
    path = rec["metrics"]["depth_path"]
    assert path["layers"]  # the tiny run's quality stage walked one
    build_report(ReportConfig(run=str(run)))
    html = (run / "reports" / "index.html").read_text()
    first = f"{path['layers'][0]} (+{path['loss'][0]:.3f})"
    assert "Depth path (" in html and first in html
    assert "Layers in the order `depth:K` skips them" in html or "Layers in the order <code>depth:K</code>" in html


def test_the_quality_section_shows_the_held_out_spearman_with_its_interval(run):
    """The stage scores the model on 30 configs: which 30 moves the score by hundredths, so the report shows
    the bootstrap interval the stage recorded beside the score."""
    rec = json.loads(next((run / "quality").glob("*/quality_model.json")).read_text())
    h = rec["metrics"]["heldout"]
    lo, hi = h["spearman_ci90"]
    assert lo <= h["spearman"] + 1e-9 and hi >= lo
    build_report(ReportConfig(run=str(run)))
    (table,) = [t for t in _page(run).in_section("quality-model") if "held-out Spearman" in t["header"]]
    assert table["rows"][0][table["header"].index("90% interval")] == f"{lo:.3f}–{hi:.3f}"
    # a quality model fitted before the interval was recorded: a dash, not an error
    path = next((run / "quality").glob("*/quality_model.json"))
    kept = path.read_text()
    try:
        del rec["metrics"]["heldout"]["spearman_ci90"]
        path.write_text(json.dumps(rec))
        build_report(ReportConfig(run=str(run)))
        (table,) = [t for t in _page(run).in_section("quality-model") if "held-out Spearman" in t["header"]]
        assert table["rows"][0][table["header"].index("90% interval")] == "–"
    finally:
        path.write_text(kept)
