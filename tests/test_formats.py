"""The formats users already have: plain and DataParallel state_dicts, safetensors, torchvision's
pretrained weights from its cache, timm models, and data from a factory named by import path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from amc.checkpoint import load_checkpoint
from amc.cli import main
from amc.config import config_from_dict
from amc.errors import UserError
from amc.factory import Workspace
from amc.models.pretrained import torchvision_cache_file
from conftest import demo_dict, write_config

DIGITS = torch.zeros(1, 1, 8, 8).normal_(generator=torch.Generator().manual_seed(0))


def base_state(demo_raw) -> dict[str, torch.Tensor]:
    return load_checkpoint(demo_raw["model"]["checkpoint"], "amc-base")["state_dict"]


def outputs(cfg) -> torch.Tensor:
    return Workspace(cfg).base_model.cpu()(DIGITS)


def write_plain(path: Path, state: dict) -> None:
    torch.save(state, path)


def write_dataparallel(path: Path, state: dict) -> None:
    torch.save({f"module.{k}": v for k, v in state.items()}, path)


def write_nested(path: Path, state: dict) -> None:  # what many training scripts save
    torch.save({"epoch": 3, "state_dict": state}, path)


def write_safetensors(path: Path, state: dict) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


@pytest.mark.parametrize("write, name", [(write_plain, "plain.pt"), (write_dataparallel, "dp.pth"),
                                         (write_nested, "nested.pt"), (write_safetensors, "base.safetensors")])
def test_users_weight_files_load_as_base_checkpoints(demo_raw, tmp_path, write, name):
    reference = outputs(config_from_dict(demo_raw))
    write(tmp_path / name, base_state(demo_raw))
    demo_raw["model"]["checkpoint"] = str(tmp_path / name)
    assert torch.equal(outputs(config_from_dict(demo_raw)), reference)


def test_a_dataparallel_model_saved_as_is_loads(demo_raw, tmp_path):
    model = Workspace(config_from_dict(demo_raw)).base_model.cpu()
    torch.save(nn.DataParallel(model).state_dict(), tmp_path / "wrapped.pth")  # keys start with "module."
    demo_raw["model"]["checkpoint"] = str(tmp_path / "wrapped.pth")
    assert torch.equal(outputs(config_from_dict(demo_raw)), model(DIGITS))


def test_a_search_runs_on_a_safetensors_base(demo_raw, tmp_path, capsys):
    write_safetensors(tmp_path / "base.safetensors", base_state(demo_raw))
    config = write_config(tmp_path / "demo.yaml", demo_raw)
    assert main(["--quiet", "search", str(config), "--episodes", "3", "--set",
                 f"model.checkpoint={tmp_path / 'base.safetensors'}", "--set", "search.select_top_k=2"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["cost_ratio"] <= 0.5 + 1e-9


@pytest.mark.parametrize("change, message", [
    (lambda s: {**{k: v for k, v in s.items() if not k.startswith("features.0.")}, "extra.weight": torch.ones(1)},
     "weights do not fit the DemoCNN: missing features.0.weight; unexpected extra.weight"),
    (lambda s: {**s, "classifier.weight": torch.zeros(5, 64)},
     "weights do not fit the DemoCNN: classifier.weight is (5, 64) in the file, (10, 64) in the model"),
])
def test_weights_that_do_not_fit_name_the_keys(demo_raw, tmp_path, change, message):
    write_safetensors(tmp_path / "bad.safetensors", change(base_state(demo_raw)))
    demo_raw["model"]["checkpoint"] = str(tmp_path / "bad.safetensors")
    with pytest.raises(UserError) as info:
        outputs(config_from_dict(demo_raw))
    assert str(info.value) == f"{tmp_path / 'bad.safetensors'}: {message}"


@pytest.mark.parametrize("content, message", [
    ({"epoch": 3, "lr": 0.1}, "neither an amc checkpoint nor a state_dict"),
    (b"not safetensors", "not a readable safetensors file"),
])
def test_files_that_hold_no_weights_are_refused(demo_raw, tmp_path, content, message):
    path = tmp_path / ("x.safetensors" if isinstance(content, bytes) else "x.pt")
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    demo_raw["model"]["checkpoint"] = str(path)
    with pytest.raises(UserError, match=message):
        outputs(config_from_dict(demo_raw))


# --------------------------------------------------------------------------- data factories


def digits_factory(scale: float = 16.0):
    """A user's data factory: digits as TensorDatasets (train, test, classes, channels)."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / scale
    y = torch.tensor(d.target)
    return TensorDataset(x[:1500], y[:1500]), TensorDataset(x[1500:], y[1500:]), 10, 1


def pair_factory():
    return TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4)), None


def factory_dict(tmp_path: Path, name: str = f"{__name__}:digits_factory", **data) -> dict:
    raw = demo_dict(tmp_path)
    raw["data"] = {"name": name, "reward_val_size": 200, "select_size": 100, "batch_size": 64, **data}
    return raw


def test_a_dataset_factory_by_import_path_trains_and_searches(tmp_path, capsys):
    config = write_config(tmp_path / "mine.yaml", factory_dict(tmp_path, kwargs={"scale": 8.0}))
    assert main(["--quiet", "train", str(config), "--epochs", "3"]) == 0
    assert main(["--quiet", "search", str(config), "--episodes", "3", "--set", "search.select_top_k=2"]) == 0
    capsys.readouterr()
    base = load_checkpoint(tmp_path / "base.pt", "amc-base")
    assert base["split"] == {"dataset": f"{__name__}:digits_factory", "seed": 0, "reward_val_size": 200,
                             "select_size": 100, "kwargs": {"scale": 8.0}}
    assert base["metrics"]["test_top1"] > 0.5
    ws = Workspace(config_from_dict(factory_dict(tmp_path, kwargs={"scale": 8.0})))
    assert ws.input_shape == (1, 1, 8, 8)  # a sample's shape
    assert (len(ws.splits.train), len(ws.splits.reward_val), len(ws.splits.select)) == (1200, 200, 100)
    assert float(ws.splits.test[0][0].max()) <= 2.0 + 1e-6  # the factory's kwargs reached it (16 / 8)
    assert json.loads((tmp_path / "run" / "best_policy.json").read_text())["macs_ratio"] <= 0.5 + 1e-9

    # the same model on data made another way (other kwargs) is refused: its held-out images are unknown
    with pytest.raises(UserError, match=r"trained with the split .*kwargs=\{'scale': 8.0\}.*kwargs=\{'scale': 4.0\}"):
        Workspace(config_from_dict(factory_dict(tmp_path, kwargs={"scale": 4.0}))).base_model


@pytest.mark.parametrize("name, data, message", [
    ("digit", {}, "data.name: unknown data set 'digit'; did you mean digits?"),
    ("my data", {}, "unknown data set 'my data'; built in: digits, mnist"),
    (f"{__name__}:pair_factory", {}, "the factory must return (train, test, num_classes, in_channels), got tuple"),
    (f"{__name__}:no_such", {}, "module 'test_formats' has no attribute 'no_such'"),
    (f"{__name__}:digits_factory", {"input_size": 8}, "input_size: applies to the built-in data sets only"),
    ("digits", {"kwargs": {"scale": 2}}, "kwargs: only a data factory ('package.module:factory') takes kwargs"),
])
def test_data_factory_mistakes_are_one_line(tmp_path, capsys, name, data, message):
    config = write_config(tmp_path / "mine.yaml", factory_dict(tmp_path, name, **data, **(
        {"input_size": 8} if name == "digits" else {})))
    assert main(["info", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# --------------------------------------------------------------------------- torchvision weights


def random_images(classes: int = 1000, n: int = 48):
    """Random 3x32x32 images: as many classes as ImageNet's, so pretrained weights fit as they are."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g))
    return data, data, classes, 3


def ten_classes():
    return random_images(classes=10)


def pretrained_raw(tmp_path: Path, data: str = "random_images", checkpoint: str | None = None) -> dict:
    raw = factory_dict(tmp_path, f"{__name__}:{data}", reward_val_size=8, select_size=8)
    raw["model"] = {"name": "torchvision:mobilenet_v3_small", "weights": "DEFAULT", "checkpoint": checkpoint}
    return raw


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME, and no network: downloads go to a closed local port."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    return tmp_path / "torch"


def cache_mobilenet(torch_home: Path) -> dict[str, torch.Tensor]:
    """Put 'pretrained' mobilenet_v3_small weights (seeded, 1000 classes) where torchvision looks."""
    weights = torchvision.models.get_weight("MobileNet_V3_Small_Weights.DEFAULT")
    path = torchvision_cache_file(weights.url)
    assert path == torch_home / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    torch.manual_seed(1)
    state = torchvision.models.mobilenet_v3_small().state_dict()
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_torchvision_weights_load_from_the_local_cache(tmp_path, torch_home):
    state = cache_mobilenet(torch_home)
    base = Workspace(config_from_dict(pretrained_raw(tmp_path))).base_model
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())

    # for 10 classes they are where `amc train` starts; the classifier is fresh (and said to be)
    ws = Workspace(config_from_dict(pretrained_raw(tmp_path, "ten_classes", str(tmp_path / "mine.pt"))))
    with pytest.warns(UserWarning, match=r"freshly initialised where the weights do not fit the data: "
                                         r"classifier.3.weight, classifier.3.bias$"):
        start = ws.initial_model().state_dict()
    assert all(torch.equal(v, state[k]) for k, v in start.items() if not k.startswith("classifier.3."))
    # used as they are for 10 classes, they would leave the classifier untrained: refused
    with pytest.raises(UserError, match=r"model.weights: the DEFAULT weights of torchvision:mobilenet_v3_small do not "
                                        r"fit classifier.3.weight, classifier.3.bias of the model for this data \(they "
                                        r"are for 1000 classes; the data has 10 classes"):
        Workspace(config_from_dict(pretrained_raw(tmp_path, "ten_classes"))).base_model


def test_a_missing_torchvision_download_fails_in_one_line(tmp_path, torch_home):
    with pytest.raises(UserError) as info:
        Workspace(config_from_dict(pretrained_raw(tmp_path))).base_model
    path = torch_home / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    assert str(info.value).startswith("model.weights: cannot download https://download.pytorch.org/models/"
                                      "mobilenet_v3_small-047dcff4.pth (")
    assert str(info.value).endswith(f"offline, put that file at {path} (the cache is $TORCH_HOME/hub/checkpoints)")
    assert "\n" not in str(info.value) and not path.exists()


def write_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


@pytest.mark.parametrize("name, weights, mean, resize, interpolation", [
    ("torchvision:efficientnet_b0", "DEFAULT", (0.485, 0.456, 0.406), int(32 * 256 / 224), "bicubic"),
    ("timm:test_resnet", "DEFAULT", (0.5, 0.5, 0.5), int(32 / 0.95), "bilinear"),
])
def test_an_image_folder_gets_the_weights_preprocessing(tmp_path, name, weights, mean, resize, interpolation):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    write_folder(tmp_path / "images")
    raw = demo_dict(tmp_path)
    raw["model"] = {"name": name, "weights": weights}
    raw["data"] = {"name": "imagefolder", "root": str(tmp_path / "images"), "input_size": 32, "reward_val_size": 2}
    steps = Workspace(config_from_dict(raw)).splits.test.transform.transforms
    resize_step, normalize = steps[0], steps[-1]
    assert (resize_step.size, resize_step.interpolation.value) == (resize, interpolation)
    assert tuple(normalize.mean) == pytest.approx(mean)


# --------------------------------------------------------------------------- timm


def test_a_timm_model_through_info_and_a_short_search(tmp_path, capsys):
    pytest.importorskip("timm")
    raw = demo_dict(tmp_path)
    raw["model"]["name"] = "timm:test_resnet"
    config = write_config(tmp_path / "timm.yaml", raw)
    assert main(["info", str(config)]) == 0
    info = capsys.readouterr().out
    assert "conv1.0" in info and "prunable units" in info.splitlines()[-1]
    assert main(["--quiet", "train", str(config), "--epochs", "2"]) == 0
    assert main(["--quiet", "search", str(config), "--episodes", "3", "--set", "search.select_top_k=2"]) == 0
    best = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert best["cost_ratio"] <= 0.5 + 1e-9
    assert main(["--quiet", "export", str(tmp_path / "run")]) == 0
    import amc

    pruned = amc.load_pruned(tmp_path / "run" / "pruned.pt")  # a timm model rebuilds from its name
    assert pruned(DIGITS).shape == (1, 10)


def test_timm_without_timm_says_how_to_install(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # as if the optional extra were not installed
    raw = demo_dict(tmp_path)
    raw["model"]["name"] = "timm:test_resnet"
    assert main(["info", str(write_config(tmp_path / "timm.yaml", raw))]) == 2
    assert "timm:<name> models need timm: pip install 'amc-search[timm]'" in capsys.readouterr().err


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, and a hub endpoint that refuses connections (no network)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    return tmp_path / "hf"


def timm_raw(tmp_path: Path) -> dict:
    raw = demo_dict(tmp_path)
    raw["model"] = {"name": "timm:test_resnet", "weights": "DEFAULT"}
    raw["data"] = {"name": f"{__name__}:random_images", "reward_val_size": 8, "select_size": 8}
    return raw


def test_timm_weights_load_from_the_hugging_face_cache(tmp_path, hf_cache):
    timm = pytest.importorskip("timm")
    torch.manual_seed(2)
    state = timm.create_model("test_resnet").state_dict()  # 1000 classes, as the pretrained weights
    snapshot = hf_cache / "models--timm--test_resnet.r160_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (hf_cache / "models--timm--test_resnet.r160_in1k" / "refs").mkdir()
    (hf_cache / "models--timm--test_resnet.r160_in1k" / "refs" / "main").write_text("abc123")
    save_file(state, str(snapshot / "model.safetensors"))
    base = Workspace(config_from_dict(timm_raw(tmp_path))).base_model
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())


def test_missing_timm_weights_fail_in_one_line_offline(tmp_path, hf_cache):
    pytest.importorskip("timm")
    with pytest.raises(UserError) as info:
        Workspace(config_from_dict(timm_raw(tmp_path))).base_model
    assert str(info.value).startswith("model.weights: cannot reach 127.0.0.1 to download the weights (")
    assert str(info.value).endswith("offline, they must be in the Hugging Face cache (HF_HOME)")
