"""flextron run: the whole job on the default (torch) engine, on the known-latency timer."""

import json

from known_latency import KnownLatency


def test_the_default_job_runs_every_stage_and_serves_its_lookup(tmp_path, monkeypatch):
    """`flextron run` on tiny-llama (the default engine, transformers): every stage's folder is built, the
    summary names each stage's seconds, and the lookup serves the budgets it holds (on known latencies,
    so which picks fit never depends on the machine's load)."""
    from flextron.cli.run import RunConfig, run_pipeline
    from search.lookup import Lookup, LookupConfig, lookup

    KnownLatency().install(monkeypatch)
    run = tmp_path / "run"
    out = run_pipeline(RunConfig(model="tiny-llama", out=str(run), regime=("prefill:b1:s64",), trials=4,
                                 e2e_random=8, rounds=2, max_rounds=2, eval_windows=2, device="cpu"))
    for stage in ("elastic", "profile", "latency_model", "quality", "search", "verify", "export", "reports"):
        assert (run / stage).is_dir(), stage
    assert set(out["stage_seconds"]) >= {"convert", "profile", "fit", "quality", "verify", "export", "report"}
    rows = json.loads((run / "export" / "lookup.json").read_text())["rows"]
    assert rows and sorted(round(r["budget_ms"], 4) for r in rows) == sorted(out["lookup_budgets_ms"])
    for r in rows:  # each budget as searched is served by its own row, measured within it
        got = lookup(LookupConfig(run=str(run), budget_ms=r["budget_ms"]))
        assert got["budget_ms"] == r["budget_ms"] and r["ratio_hi"] <= r["budget_frac"]
    assert Lookup.load(run).rows[0].engine == "torch"
    assert (run / "reports" / "index.html").is_file()
