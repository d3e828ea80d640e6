import pytest
import timm
import torch
import torch.nn.functional as F

from qgseg.errors import InputError
from qgseg.models import SEG_ARCHS, build_segmenter, check_image_size, count_parameters, load_state, size_divisor
from qgseg.quality import QualityNet, build_quality_net, dihedral_views, scoring_views


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These nets are tiny at 32-64 px; one thread avoids OpenMP spinning on a shared 2-core box.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# arch -> (feature channels, feature side at 64 px input)
ARCHS = {
    "unet": (16, 64),
    "unetpp": (16, 64),
    "attention-unet": (32, 64),
    "swin-unet": (16, 64),
    "fpn": (128, 16),
    "deeplabv3plus": (256, 16),
    "linknet": (32, 64),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_named_archs_build_and_forward_at_64px(arch):
    torch.manual_seed(0)
    model = build_segmenter(arch, encoder="resnet18" if arch in ("fpn", "deeplabv3plus", "linknet") else "").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, feats = model.forward_features(x)
        out = model(x)
    channels, side = ARCHS[arch]
    assert out.shape == (2, 1, 64, 64)
    assert torch.allclose(out, logits, atol=1e-5)
    assert feats.shape == (2, channels, side, side)
    assert model.feature_channels == channels
    assert torch.isfinite(out).all()


def test_spec_rebuilds_the_same_architecture():
    model = build_segmenter("unet")
    assert model.spec == {"arch": "unet", "encoder": "resnet18"}
    again = build_segmenter(**model.spec)
    again.load_state_dict(model.state_dict())  # strict: same keys and shapes
    with torch.device("meta"):
        assert build_segmenter("UNetPP", "resnet18").spec == {"arch": "unetpp", "encoder": "resnet18"}


def test_parameter_counts():
    with torch.device("meta"):  # no weight init: fast
        assert abs(count_parameters(build_segmenter("unetpp", "resnet34")) - 26.08e6) < 0.01e6
        assert count_parameters(build_segmenter("unet")) == 14_328_209
        assert count_parameters(build_segmenter("attention-unet")) == 7_940_321


def test_swin_unet_is_swin_tiny():
    with torch.device("meta"):
        model = build_segmenter("swin-unet")
    enc = model.net.encoder.model
    stages = [getattr(enc, f"layers_{i}") for i in range(4)]
    assert enc.patch_embed.proj.kernel_size == (4, 4) and enc.patch_embed.proj.out_channels == 96
    assert [len(s.blocks) for s in stages] == [2, 2, 6, 2]
    assert [s.blocks[0].attn.num_heads for s in stages] == [3, 6, 12, 24]
    assert all(s.blocks[0].window_size == (7, 7) for s in stages)
    with pytest.raises(InputError, match="Swin"):
        build_segmenter("swin-unet", "resnet34")


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    model = build_segmenter("unet").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(ref, out, atol=1e-4)


def test_unknown_arch_and_encoder_raise_input_error():
    with pytest.raises(InputError, match="model.arch.*unetpp"):
        build_segmenter("nonet")
    with pytest.raises(InputError, match="model.encoder.*get_encoder_names"):
        build_segmenter("unet", "resnet999")
    with pytest.raises(InputError, match="timm"):
        build_segmenter("unet", "tu-not_a_model")
    with pytest.raises(InputError, match="attention-unet"):
        build_segmenter("attention-unet", "resnet18")
    assert {"unet", "unetpp", "attention-unet", "swin-unet", "fpn", "deeplabv3plus", "manet", "pspnet"} <= set(SEG_ARCHS)


def test_size_divisor_and_check_image_size():
    assert size_divisor("unetpp") == 32 and size_divisor("swin-unet") == 32 and size_divisor("attention-unet") == 16
    check_image_size("unet", 64)
    check_image_size("swin-unet", 224)
    check_image_size("attention-unet", 48)
    with pytest.raises(InputError, match=r"data.image_size.*32.*\b100\b.*96 or 128"):
        check_image_size("unet", 100)
    with pytest.raises(InputError, match="train.size"):
        check_image_size("unetpp", 0, key="train.size")
    with pytest.raises(InputError, match="at least 128"):
        check_image_size("pan", 64)
    with pytest.raises(InputError, match="model.arch"):
        check_image_size("nonet", 64)


def test_segmenter_weights_file_whole_model_and_encoder(tmp_path):
    torch.manual_seed(0)
    src = build_segmenter("unet")
    whole = tmp_path / "whole.pt"
    torch.save({"state_dict": src.state_dict()}, whole)
    loaded = build_segmenter("unet", weights_file=str(whole))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), loaded.state_dict().values()))

    # A plain timm ResNet-18 classification checkpoint loads into the smp encoder (fc ignored).
    backbone = timm.create_model("resnet18", num_classes=10)
    enc_file = tmp_path / "resnet18.pth"
    torch.save(backbone.state_dict(), enc_file)
    model = build_segmenter("unet", weights_file=str(enc_file))
    assert torch.equal(model.net.encoder.conv1.weight, backbone.conv1.weight)
    assert torch.equal(model.net.encoder.layer4[1].conv2.weight, backbone.layer4[1].conv2.weight)

    bad = tmp_path / "bad.pt"
    torch.save({"something.else": torch.zeros(3)}, bad)
    with pytest.raises(InputError, match="model.weights_file.*match neither"), torch.device("meta"):
        build_segmenter("unet", weights_file=str(bad))
    with pytest.raises(InputError, match="not found"), torch.device("meta"):
        build_segmenter("unet", weights_file=str(tmp_path / "missing.pt"))


def test_quality_net_output_range_shape_and_mask_gradient():
    torch.manual_seed(0)
    g = build_quality_net("resnet18")
    assert isinstance(g, QualityNet) and g.spec == {"backbone": "resnet18", "in_chans": 4, "input_size": 0,
                                                 "tta_views": 1}
    assert g.backbone.conv1.in_channels == 4
    assert [type(m).__name__ for m in g.head] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert g.head[0].p == 0.15 and g.head[3].p == 0.075 and g.head[1].in_features == 512
    image = torch.randn(3, 3, 32, 32)
    mask = (torch.rand(3, 1, 32, 32) > 0.5).float().requires_grad_(True)
    q = g.eval()(image, mask)
    assert q.shape == (3,)
    assert torch.all((q > 0) & (q < 1))
    q.sum().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0
    # Default Linear init: the random-init head does not saturate the sigmoid.
    assert torch.all((q > 0.05) & (q < 0.95))


def test_quality_net_input_size_resizes_image_and_mask_first():
    torch.manual_seed(0)
    small = build_quality_net("resnet18", input_size=32).eval()
    full = build_quality_net("resnet18").eval()
    full.load_state_dict(small.state_dict())  # same weights; only the resize differs
    assert small.spec["input_size"] == 32 and QualityNet(**small.spec).input_size == 32
    image = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, :32, :31] = 1.0
    mask.requires_grad_(True)
    q = small(image, mask)
    # area averaging: a 2x2 block becomes its mean, so an odd-width mask turns soft at its edge
    ref = full(F.avg_pool2d(image, 2), F.avg_pool2d(mask.detach(), 2))
    assert torch.allclose(q, ref, atol=1e-6)
    assert not torch.allclose(q, full(image, mask.detach()), atol=1e-3)
    q.sum().backward()  # QAR needs gradients through the resize into the mask
    assert mask.grad.abs().sum() > 0
    assert torch.allclose(small(F.avg_pool2d(image, 2), F.avg_pool2d(mask.detach(), 2)), ref, atol=1e-6)


def test_dihedral_views_are_the_flips_and_rotations_of_the_square():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    two, four, eight = (dihedral_views(x, n) for n in (2, 4, 8))
    assert two.shape == (4, 1, 3, 3) and torch.equal(two[:2], x) and torch.equal(two[2:], x.flip(-1))
    assert torch.equal(four[:2], x) and torch.equal(four[2:4], x.transpose(-2, -1).flip(-2))  # 90 degrees
    # eight: all distinct arrangements of an asymmetric square, the four rotations first
    assert torch.equal(eight[:8], four)
    assert len({tuple(eight[i].flatten().tolist()) for i in range(0, 16, 2)}) == 8
    with pytest.raises(ValueError, match="square"):
        dihedral_views(torch.zeros(1, 1, 2, 3), 4)


def test_quality_net_tta_averages_its_views_in_eval_mode_only():
    torch.manual_seed(0)
    plain = build_quality_net("resnet18").eval()
    tta = build_quality_net("resnet18", tta_views=4)
    tta.load_state_dict(plain.state_dict())
    assert QualityNet(**tta.spec).spec["tta_views"] == 4  # saved with g, so every user of g scores alike
    image, mask = torch.randn(3, 3, 32, 32), (torch.rand(3, 1, 32, 32) > 0.5).float()
    views = [plain(torch.rot90(image, k, (2, 3)), torch.rot90(mask, k, (2, 3))) for k in range(4)]
    assert torch.allclose(tta.eval()(image, mask), torch.stack(views).mean(0), atol=1e-6)
    assert not torch.allclose(views[0], views[1], atol=1e-4)  # the views do differ
    # train mode: one view (the training batches bring their own random flips and rotations)
    torch.manual_seed(1)
    a = tta.train()(image, mask)
    torch.manual_seed(1)
    b = plain.train()(image, mask)
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="tta_views"):
        QualityNet("resnet18", tta_views=3)
    # scoring_views: a temporary number of views, restored even when the block raises
    with pytest.raises(RuntimeError):
        with scoring_views(tta, 1):
            # (the train-mode passes above moved both nets' BatchNorm statistics alike)
            assert torch.allclose(tta.eval()(image, mask), plain.eval()(image, mask), atol=1e-6)
            raise RuntimeError
    assert tta.spec["tta_views"] == 4


def test_quality_net_weights_file_adapts_three_channel_conv(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("resnet18", num_classes=1000)  # a 3-channel ImageNet-style checkpoint
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    g = build_quality_net("resnet18", weights_file=str(path))
    w = g.backbone.conv1.weight
    assert w.shape == (64, 4, 7, 7)
    assert torch.equal(w[:, :3], src.conv1.weight)
    assert torch.allclose(w[:, 3], src.conv1.weight.mean(dim=1))
    assert torch.equal(g.backbone.layer3[0].conv1.weight, src.layer3[0].conv1.weight)

    # A whole QualityNet state dict (4 channels, with head) round-trips, also as safetensors.
    from safetensors.torch import save_file

    st = tmp_path / "g.safetensors"
    save_file({k: v.contiguous() for k, v in g.state_dict().items()}, str(st))
    g2 = build_quality_net("resnet18", weights_file=str(st))
    assert all(torch.equal(a, b) for a, b in zip(g.state_dict().values(), g2.state_dict().values()))


def test_quality_net_mismatched_weights_and_unknown_backbone(tmp_path):
    state = timm.create_model("resnet18", num_classes=0).state_dict()
    del state["layer4.1.bn2.weight"]
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(InputError, match=r"quality.weights_file.*1 missing keys \(layer4.1.bn2.weight\).*shape"):
        build_quality_net("resnet18", weights_file=str(path))
    with pytest.raises(InputError, match="quality.backbone.*timm.list_models"):
        build_quality_net("resnet_nope")


def test_load_state_strict_with_clear_errors(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    good = tmp_path / "good.pt"
    # DDP-style "module." prefixes are stripped.
    torch.save({f"module.{k}": v + 1 for k, v in net.state_dict().items()}, good)
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    load_state(other, str(good), "ssl.init")
    assert torch.equal(other[0].weight, net[0].weight + 1)

    wrong = tmp_path / "wrong.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 1)).state_dict(), wrong)
    with pytest.raises(InputError, match=r"ssl.init.*shape mismatch.*0.weight"):
        load_state(other, str(wrong), "ssl.init")
    pickle = tmp_path / "pickle.pt"
    torch.save({"net": net}, pickle)  # a pickled module is refused by weights_only=True
    with pytest.raises(InputError, match="ssl.init"):
        load_state(other, str(pickle), "ssl.init")
