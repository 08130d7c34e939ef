"""Where does verify's measured-over-predicted offset come from: the latency model, the picks, or the session?

For each finished run (profiled, fitted, searched and verified with its uniform configs measured), this
reads what is already on disk and prints, per run:
- profile session: the latency model's measured / predicted ratio-to-full over the profile's end-to-end
  configs (median, and for the uniform ones alone);
- verify session: the same for the uniform configs verify measured (never chosen by a search: no selection)
  and for the rows verify kept (chosen: selection can only favour configs the model under-predicts);
- the same uniform configs' ratio to the full model in verify's session over the profile's (median, p10-p90):
  a session shift of the ratios themselves, which no model fitted in the profile session can know;
- each session's ratio noise floor and its steal / other-process CPU medians.
When the uniform configs' shift matches the picks' offset, the offset is the session's, not the model's or
the search's.

    PYTHONPATH=. python benchmarks/session_shift.py runs/<run> [runs/<run> ...]
"""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from flextron.spec import ElasticSpec, SubnetConfig
from profiler.latency_model import LatencyModels


def main(runs: list[str]) -> None:
    print("run | model meas/pred: profile all, profile uniform, verify uniform, verify rows | uniform verify/profile "
          "ratio: median (p10-p90), n | ratio floor % profile, verify | steal %, other % medians: profile, verify")
    for run in runs:
        root = Path(run)
        if not (root / "verify" / "uniform.parquet").is_file():
            print(f"{run}: no verify/uniform.parquet; skipped")
            continue
        models = LatencyModels.load(root)
        key = models.resolve(None)
        lat = models.get(key)
        spec = ElasticSpec.load(root / "elastic" / "elastic_spec.json")
        full = lat.predict_config(spec.full())

        def pred(configs):
            return np.array([lat.predict_config(SubnetConfig.from_json(c)) / full for c in configs])

        e2e = pd.read_parquet(root / "profile" / "e2e.parquet")
        e2e = e2e[e2e["ratio_to_full"].notna()]
        uni = pd.read_parquet(root / "verify" / "uniform.parquet")
        rows = pd.read_parquet(root / "verify" / "verified.parquet")
        q_all = e2e["ratio_to_full"].to_numpy() / pred(e2e["config"])
        is_uni = e2e["uniform"].to_numpy(bool)
        q_vu = uni["ratio_to_full"].to_numpy() / pred(uni["config"])
        q_rows = rows["ratio"].to_numpy() / pred(rows["config"])
        prof = dict(zip(e2e["config_key"], e2e["ratio_to_full"]))
        shift = np.array([v / prof[k] for k, v in zip(uni["config_key"], uni["ratio_to_full"]) if k in prof])
        pn = json.loads((root / "profile" / "noise.json").read_text()).get(key, {})
        vn = json.loads((root / "verify" / "noise.json").read_text()).get("regimes", {}).get(key, {})
        pi, vi = pn.get("interference", {}), vn.get("interference", {})
        sh = (f"{np.median(shift):.3f} ({np.quantile(shift, 0.1):.3f}-{np.quantile(shift, 0.9):.3f}), {len(shift)}"
              if len(shift) else "none shared")
        print(f"{run} | {np.median(q_all):.3f}, {np.median(q_all[is_uni]):.3f}, {np.median(q_vu):.3f} ({len(q_vu)}), "
              f"{np.median(q_rows):.3f} ({len(q_rows)}) | {sh} | {pn.get('ratio_noise_floor_pct')}, "
              f"{vn.get('ratio_noise_floor_pct')} | {pi.get('steal_pct_median')}, {pi.get('other_pct_median')}; "
              f"{vi.get('steal_pct_median')}, {vi.get('other_pct_median')}")


if __name__ == "__main__":
    main(sys.argv[1:])
