"""ResNet backbone with frozen batch norm, joined with the position encoding."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from runtime import compat

from .misc import NestedTensor
from .position_encoding import build_position_encoding


class BackboneBase(nn.Module):
    """Runs a ResNet body on a NestedTensor and returns its feature maps with resized masks."""

    def __init__(
        self, backbone: nn.Module, train_backbone: bool, num_channels: int, return_interm_layers: bool,
        train_stem: bool = False, last_layer: str = "layer4",
    ):
        super().__init__()
        trained = ("layer2", "layer3", "layer4") if not train_stem else ("",)
        for name, parameter in backbone.named_parameters():
            if not train_backbone or not any(layer in name for layer in trained):
                parameter.requires_grad_(False)
        if return_interm_layers:
            return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
        else:
            return_layers = {last_layer: "0"}
        self.body = IntermediateLayerGetter(backbone, return_layers=return_layers)
        self.num_channels = num_channels

    def forward(self, tensor_list: NestedTensor) -> Dict[str, NestedTensor]:
        """[B, 3, H, W] -> {name: NestedTensor([B, C, H/32, W/32], mask [B, H/32, W/32])}."""
        xs = self.body(tensor_list.tensors)
        m = tensor_list.mask
        out = {}
        for name, x in xs.items():
            mask = F.interpolate(m[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            out[name] = NestedTensor(x, mask)
        return out


class Backbone(BackboneBase):
    """A torchvision ResNet (random init unless ``weights_path`` names a local ImageNet state_dict).

    ``norm="frozen"`` is the reference (FrozenBatchNorm2d, stem and layer1 frozen), made for
    pretrained weights; ``norm="batch"`` trains every layer with BatchNorm2d, which a backbone
    trained from scratch needs. ``stride=16`` stops after layer3 (half the channels), for small images.
    """

    def __init__(
        self,
        name: str,
        train_backbone: bool,
        return_interm_layers: bool,
        dilation: bool,
        weights_path: Optional[str] = None,
        norm: str = "frozen",
        stride: int = 32,
    ):
        if not name.startswith("resnet") or not hasattr(torchvision.models, name):
            raise ValueError(f"unknown backbone {name!r}: expected a torchvision ResNet such as resnet50 or resnet18")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet such as resnet50, not {name}")
        norms = {"frozen": FrozenBatchNorm2d, "batch": nn.BatchNorm2d}
        if norm not in norms:
            raise ValueError(f"unknown backbone norm {norm!r}: expected one of {', '.join(norms)}")
        if stride not in (16, 32):
            raise ValueError(f"backbone stride must be 16 or 32, got {stride}")
        backbone = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=norms[norm]
        )
        if weights_path is not None:
            state = compat.load(weights_path, weights_only=True, map_location="cpu")
            backbone.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        num_channels = 512 if name in ("resnet18", "resnet34") else 2048
        if stride == 16:
            num_channels //= 2
        super().__init__(backbone, train_backbone, num_channels, return_interm_layers,
                         train_stem=norm == "batch", last_layer="layer4" if stride == 32 else "layer3")


class Joiner(nn.Sequential):
    """``[0]`` the backbone, ``[1]`` the position encoding: the state_dict layout of the reference."""

    def __init__(self, backbone: nn.Module, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, tensor_list: NestedTensor) -> Tuple[List[NestedTensor], List[Tensor]]:
        xs = self[0](tensor_list)
        out, pos = [], []
        for _, x in xs.items():
            out.append(x)
            pos.append(self[1](x).to(x.tensors.dtype))
        return out, pos


def build_backbone(cfg) -> Joiner:
    position_embedding = build_position_encoding(cfg)
    train_backbone = cfg.lr_backbone > 0
    backbone = Backbone(
        cfg.backbone, train_backbone, False, cfg.dilation, cfg.backbone_weights, cfg.backbone_norm, cfg.backbone_stride
    )
    return Joiner(backbone, position_embedding)
