"""Networks and the two training regimes.

Both families use PyTorch's default initialisation (Kaiming-uniform weights with
``a = sqrt(5)``, uniform biases in ``±1/sqrt(fan_in)``): the "standard
parameterisation" that the paper calls common practice in continual learning.
The regimes differ only in the learning rate of plain SGD:

* ``fl`` (feature learning): ``lr = eta0`` at every width.
* ``lazy``: ``lr = eta0 * reference_width / width``. Under the standard
  parameterisation an ``O(1/width)`` step keeps every weight, and the kernel,
  close to its initial value as the width grows: the kernel (lazy) regime.
  At ``width == reference_width`` the two regimes coincide.
"""

from __future__ import annotations

import math

from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
}
REGIMES = ("fl", "lazy")


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"Unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}."
        ) from None


def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int,
    depth: int,
    activation: str = "relu",
    bias: bool = True,
) -> nn.Sequential:
    """A fully connected network: flatten, ``depth`` hidden layers, a linear head.

    Args:
        input_shape: shape of one example, e.g. ``(1, 8, 8)``.
        num_classes: number of logits (one shared head over all classes).
        width: units per hidden layer.
        depth: number of hidden ``Linear`` layers (at least 1).
        activation: name of the elementwise nonlinearity after each hidden layer.
        bias: whether every ``Linear`` layer has a bias.
    """
    if depth < 1:
        raise ValueError(f"model.depth must be at least 1 for an MLP, got {depth}.")
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width, bias=bias), _activation(activation)]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes, bias=bias))
    return nn.Sequential(*layers)


def cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int,
    depth: int,
    activation: str = "relu",
    bias: bool = True,
) -> nn.Sequential:
    """A small convolutional network: ``depth`` 3x3 conv layers and a linear head.

    Every conv layer has ``width`` channels, stride 1 and padding 1, followed by
    the activation and, while the feature map's side is above 4, a 2x2 average
    pool (8x8 digits: 8 -> 4; 32x32 CIFAR: 32 -> 16 -> 8 -> 4). The map is then
    flattened into one ``Linear`` layer to the logits. No normalisation layers, so
    the NTK does not depend on the batch.
    """
    if depth < 1:
        raise ValueError(f"model.depth must be at least 1 for a CNN, got {depth}.")
    channels, side, _ = input_shape
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [
            nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=bias),
            _activation(activation),
        ]
        channels = width
        if side > 4:
            layers.append(nn.AvgPool2d(2))
            side //= 2
    layers += [nn.Flatten(), nn.Linear(channels * side * side, num_classes, bias=bias)]
    return nn.Sequential(*layers)


def build_model(
    model_cfg: dict, input_shape: tuple[int, ...], num_classes: int
) -> nn.Sequential:
    """Build the network named by ``model_cfg``, the run config's ``model`` section."""
    builders = {"mlp": mlp, "cnn": cnn}
    arch = model_cfg["arch"]
    if arch not in builders:
        raise ValueError(
            f"Unknown model.arch {arch!r}; expected one of {sorted(builders)}."
        )
    if arch == "cnn" and len(input_shape) != 3:
        raise ValueError(
            f"model.arch 'cnn' needs image inputs (C, H, W), got shape {input_shape}."
        )
    return builders[arch](
        input_shape,
        num_classes,
        width=model_cfg["width"],
        depth=model_cfg["depth"],
        activation=model_cfg["activation"],
        bias=model_cfg["bias"],
    )


def learning_rate(regime: str, optim_cfg: dict, width: int) -> float:
    """The SGD step size of a run: ``eta0`` (fl) or ``eta0 * N0 / width`` (lazy)."""
    eta0 = optim_cfg["lr"]
    if regime == "fl":
        return eta0
    if regime == "lazy":
        return eta0 * optim_cfg["reference_width"] / width
    raise ValueError(f"Unknown regime {regime!r}; expected one of {list(REGIMES)}.")
