"""Where routers are kept (per regime and per weights) and loading them back."""

import json

import pytest
import torch

from flextron.errors import FlextronError
from flextron.router_store import Routers, load_tensors, regime_dir, save_tensors
from flextron.spec import ElasticSpec

SPEC = ElasticSpec.build("llama", num_layers=2, hidden_size=64, intermediate_size=256, num_heads=4, num_kv_heads=2,
                         head_dim=16, vocab_size=100, mlp_choices=4, head_choices=2)
CALIBRATION = [{"router_frac": f, "heads": [4, 4], "shift": s} for f, s in ((0.5, 3.0), (0.7, 1.0), (0.9, 0.0))]


def test_routers_are_kept_per_regime_and_resolved_weights(tmp_path):
    folder = regime_dir(tmp_path, "decode:b1:ctx256:float32:eager", weights="trained")
    assert folder == tmp_path / "router" / "decode_b1_ctx256_float32_eager" / "trained"
    with pytest.raises(FlextronError, match="per resolved weights"):
        regime_dir(tmp_path, "decode:b1:ctx256:float32:eager", weights="auto")


def test_tensors_round_trip_and_a_missing_or_damaged_file_names_the_command(tmp_path):
    run = tmp_path / "run"
    path = regime_dir(run, "decode:b1:ctx256:float32:eager", weights="elastic") / "static_router.safetensors"
    path.parent.mkdir(parents=True)
    save_tensors(path, {"w": torch.arange(6.0).view(2, 3).t()})  # a non-contiguous view is saved as its values
    assert torch.equal(load_tensors(path)["w"], torch.arange(6.0).view(2, 3).t())
    path.write_bytes(b"\x00" * 9)
    with pytest.raises(FlextronError, match=r"static_router.safetensors is corrupt.*flextron route --run"):
        load_tensors(path, run)
    with pytest.raises(FlextronError, match=r"surrogate.safetensors is missing; rebuild it$"):
        load_tensors(path.with_name("surrogate.safetensors"))


def _save_routers(folder, meta: dict):
    from flextron.static_router import StaticRouter
    from flextron.surrogate import Surrogate

    L, W, H = SPEC.num_layers, len(SPEC.mlp_widths[0]), len(SPEC.head_counts[0])
    torch.manual_seed(0)
    static, sur = StaticRouter(L, W, H), Surrogate(L, W, H)
    folder.mkdir(parents=True)
    save_tensors(folder / "static_router.safetensors", static.state_dict())
    save_tensors(folder / "surrogate.safetensors", sur.state_dict())
    (folder / "router.json").write_text(json.dumps(meta))
    return static


def test_loaded_routers_answer_like_the_saved_ones_and_serve_calibrated_budgets(tmp_path):
    from flextron.static_router import route_static

    meta = {"table": {"full_ms": 10.0}, "dynamic_calibration": CALIBRATION}
    static = _save_routers(regime_dir(tmp_path, "decode:b1:ctx256:float32:eager", weights="elastic"), meta)
    routers = Routers.load(tmp_path, "decode:b1:ctx256:float32:eager", SPEC, weights="elastic")
    assert routers.meta == meta
    for t in (0.3, 1.0):
        assert route_static(routers.static, SPEC, t) == route_static(static, SPEC, t)
    # the largest calibrated budget not above the asked one (never over it); below them all, an error
    assert routers.dynamic_point(0.8)["router_frac"] == 0.7
    assert routers.dynamic_point(0.9)["router_frac"] == 0.9
    assert routers.dynamic_point(0.5)["router_frac"] == 0.5
    with pytest.raises(FlextronError, match="below the routers' smallest calibrated budget"):
        routers.dynamic_point(0.1)
    assert routers.dynamic_point_for(7.5)["router_frac"] == 0.7  # 7.5 ms of the table's 10 ms full model
    routers.meta = {**meta, "dynamic_calibration": []}
    with pytest.raises(FlextronError, match="no calibrated dynamic router"):
        routers.dynamic_point(0.8)


def test_a_folder_without_routers_says_which_command_makes_them(tmp_path):
    folder = regime_dir(tmp_path, "decode:b1:ctx256:float32:eager", weights="trained")
    with pytest.raises(FlextronError, match=r"holds no routers; run `flextron route .* --weights trained`"):
        Routers(folder, SPEC, tmp_path)
    (folder.parent).mkdir(parents=True)
    (folder.parent / "router.json").write_text("{}")  # routers from before they were kept per weights
    with pytest.raises(FlextronError, match="predate routers kept per weights"):
        Routers(folder, SPEC, tmp_path)
