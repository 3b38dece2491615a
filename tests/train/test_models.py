"""fastssl.models: torchvision-compatible ResNets, MLP heads, backbone checkpoints."""
import pytest
import torch
from torch import nn

from fastssl.models import (MLP, backbone_state_dict, build_backbone, load_backbone, resnet18,
                            resnet50)


def _torchvision_layout(arch: str) -> dict[str, tuple[int, ...]]:
    """torchvision's ResNet state_dict layout written out from its architecture table
    (BasicBlock [2,2,2,2] for resnet18, Bottleneck [3,4,6,3] for resnet50, fc 1000)."""
    def bn(prefix, c):
        return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}

    layout = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    bottleneck = arch == "resnet50"
    blocks = [3, 4, 6, 3] if bottleneck else [2, 2, 2, 2]
    expansion = 4 if bottleneck else 1
    in_ch = 64
    for stage, (n, width) in enumerate(zip(blocks, [64, 128, 256, 512]), start=1):
        out_ch = width * expansion
        for b in range(n):
            p = f"layer{stage}.{b}"
            if bottleneck:
                layout[f"{p}.conv1.weight"] = (width, in_ch, 1, 1)
                layout.update(bn(f"{p}.bn1", width))
                layout[f"{p}.conv2.weight"] = (width, width, 3, 3)
                layout.update(bn(f"{p}.bn2", width))
                layout[f"{p}.conv3.weight"] = (out_ch, width, 1, 1)
                layout.update(bn(f"{p}.bn3", out_ch))
            else:
                layout[f"{p}.conv1.weight"] = (width, in_ch, 3, 3)
                layout.update(bn(f"{p}.bn1", width))
                layout[f"{p}.conv2.weight"] = (width, width, 3, 3)
                layout.update(bn(f"{p}.bn2", width))
            if b == 0 and (stage > 1 or in_ch != out_ch):
                layout[f"{p}.downsample.0.weight"] = (out_ch, in_ch, 1, 1)
                layout.update(bn(f"{p}.downsample.1", out_ch))
            in_ch = out_ch
    layout["fc.weight"] = (1000, in_ch)
    layout["fc.bias"] = (1000,)
    return layout


@pytest.mark.parametrize("arch,params,entries", [("resnet18", 11_689_512, 122),
                                                 ("resnet50", 25_557_032, 320)])
def test_torchvision_compatible_keys(arch, params, entries):
    model = {"resnet18": resnet18, "resnet50": resnet50}[arch]()
    sd = model.state_dict()
    expected = _torchvision_layout(arch)
    assert list(sd) == list(expected)  # names and registration order
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert len(sd) == entries
    assert sum(p.numel() for p in model.parameters()) == params


def test_known_torchvision_keys():
    sd = resnet50().state_dict()
    assert tuple(sd["layer4.2.bn3.running_var"].shape) == (2048,)
    assert tuple(sd["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(sd["layer3.5.conv2.weight"].shape) == (256, 256, 3, 3)
    assert tuple(sd["fc.weight"].shape) == (1000, 2048)
    sd18 = resnet18().state_dict()
    assert "layer1.0.downsample.0.weight" not in sd18
    assert tuple(sd18["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)


def test_loads_into_torchvision():
    try:
        torchvision = pytest.importorskip("torchvision")
    except (RuntimeError, OSError) as e:  # a torchvision built for another torch fails on import
        pytest.skip(f"torchvision cannot be imported here: {e}")
    for name in ("resnet18", "resnet50"):
        ours = {"resnet18": resnet18, "resnet50": resnet50}[name]()
        theirs = getattr(torchvision.models, name)()
        theirs.load_state_dict(ours.state_dict(), strict=True)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        ours.eval()
        theirs.eval()
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(ours(x), theirs(x))


def test_init_and_zero_init_residual():
    torch.manual_seed(0)
    plain = resnet50()
    zero = resnet50(zero_init_residual=True)
    for name, m in zero.named_modules():
        if name.endswith("bn3"):
            assert torch.count_nonzero(m.weight) == 0, name
    for name, m in plain.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    # Kaiming normal, fan_out, relu: std = sqrt(2 / (out_channels * k * k)).
    w = plain.layer3[0].conv2.weight
    assert abs(w.std().item() / (2.0 / (256 * 9)) ** 0.5 - 1) < 0.05
    r18 = resnet18(zero_init_residual=True)
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for layer in
               (r18.layer1, r18.layer2, r18.layer3, r18.layer4) for b in layer)
    # Every residual branch is zero, so a block is relu(shortcut) and the net still runs.
    zero.eval()
    assert torch.isfinite(zero(torch.randn(1, 3, 32, 32))).all()


def test_build_backbone_and_channels_last():
    torch.manual_seed(0)
    model, dim = build_backbone("resnet18")
    assert dim == 512 and isinstance(model.fc, nn.Identity)
    assert build_backbone("resnet50")[1] == 2048
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    assert ref.shape == (2, 512)
    model_cl = model.to(memory_format=torch.channels_last)
    out = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="arch"):
        build_backbone("resnet34")


def test_mlp_shapes_and_options():
    head = MLP([32, 64, 16])
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head(torch.randn(4, 32)).shape == (4, 16)
    groco = MLP([32, 32, 32, 32], bias=False, last_bias=True, last_bn=True, last_bn_affine=False)
    linears = [m for m in groco if isinstance(m, nn.Linear)]
    assert [m.bias is None for m in linears] == [True, True, False]
    assert isinstance(groco[-1], nn.BatchNorm1d) and groco[-1].weight is None
    no_bn = MLP([8, 8, 4], bn=False)
    assert [type(m) for m in no_bn] == [nn.Linear, nn.ReLU, nn.Linear]
    assert MLP([8, 4])(torch.randn(3, 8)).shape == (3, 4)
    with pytest.raises(ValueError, match="dims"):
        MLP([8])
    with pytest.raises(ValueError, match="dims"):
        MLP([8, 0])


def test_backbone_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model, _ = build_backbone("resnet18")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    wrapped = nn.Sequential()
    wrapped.module = model  # a "module."-prefixed state dict, like DDP's
    sd = backbone_state_dict(model)
    assert not any(k.startswith(("fc.", "module.")) for k in sd)
    assert set(sd) == set(_torchvision_layout("resnet18")) - {"fc.weight", "fc.bias"}

    path = tmp_path / "ckpt.pt"
    torch.save({"version": 1, "arch": "resnet18", "backbone": sd, "epoch": 3}, path)
    loaded = load_backbone(str(path), "resnet18")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k

    # torchvision-format dicts: plain with fc, "module.", "module.backbone." plus a projector.
    full = resnet18().state_dict()
    full.update(sd)
    for prefix in ("", "module.", "module.backbone.", "backbone."):
        state = {prefix + k: v for k, v in full.items()}
        state[prefix.replace("backbone.", "") + "projector.0.weight"] = torch.zeros(2, 2)
        if prefix in ("", "module."):
            state.pop(prefix + "projector.0.weight")
        out = load_backbone(state, "resnet18")
        assert torch.equal(out.layer4[1].bn2.weight, sd["layer4.1.bn2.weight"])


def test_load_backbone_errors(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_backbone(str(missing), "resnet18")
    sd = backbone_state_dict(build_backbone("resnet18")[0])
    path = tmp_path / "r18.pt"
    torch.save({"arch": "resnet18", "backbone": sd}, path)
    with pytest.raises(ValueError, match="arch"):
        load_backbone(str(path), "resnet50")
    torch.save(sd, path)  # a plain resnet18 state dict read as resnet50
    with pytest.raises(ValueError, match=r"r18\.pt.*missing keys.*layer1\.0\.conv3\.weight"):
        load_backbone(str(path), "resnet50")
    bad = dict(sd)
    bad.pop("layer2.1.conv1.weight")
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys: 1 \(layer2\.1\.conv1\.weight\).*"
                                         r"unexpected keys: 1 \(extra\.weight\)"):
        load_backbone(bad, "resnet18")
    shaped = dict(sd)
    shaped["bn1.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"bn1\.weight.*\(3,\).*\(64,\)"):
        load_backbone(shaped, "resnet18")
    with pytest.raises(ValueError, match="arch"):
        load_backbone(sd, "vit")
