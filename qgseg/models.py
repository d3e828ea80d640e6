"""Segmentation architectures by name and weights-file loading (g, the quality net, is in quality.py).

All networks start from random initialisation (no downloads); pretrained weights come from a
local state dict (`weights_file`). Forward passes contain no Python-side shape logic, so the
models work with `channels_last` and `torch.compile`.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

from qgseg.errors import InputError, QgsegError

__all__ = [
    "SEG_ARCHS",
    "SegNet",
    "build_segmenter",
    "size_divisor",
    "check_image_size",
    "count_parameters",
    "load_state",
]

SWIN_ENCODER = "tu-swin_tiny_patch4_window7_224"
# Keys of classifier heads / final norms that a backbone checkpoint may carry and a
# feature extractor (smp encoder, timm num_classes=0 model) does not have.
HEAD_PREFIXES = ("fc.", "head.", "head_drop.", "classifier.", "last_linear.", "norm.", "fc_norm.")
_LIST_SMP_ENCODERS = (
    "python -c \"import segmentation_models_pytorch as smp; print(smp.encoders.get_encoder_names())\""
)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Arch:
    """A builder: `arch(encoder) -> nn.Module` (1 logit channel, random init)."""

    name: str
    build: Callable[[str], nn.Module]
    default_encoder: str
    divisor: int
    description: str
    min_size: int = 32

    def __call__(self, encoder: str = "") -> nn.Module:
        return self.build(encoder or self.default_encoder)


def _smp_builder(smp_name: str, **extra) -> Callable[[str], nn.Module]:
    def build(encoder: str) -> nn.Module:
        _check_smp_encoder(encoder)
        kwargs = dict(extra)
        if encoder.startswith("tu-") and "swin" in encoder:
            # timm Swin: accept any multiple of 32 (windows are padded), not only img_size.
            kwargs["strict_img_size"] = False
        if smp_name == "dpt":
            kwargs.setdefault("dynamic_img_size", True)
        try:
            return smp.create_model(
                smp_name, encoder_name=encoder, encoder_weights=None, in_channels=3, classes=1, **kwargs
            )
        except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
            raise InputError(
                f"model.encoder: encoder '{encoder}' does not work with architecture '{smp_name}' ({exc})"
            ) from None

    return build


def _build_swin_unet(encoder: str) -> nn.Module:
    if not (encoder.startswith("tu-") and "swin" in encoder):
        raise InputError(
            f"model.encoder: swin-unet needs a timm Swin encoder such as '{SWIN_ENCODER}' "
            f"(got '{encoder}'); leave model.encoder empty for the default"
        )
    return _smp_builder("unet")(encoder)


def _build_attention_unet(encoder: str) -> nn.Module:
    if encoder:
        raise InputError(
            f"model.encoder: attention-unet has no selectable encoder (got '{encoder}'); leave model.encoder empty"
        )
    from monai.networks.nets import AttentionUnet

    return AttentionUnet(
        spatial_dims=2, in_channels=3, out_channels=1, channels=(32, 64, 128, 256, 512), strides=(2, 2, 2, 2)
    )


def _smp_default_encoder(smp_name: str) -> str:
    cls = smp.MODEL_ARCHITECTURES_MAPPING[smp_name]
    return str(inspect.signature(cls.__init__).parameters["encoder_name"].default)


def _make_registry() -> dict[str, _Arch]:
    archs: dict[str, _Arch] = {
        "unet": _Arch("unet", _smp_builder("unet"), "resnet18", 32, "smp Unet"),
        "unetpp": _Arch("unetpp", _smp_builder("unetplusplus"), "resnet34", 32, "smp UnetPlusPlus"),
        "attention-unet": _Arch(
            "attention-unet",
            _build_attention_unet,
            "",
            16,
            "MONAI AttentionUnet (2-D, channels 32-512, 4 stride-2 levels)",
            16,
        ),
        "swin-unet": _Arch(
            "swin-unet",
            _build_swin_unet,
            SWIN_ENCODER,
            32,
            "smp Unet decoder on a timm Swin-T encoder (embed 96, depths 2/2/6/2, heads 3/6/12/24, window 7, patch 4)",
        ),
    }
    for smp_name in smp.MODEL_ARCHITECTURES_MAPPING:
        if smp_name not in archs:
            # PAN's feature pyramid attention pools the 1/32 map three more times.
            min_size = 128 if smp_name == "pan" else 32
            archs[smp_name] = _Arch(
                smp_name, _smp_builder(smp_name), _smp_default_encoder(smp_name), 32, f"smp {smp_name}", min_size
            )
    return archs


SEG_ARCHS: dict[str, _Arch] = _make_registry()
"""Architecture name -> builder. `SEG_ARCHS[name](encoder)` returns the raw network (1 logit
channel, random init); `build_segmenter` wraps it in a `SegNet`.

- unet: smp Unet, default encoder resnet18 (14.33M parameters).
- unetpp: smp UnetPlusPlus, default encoder resnet34 (26.08M, the paper's count).
- attention-unet: MONAI AttentionUnet, spatial_dims=2, channels (32, 64, 128, 256, 512),
  strides 2 (7.94M); input side must be a multiple of 16.
- swin-unet: smp Unet whose encoder is timm's Swin-T (`tu-swin_tiny_patch4_window7_224`:
  patch 4, embed 96, depths 2/2/6/2, heads 3/6/12/24, window 7), 31.63M parameters. It differs
  from Cao et al.'s Swin-Unet (~27M) in the decoder: a convolutional U-Net decoder (channels
  256/128/64/32/16, nearest upsampling + two 3x3 conv-BN-ReLU per level, skips at 1/4, 1/8, 1/16)
  instead of Swin blocks with patch expanding. The encoder is configured for 224 px; with
  `strict_img_size=False` it also takes any multiple of 32 (windows are zero-padded where the
  token grid is not a multiple of 7; 224 tiles exactly, like the paper's setting).
- any other smp architecture by its smp name (fpn, deeplabv3, deeplabv3plus, linknet, manet,
  pspnet, pan, upernet, segformer, dpt, unetplusplus), default encoder = smp's default; every
  smp encoder name, or any timm model as `tu-<name>`, is accepted as encoder.
"""


def _arch(arch: str) -> _Arch:
    key = arch.strip().lower()
    if key not in SEG_ARCHS:
        raise InputError(f"model.arch: unknown architecture '{arch}'; choose one of: {', '.join(SEG_ARCHS)}")
    return SEG_ARCHS[key]


def _check_smp_encoder(encoder: str) -> None:
    if encoder.startswith("tu-"):
        if timm.is_model(encoder[3:]):
            return
        raise InputError(
            f"model.encoder: '{encoder[3:]}' is not a timm model; list them with "
            "python -c \"import timm; print(timm.list_models())\""
        )
    names = smp.encoders.get_encoder_names()
    if encoder in names or (encoder.startswith("timm-") and timm.is_model(encoder[5:])):
        return
    examples = ", ".join(n for n in ("resnet18", "resnet34", "resnet50", "efficientnet-b0", "mobilenet_v2") if n in names)
    raise InputError(
        f"model.encoder: unknown encoder '{encoder}'; smp encoders include {examples} "
        f"({len(names)} in all, list them with {_LIST_SMP_ENCODERS}), or any timm model as 'tu-<name>'"
    )


# --------------------------------------------------------------------------- segmenter


class SegNet(nn.Module):
    """Binary segmentation network: (B,3,H,W) normalised images -> (B,1,H,W) logits.

    `spec` holds the build arguments (`build_segmenter(**spec)` rebuilds it); `forward_features`
    also returns the decoder feature map just before the segmentation head (smp: a 3x3 conv,
    MONAI AttentionUnet: a 1x1 conv), used by the
    contrastive method's projection head. For smp models that map is the decoder output, which
    for fpn / deeplabv3(+) / pspnet / upernet / segformer is at reduced resolution (the head
    upsamples); for the U-Net family it is at full resolution. For attention-unet it is the
    output of the top attention level (32 channels, full resolution).
    """

    def __init__(self, net: nn.Module, arch: str, encoder: str) -> None:
        super().__init__()
        self.net = net
        self.spec = {"arch": arch, "encoder": encoder}
        self._is_smp = isinstance(net, smp.base.SegmentationModel)
        self.feature_channels = _feature_channels(net, self._is_smp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._is_smp:
            feats = self.net.decoder(self.net.encoder(x))
            return self.net.segmentation_head(feats), feats
        head, body, reduce = self.net.model  # MONAI AttentionUnet: Sequential(head, encdec, 1x1 conv)
        feats = body(head(x))
        return reduce(feats), feats


def _feature_channels(net: nn.Module, is_smp: bool) -> int:
    head = net.segmentation_head if is_smp else net.model[-1]
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    raise QgsegError(f"cannot find the segmentation head's input channels in {type(net).__name__}")


def build_segmenter(arch: str, encoder: str = "", weights_file: str = "") -> SegNet:
    """Binary segmentation net: 3 input channels, 1 output logit channel, random init.

    `encoder` "" means the architecture's default (see `SEG_ARCHS`). `weights_file` is a local
    state dict (.pt/.pth/.safetensors, loaded with weights_only=True) for the whole model (a
    SegNet or the bare network) or for its encoder (e.g. a torchvision/timm ResNet checkpoint;
    classifier-head keys are ignored). Unknown arch/encoder -> InputError listing the choices.
    """
    spec = _arch(arch)
    name = arch.strip().lower()
    enc = encoder.strip() or spec.default_encoder
    model = SegNet(spec(enc), name, enc)
    if weights_file:
        _load_segmenter_weights(model, weights_file)
    return model


def _load_segmenter_weights(model: SegNet, path: str) -> None:
    state = read_state_dict(path, "model.weights_file")
    candidates: list[tuple[nn.Module, bool]] = [(model, False), (model.net, False)]
    if model._is_smp:
        mod: nn.Module = model.net.encoder
        candidates.append((mod, True))
        # timm-universal encoders nest the timm model one or two levels down.
        while isinstance(getattr(mod, "model", None), nn.Module):
            mod = mod.model
            candidates.append((mod, True))
    target, partial = max(candidates, key=lambda c: len(state.keys() & c[0].state_dict().keys()))
    if not state.keys() & target.state_dict().keys():
        raise InputError(
            f"model.weights_file: keys in {path} match neither the {model.spec['arch']} model nor its encoder "
            f"(first keys: {', '.join(list(state)[:3])})"
        )
    if partial:
        state = _feature_net_keys(state, target.state_dict().keys())
    load_into(target, state, path, "model.weights_file", HEAD_PREFIXES if partial else ())


def _feature_net_keys(state: Mapping[str, torch.Tensor], expected) -> dict[str, torch.Tensor]:
    """Rename `layers.0.x` to `layers_0.x` where the model expects that: timm feature-extraction
    wrappers flatten nested stage names, so a plain timm checkpoint (e.g. Swin) loads too."""
    out = {}
    for k, v in state.items():
        flat = re.sub(r"^([A-Za-z]\w*)\.(\d+)\.", r"\1_\2.", k)
        out[flat if k not in expected and flat in expected else k] = v
    return out


def size_divisor(arch: str) -> int:
    """Input side must be a multiple of this: 32 for smp models (including swin-unet: patch 4 and
    three 2x merges; 224 = 7 * 32 tiles the 7x7 windows exactly), 16 for attention-unet."""
    return _arch(arch).divisor


def check_image_size(arch: str, size: int, key: str = "data.image_size") -> None:
    """Raise InputError naming `key` unless `size` is a multiple of `size_divisor(arch)` and at
    least the architecture's minimum (32; 16 for attention-unet; 128 for pan)."""
    spec = _arch(arch)
    d, lo = spec.divisor, spec.min_size
    if isinstance(size, bool) or not isinstance(size, int) or size < lo or size % d:
        hint = ""
        if isinstance(size, int) and not isinstance(size, bool):
            near = sorted({max(lo, (size // d) * d), max(lo, (size // d + 1) * d)})
            hint = f" (e.g. {' or '.join(map(str, near))})"
        raise InputError(f"{key}: {arch} needs an image size that is a multiple of {d} and at least {lo}, got {size}{hint}")


def uncompiled(model: nn.Module) -> nn.Module:
    """The module itself under a ``torch.compile`` wrapper (the wrapper shares its parameters)."""
    return getattr(model, "_orig_mod", model)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- weights files


def read_state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    """Read a state dict (.safetensors or torch.load with weights_only=True), unwrapping common
    checkpoint containers and DDP / torch.compile key prefixes."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{what}: weights file {path} not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{what}: cannot read weights file {path} ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{what}: {path} is not a state dict (a mapping of parameter names to tensors)")
    state: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    return state


def load_into(
    module: nn.Module, state: Mapping[str, torch.Tensor], path: str, what: str, ignore: tuple[str, ...] = ()
) -> None:
    """Strict load; unexpected keys starting with `ignore` are dropped. Mismatches -> InputError."""
    expected = module.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(ignore)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
        )
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({'; '.join(shapes[:2])}{'; ...' if len(shapes) > 2 else ''})")
    if problems:
        raise InputError(f"{what}: weights file {path} does not fit {type(module).__name__}: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True)


def load_state(module: nn.Module, path: str, what: str) -> None:
    """Load the state dict in `path` into `module` (weights_only=True, strict).

    `what` names the option or file for the message (e.g. "quality.weights_file"); missing or
    unexpected keys and shape mismatches raise one InputError line listing a few of each.
    """
    load_into(module, read_state_dict(path, what), path, what)
