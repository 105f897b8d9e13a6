"""Tests of ntkcl.ntk against a brute-force per-example autograd Jacobian."""

import copy
import functools
import logging
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ntkcl.ntk import empirical_ntk, plan_ntk

KINDS = ("full", "diagonal", "trace")
PATHS = ("structured", "jacobian")
EXACT = 1e-10  # relative, float64


# reference: per-example Jacobians by plain autograd, one logit at a time


def jacobian_rows(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(n, K, P)`` Jacobian of the logits w.r.t. the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1])[0]
        per_logit = []
        for a in range(out.shape[0]):
            grads = torch.autograd.grad(
                out[a], params, retain_graph=True, allow_unused=True
            )
            flat = [
                torch.zeros_like(p).flatten() if g is None else g.flatten()
                for g, p in zip(grads, params, strict=True)
            ]
            per_logit.append(torch.cat(flat))
        rows.append(torch.stack(per_logit))
    return torch.stack(rows)


def reference(model, x1, x2=None, kind="full"):
    """The NTK by contracting brute-force Jacobians, in eval mode."""
    training = model.training
    model.eval()
    j1 = jacobian_rows(model, x1)
    j2 = j1 if x2 is None else jacobian_rows(model, x2)
    model.train(training)
    full = torch.einsum("iap,jbp->ijab", j1, j2)
    if kind == "full":
        return full
    diagonal = torch.diagonal(full, dim1=2, dim2=3)
    return diagonal if kind == "diagonal" else diagonal.sum(-1)


def assert_close(actual, expected, rtol=EXACT):
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(1e-300)
    error = ((actual - expected).abs().max() / scale).item()
    assert error <= rtol, f"relative error {error:.2e} above {rtol:.0e}"


# networks; inputs are (n, 5) for MLPs and (n, 2, 8, 8) for CNNs


class SequenceNet(nn.Module):
    """A Linear layer applied at every position of a sequence."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 4)
        self.mix = nn.Linear(4, 3)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x)).unsqueeze(1).expand(-1, 2, -1) * 1.5
        return self.head(self.mix(h).flatten(1))


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.block = nn.Linear(6, 6)
        self.unused = nn.Linear(6, 6)  # never called: contributes nothing
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = h + torch.tanh(self.block(h))
        return self.out(h)


class Wrapped(nn.Module):
    """A module that only calls its inner network: not an nn.Sequential, so the
    structured path takes its cotangents from autograd instead of a chain."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


class ReversedSequential(nn.Sequential):
    """An nn.Sequential subclass whose forward is not Sequential's: no chain."""

    def forward(self, x):
        return super().forward(x.flip(-1))


def chain_mix():
    """Every kind of module a chain may hold, frozen layers included."""
    frozen = nn.Linear(6, 6)
    frozen.requires_grad_(False)
    return nn.Sequential(
        nn.Tanh(),  # before the Flatten: applied, never differentiated
        nn.Flatten(),
        nn.Linear(2 * 8 * 8, 7),
        nn.LeakyReLU(0.1, inplace=True),
        nn.Dropout(0.5),  # the identity in eval mode
        nn.Linear(7, 6, bias=False),  # two Linear layers in a row
        nn.Linear(6, 6),
        nn.Identity(),
        nn.Sequential(nn.Softplus(), frozen, nn.ELU()),
        nn.ReLU(inplace=True),
        nn.Linear(6, 3),
    )


def patched(module: nn.Module, forward) -> nn.Module:
    """``module`` with ``forward`` replaced on the instance, as some libraries do."""
    module.forward = types.MethodType(forward, module)
    return module


def shadowed(layer: nn.Linear) -> nn.Linear:
    """``layer`` with a plain tensor that hides its registered weight (float64:
    ``.double()`` converts only the registered one)."""
    object.__setattr__(layer, "weight", layer.weight.detach().double() * 2)
    return layer


def mlp_patched_activation():
    """A chain whose activation computes something else than its type says."""
    net = mlp(nn.ReLU())  # a chain would use ReLU's mask as the derivative
    patched(net[1], lambda self, t: torch.sin(t))
    return net


def mlp(activation, bias=True):
    return nn.Sequential(
        nn.Linear(5, 7, bias=bias),
        activation,
        nn.Linear(7, 6, bias=bias),
        activation,
        nn.Linear(6, 3, bias=bias),
    )


def cnn_max():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    )


def cnn_avg():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding="same", dilation=2),
        nn.GELU(),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 3, 2, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 3, bias=False),
    )


NETWORKS = {
    "mlp-relu": lambda: mlp(nn.ReLU()),
    "mlp-tanh-nobias": lambda: mlp(nn.Tanh(), bias=False),
    "mlp-gelu": lambda: mlp(nn.GELU()),
    "mlp-relu-autograd": lambda: Wrapped(mlp(nn.ReLU())),
    "mlp-subclass": lambda: ReversedSequential(*mlp(nn.SiLU())),
    "image-chain-mix": chain_mix,
    "mlp-patched-activation": mlp_patched_activation,
    "cnn-stride-maxpool": cnn_max,
    "cnn-dilation-avgpool": cnn_avg,
    "sequence-linear": SequenceNet,
    "residual": ResidualNet,
}


def inputs(name, n, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 2, 8, 8) if name.startswith(("cnn", "image", "prelu-cnn")) else (n, 5)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def network(name):
    torch.manual_seed(0)
    return NETWORKS[name]().double()


_REFERENCES = {}


def reference_for(name, symmetric):
    key = (name, symmetric)
    if key not in _REFERENCES:
        net, x1, x2 = network(name), inputs(name, 4, 1), inputs(name, 3, 2)
        _REFERENCES[key] = reference(net, x1, None if symmetric else x2)
    return _REFERENCES[key]


def reduce(full, kind):
    if kind == "full":
        return full
    diagonal = torch.diagonal(full, dim1=2, dim2=3)
    return diagonal if kind == "diagonal" else diagonal.sum(-1)


@pytest.mark.parametrize("symmetric", [True, False], ids=["x2-none", "x2-given"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_matches_brute_force(name, kind, path, symmetric):
    net, x1, x2 = network(name), inputs(name, 4, 1), inputs(name, 3, 2)
    got = empirical_ntk(
        net, x1, None if symmetric else x2, kind=kind, implementation=path
    )
    assert_close(got, reduce(reference_for(name, symmetric), kind))


@pytest.mark.parametrize("name", list(NETWORKS))
def test_auto_takes_the_structured_path(name):
    net = network(name)
    plan = plan_ntk(net, inputs(name, 4, 1), kind="full")
    assert plan.implementation == "structured", plan.reason
    assert plan.structured_unsupported is None
    assert plan.flops["structured"] <= plan.flops["jacobian"]


COTANGENTS = {
    "mlp-relu": "chain",
    "mlp-tanh-nobias": "chain",
    "mlp-gelu": "chain",
    "image-chain-mix": "chain",
    "mlp-relu-autograd": "autograd",
    "mlp-subclass": "autograd",
    "mlp-patched-activation": "autograd",
    "cnn-stride-maxpool": "autograd",
}


@pytest.mark.parametrize("name", list(COTANGENTS))
def test_plain_sequential_mlps_propagate_cotangents_by_hand(name, caplog):
    net, x = network(name), inputs(name, 4, 1)
    assert plan_ntk(net, x).cotangents == COTANGENTS[name]
    with caplog.at_level(logging.DEBUG, logger="ntkcl.ntk"):
        empirical_ntk(net, x)
    assert f"structured, {COTANGENTS[name]} cotangents" in caplog.text
    plan = plan_ntk(net, x, implementation="jacobian")
    assert plan.cotangents is None and plan.method == "jacobian, nested vmap"


def test_inputs_that_do_not_fit_a_chain_are_named():
    net = mlp(nn.ReLU()).double()
    with pytest.raises(ValueError, match=r"takes 5 features .* has 4; pass inputs"):
        empirical_ntk(net, torch.randn(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("name", ["mlp-relu", "mlp-relu-autograd"])
def test_nothing_trainable_gives_a_zero_kernel(name, caplog):
    net, x = network(name), inputs(name, 4, 1)
    net.requires_grad_(False)
    for kind in KINDS:
        assert not empirical_ntk(net, x, kind=kind).any()
    assert "no trainable parameters" in caplog.text  # said, not silent


@pytest.mark.parametrize("name", ["mlp-relu", "mlp-relu-autograd"])
def test_a_readout_whose_weight_was_replaced(name):
    # the layer's in/out_features attributes go stale; its weight's shape counts
    net, x = network(name), inputs(name, 4, 1)
    head = getattr(net, "inner", net)[4]
    head.weight = nn.Parameter(torch.randn(2, 6, dtype=torch.float64))
    head.bias = nn.Parameter(torch.randn(2, dtype=torch.float64))
    assert_close(empirical_ntk(net, x, kind="full"), reference(net, x))


@pytest.mark.parametrize("name", ["mlp-relu", "cnn-stride-maxpool"])
def test_symmetric_and_positive_semidefinite(name):
    net, x = network(name), inputs(name, 6, 3)
    full = empirical_ntk(net, x, kind="full")
    n, k = x.shape[0], full.shape[-1]
    matrix = full.permute(0, 2, 1, 3).reshape(n * k, n * k)
    assert torch.equal(matrix, matrix.T)
    assert torch.linalg.eigvalsh(matrix).min() >= -EXACT * matrix.abs().max()
    diagonal = empirical_ntk(net, x, kind="diagonal")
    for kernel in [empirical_ntk(net, x, kind="trace")] + list(diagonal.unbind(-1)):
        assert torch.equal(kernel, kernel.T)
        assert torch.linalg.eigvalsh(kernel).min() >= -EXACT * kernel.abs().max()


def test_nearly_equal_estimates_are_told_apart():
    # a tiny network: both estimates are mostly the fixed cost of a call
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    plan = plan_ntk(net, torch.randn(3, 4))
    first, second = plan.reason.removeprefix("estimated ").split(" flop against ")
    assert float(first) < float(second)
    assert float(first) == pytest.approx(plan.flops[plan.implementation], rel=1e-6)


def test_the_chosen_path_is_logged(caplog):
    net, x = network("mlp-relu"), inputs("mlp", 3, 1)
    with caplog.at_level(logging.DEBUG, logger="ntkcl.ntk"):
        same = empirical_ntk(net, x, x, kind="diagonal")  # x2 is x1: symmetric
    assert "empirical NTK: structured" in caplog.text
    assert torch.equal(same, empirical_ntk(net, x, kind="diagonal"))


def test_row_blocks_of_a_larger_probe_set():
    # more than 128 examples: the symmetric kernel is contracted in row blocks
    net, x = network("mlp-tanh-nobias"), inputs("mlp-tanh-nobias", 136, 4)
    plan = plan_ntk(net, x, kind="full")
    assert plan.cached
    assert_close(empirical_ntk(net, x, kind="full"), reference(net, x))


# networks the structured path must refuse, and the generic path computes exactly


class TiedNet(nn.Module):
    def __init__(self, share_parameter: bool):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        if share_parameter:
            self.b.weight = self.a.weight  # one Parameter in two modules
        self.out = nn.Linear(5, 3)
        self.reuse = not share_parameter

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh((self.a if self.reuse else self.b)(h))  # module called twice
        return self.out(h)


class SharedModuleNet(nn.Module):
    """One Linear module registered under two names (``self.b = self.a``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = self.a
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


class FunctionalUseNet(nn.Module):
    """Uses a Linear layer's weight outside the layer's own call."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x)) + x @ self.a.weight.T
        return self.out(h)


UNSUPPORTED = {
    "layernorm": (
        lambda: nn.Sequential(
            nn.Linear(5, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3)
        ),
        "LayerNorm",
    ),
    "batchnorm": (
        lambda: nn.Sequential(
            nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)
        ),
        "BatchNorm1d",
    ),
    "tied-parameter": (lambda: TiedNet(share_parameter=True), "same tensor"),
    "module-called-twice": (lambda: TiedNet(share_parameter=False), "called 2 times"),
    "inplace-relu": (  # in a plain Sequential the chain handles it (see NETWORKS)
        lambda: Wrapped(
            nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))
        ),
        "in place",
    ),
    "functional-use": (FunctionalUseNet, "more than once"),
    "module-registered-twice": (SharedModuleNet, "shared module"),
    "prelu": (  # torch.func's nested vmap is wrong here: see the test below
        lambda: nn.Sequential(nn.Linear(5, 6), nn.PReLU(6), nn.Linear(6, 3)),
        "PReLU",
    ),
    "patched-forward": (  # the readout scales its weight: not what Linear does
        lambda: nn.Sequential(
            nn.Linear(5, 6),
            nn.Tanh(),
            patched(nn.Linear(6, 3), lambda self, t: F.linear(t, 2 * self.weight)),
        ),
        "'forward' replaced on the instance",
    ),
    "shadowed-weight": (  # the registered weight is unused, a plain tensor acts
        lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), shadowed(nn.Linear(6, 3))),
        "'weight' replaced on the instance",
    ),
    "conv1d": (
        lambda: nn.Sequential(
            nn.Unflatten(1, (1, 5)),
            nn.Conv1d(1, 2, 1),  # not Conv2d
            nn.Flatten(),
            nn.Linear(10, 3),
        ),
        "Conv1d",
    ),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_networks_fall_back_and_stay_exact(name):
    factory, why = UNSUPPORTED[name]
    torch.manual_seed(0)
    net = factory().double()
    x1, x2 = inputs("mlp", 4, 1), inputs("mlp", 3, 2)
    plan = plan_ntk(net, x1, kind="full")
    assert plan.implementation == "jacobian"
    assert why in plan.structured_unsupported
    with pytest.raises(ValueError, match="cannot compute this network exactly"):
        empirical_ntk(net, x1, kind="trace", implementation="structured")
    assert_close(empirical_ntk(net, x1, x2, kind="full"), reference(net, x1, x2))


def _scaled_linear(self, t):
    return F.linear(t, 2 * self.weight, self.bias)


def _leaky_relu(self, t):
    return F.leaky_relu(t, 0.3)


_original_linear = F.linear


def _scaled_functional_linear(t, weight, bias=None):
    return _original_linear(t, 2 * weight, bias)


@functools.wraps(nn.Linear.forward)
def _wrapped_linear(self, t):  # a patch that looks like torch's own
    return 2 * F.linear(t, self.weight, self.bias)


# patches on a class or in torch.nn.functional (every instance), with the path
# they leave and why: the structured path computes what torch's own layers compute
CLASS_PATCHES = {
    "Linear.forward": (nn.Linear, "forward", _scaled_linear, "jacobian"),
    "wrapped Linear.forward": (nn.Linear, "forward", _wrapped_linear, "jacobian"),
    "functional.linear": (F, "linear", _scaled_functional_linear, "jacobian"),
    "Conv2d._conv_forward": (
        nn.Conv2d,
        "_conv_forward",
        lambda self, t, w, b: F.conv2d(t, 2 * w, b, self.stride, self.padding),
        "jacobian",
    ),
    # a patched activation costs an MLP only its hand-propagated cotangents
    "ReLU.forward": (nn.ReLU, "forward", _leaky_relu, "structured"),
}


@pytest.mark.parametrize("patch", list(CLASS_PATCHES))
def test_layers_patched_on_their_class_stay_exact(patch, monkeypatch):
    target, attr, replacement, path = CLASS_PATCHES[patch]
    monkeypatch.setattr(target, attr, replacement)
    name = "cnn-stride-maxpool" if "Conv2d" in patch else "mlp-relu"
    net, x1, x2 = network(name), inputs(name, 4, 1), inputs(name, 3, 2)
    plan = plan_ntk(net, x1, kind="full")
    assert plan.implementation == path
    if path == "jacobian":
        assert patch.split(".")[-1] in plan.structured_unsupported
    else:
        assert plan.cotangents == "autograd"
    assert_close(empirical_ntk(net, x1, x2, kind="full"), reference(net, x1, x2))


@pytest.mark.parametrize("target", [F, torch])
def test_a_patched_relu_function_is_caught_when_computing(target, monkeypatch, caplog):
    # nn.ReLU's forward is torch's own, but the function it calls is not: the
    # chain's mask would be the wrong derivative
    leaky = functools.partial(F.leaky_relu, negative_slope=0.3)
    monkeypatch.setattr(target, "relu", lambda t, inplace=False: leaky(t))
    net, x1, x2 = network("mlp-relu"), inputs("mlp", 4, 1), inputs("mlp", 3, 2)
    assert plan_ntk(net, x1).method == "structured, chain cotangents"
    with caplog.at_level(logging.INFO, logger="ntkcl.ntk"):
        got = empirical_ntk(net, x1, x2, kind="full")
    assert "does not compute max(x, 0)" in caplog.text
    assert_close(got, reference(net, x1, x2))


def prelu_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2),
        nn.PReLU(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 3),
    )


class RecurrentNet(nn.Module):
    """An RNN cell over the 5 features as a sequence: torch.func's vmap fails."""

    def __init__(self):
        super().__init__()
        self.cell = nn.RNNCell(1, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = None
        for t in range(x.shape[1]):
            h = self.cell(x[:, t : t + 1], h)
        return self.head(h)


class CapturedWeightNet(nn.Module):
    """Reaches a weight through a list of its own, which torch.func's
    functional_call cannot swap: only plain autograd sees its share."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.out = nn.Linear(6, 3)
        self.held = [self.a.weight]

    def forward(self, x):
        return self.out(torch.tanh(F.linear(x, self.held[0], self.a.bias)))


def backward_hooked():
    net = mlp(nn.Tanh())
    net[2].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    return net


# networks on which the jacobian path cannot use torch.func's fastest way: PReLU's
# batching rule fails under a vmap over logits inside the vmap over examples (an
# error when the sizes differ, wrong values when they are equal); the others fail
# under any vmap
JACOBIAN_MODES = {
    "layernorm": (UNSUPPORTED["layernorm"][0], "nested vmap"),
    "prelu-mlp": (UNSUPPORTED["prelu"][0], "vmap logit by logit"),
    "prelu-cnn": (prelu_cnn, "vmap logit by logit"),
    "rnn-cell": (RecurrentNet, "per-example autograd"),
    "backward-hook": (backward_hooked, "per-example autograd"),
    "rrelu": (lambda: mlp(nn.RReLU()), "per-example autograd"),
    "captured-weight": (CapturedWeightNet, "per-example autograd"),
}


@pytest.mark.parametrize("name", list(JACOBIAN_MODES))
def test_the_jacobian_path_takes_the_fastest_way_that_is_right(name, caplog):
    factory, mode = JACOBIAN_MODES[name]
    torch.manual_seed(0)
    net = factory().double()
    x1, x2 = inputs(name, 4, 1), inputs(name, 3, 2)
    with caplog.at_level(logging.DEBUG, logger="ntkcl.ntk"):
        plan = plan_ntk(net, x1, kind="full", implementation="jacobian")
    assert plan.method == f"jacobian, {mode}" and plan.jacobians == mode
    assert ("jacobian path: nested vmap: " in caplog.text) == (mode != "nested vmap")
    for second in (None, x2):
        expected = reference(net, x1, second)
        for kind in KINDS:
            got = empirical_ntk(net, x1, second, kind=kind, implementation="jacobian")
            assert_close(got, reduce(expected, kind))
    # 3 examples and 3 logits in one block: the sizes that gave PReLU wrong values
    got = empirical_ntk(net, x2, kind="full", implementation="jacobian")
    assert_close(got, reference(net, x2))


@pytest.mark.parametrize("path", ["auto", "jacobian"])
def test_a_module_registered_twice_keeps_its_parameters(path):
    torch.manual_seed(0)
    net = SharedModuleNet().double()
    before = dict(net.named_parameters(remove_duplicate=False))
    x = inputs("mlp", 4, 1)
    first = empirical_ntk(net, x, kind="full", implementation=path)
    after = dict(net.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert all(type(p) is nn.Parameter for p in net.parameters())
    # a second call sees the same model
    assert_close(empirical_ntk(net, x, kind="full", implementation=path), first, 0)


class BatchDependent(nn.Module):
    """Calls its layer a second time only for batches of more than two examples
    (more than the plan's probe)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if x.shape[0] > 2:
            h = h + 0 * self.a(h)
        return self.out(h)


def test_a_change_after_the_probe_falls_back_too(caplog):
    torch.manual_seed(0)
    net, x = BatchDependent().double(), inputs("mlp", 4, 1)
    assert plan_ntk(net, x).implementation == "structured"  # two examples look fine
    with caplog.at_level(logging.INFO, logger="ntkcl.ntk"):
        got = empirical_ntk(net, x, kind="full")
    assert "gave up" in caplog.text
    assert_close(got, reference(net, x))
    with pytest.raises(ValueError, match="called 2 times on a batch of 4 examples"):
        empirical_ntk(net, x, implementation="structured")


class ExampleLoop(nn.Module):
    """Runs its layers once per example, in a Python loop over the batch."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return torch.cat([self.out(torch.tanh(self.a(row[None]))) for row in x])


def test_a_loop_over_the_examples_is_seen_when_planning():
    torch.manual_seed(0)
    net, x = ExampleLoop().double(), inputs("mlp", 4, 1)
    plan = plan_ntk(net, x, kind="full")
    assert plan.implementation == "jacobian"
    assert "called 2 times on a batch of 2" in plan.structured_unsupported
    assert_close(empirical_ntk(net, x, kind="full"), reference(net, x))
    # one example runs each layer once: the structured path is exact then
    one = x[:1]
    assert plan_ntk(net, one).implementation == "structured"
    assert_close(empirical_ntk(net, one, kind="full"), reference(net, one))


@pytest.mark.parametrize("name", ["mlp-relu", "mlp-relu-autograd"])
@pytest.mark.parametrize(
    "frozen", ["layer", "weight", "bias", "readout-weight", "all-but-readout-bias"]
)
def test_frozen_parameters_are_excluded(frozen, name):
    wrapped, x = network(name), inputs(name, 4, 1)
    net = getattr(wrapped, "inner", wrapped)
    if frozen == "all-but-readout-bias":
        net.requires_grad_(False)
        net[4].bias.requires_grad_(True)
    elif frozen == "layer":
        net[2].requires_grad_(False)
    elif frozen == "readout-weight":
        net[4].weight.requires_grad_(False)
    else:
        getattr(net[0], frozen).requires_grad_(False)
    assert plan_ntk(wrapped, x).implementation == "structured"
    expected = reference(wrapped, x)
    for path in PATHS:
        got = empirical_ntk(wrapped, x, kind="full", implementation=path)
        assert_close(got, expected)


def test_grouped_conv2d_falls_back():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)
    ).double()
    x = inputs("cnn", 3, 1)
    assert "groups=2" in plan_ntk(net, x).structured_unsupported
    assert_close(empirical_ntk(net, x, kind="full"), reference(net, x))


# state, dtype, device, memory


def test_mode_and_parameters_are_restored():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 6),
        nn.BatchNorm1d(6),
        nn.Dropout(0.5),
        nn.ReLU(),
        nn.Linear(6, 3),
    ).double()
    net.train()
    net[2].eval()  # a mixed state must come back as it was
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    x = inputs("mlp", 4, 1)
    first = empirical_ntk(net, x, kind="full")
    assert [m.training for m in net.modules()] == modes
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in net.parameters())
    # eval mode: running statistics, no dropout, hence deterministic
    assert torch.equal(empirical_ntk(net, x, kind="full"), first)
    assert_close(first, reference(net, x))


class Centred(nn.Module):
    """Subtracts the batch mean: examples that are not independent."""

    def forward(self, h):
        return h - h.mean(0)


def test_examples_that_interact_are_warned_about_or_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), Centred(), nn.Tanh(), nn.Linear(6, 3))
    x = inputs("mlp", 4, 1)
    with pytest.warns(UserWarning, match="not independent in eval mode: the first"):
        empirical_ntk(net.double(), x)
    # a diverged model gives NaN logits: no comparison, no warning
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
    assert empirical_ntk(net, x).isnan().any()
    # batch statistics in eval mode: no single example runs
    net[1] = nn.BatchNorm1d(6, track_running_stats=False).double()
    with pytest.raises(ValueError, match="fails on one .*running statistics"):
        empirical_ntk(net, x)


def test_float64_on_a_copy_and_float32_agrees():
    torch.manual_seed(0)
    net = mlp(nn.Tanh())  # smooth: no ReLU kinks that rounding could flip
    x = inputs("mlp", 5, 1).float()
    for path in PATHS:
        single = empirical_ntk(net, x, kind="full", implementation=path)
        double = empirical_ntk(
            net, x, kind="full", dtype=torch.float64, implementation=path
        )
        assert single.dtype == torch.float32 and double.dtype == torch.float64
        assert all(p.dtype == torch.float32 for p in net.parameters())
        assert_close(single.double(), double, rtol=1e-5)
    assert_close(double, reference(net.double(), x.double()))


class HookOnOwnWeight(nn.Module):
    """A hook that reads another layer's weight through a reference of its own
    (``reads="weight"``) or calls that layer (``reads="layer"``): a converted copy
    of the model still reaches the original."""

    def __init__(self, reads: str):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        first = self.net[0]
        if reads == "weight":
            hook = lambda m, i, o: o + first.weight.sum()  # noqa: E731
        else:
            hook = lambda m, i, o: o + first(i[0][:, :5] * 0 + 1)  # noqa: E731
        self.net[1].register_forward_hook(hook)

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize(
    "reads, match",
    [("weight", r"still uses the original's parameters \['net.0.weight'\]"),
     ("layer", "fails on a converted copy")],
)  # fmt: skip
def test_float64_refuses_a_model_that_its_copy_cannot_convert(reads, match):
    torch.manual_seed(0)
    net, x = HookOnOwnWeight(reads), inputs("mlp", 4, 1).float()
    before = [(p, p.data_ptr()) for p in net.parameters()]
    assert empirical_ntk(net, x).dtype == torch.float32  # its own dtype: fine
    with pytest.raises(ValueError, match=match + ".*model.double"):
        empirical_ntk(net, x, dtype=torch.float64)
    after = list(net.parameters())
    pairs = zip(before, after, strict=True)
    assert all(p is q and p.data_ptr() == ptr for (p, ptr), q in pairs)
    assert all(p.dtype == torch.float32 for p in after)
    # converted by the user, the same model is exact
    net.double()
    x = x.double()
    assert_close(empirical_ntk(net, x, kind="full"), reference(net, x))


def test_float64_refuses_a_model_that_cannot_be_copied():
    # the legacy weight_norm keeps a computed weight that deepcopy refuses
    torch.manual_seed(0)
    with pytest.warns(FutureWarning, match="deprecated"):
        normed = nn.utils.weight_norm(nn.Linear(5, 6))
    net = nn.Sequential(normed, nn.Tanh(), nn.Linear(6, 3))
    x = inputs("mlp", 4, 1).float()
    with pytest.raises(ValueError, match="cannot be copied.*model.double"):
        empirical_ntk(net, x, dtype=torch.float64)


def test_float64_of_a_model_built_in_inference_mode():
    torch.manual_seed(0)
    with torch.inference_mode():
        net = mlp(nn.Tanh()).float()
    x = inputs("mlp", 4, 1).float()
    got = empirical_ntk(net, x, kind="full", dtype=torch.float64)
    assert_close(got, reference(mlp_copy(net).double(), x.double()))


def mlp_copy(net: nn.Module) -> nn.Module:
    """``net`` with ordinary (not inference) tensors, for the reference."""
    clone = copy.deepcopy(net)
    for p in clone.parameters():
        p.data = p.data.clone()
    return clone


def test_a_compiled_model_is_computed_on_the_module_it_wraps(recwarn):
    net, x = network("mlp-relu"), inputs("mlp", 3, 1)
    compiled = torch.compile(net, backend="eager")
    assert plan_ntk(compiled, x).method == "structured, chain cotangents"
    assert torch.equal(empirical_ntk(compiled, x), empirical_ntk(net, x))
    assert not recwarn.list  # no recompilation warnings: nothing was compiled


class DoublesItsInput(nn.Module):
    """Changes its input in place, in a way that compounds if called twice."""

    def __init__(self):
        super().__init__()
        self.inner = mlp(nn.Tanh())

    def forward(self, x):
        return self.inner(x.mul_(2))


def test_a_chain_that_changes_its_input_in_place_sees_a_copy():
    net, x = network("image-chain-mix"), inputs("image", 4, 1)
    net[0] = nn.Hardtanh(-0.5, 0.5, inplace=True)  # before the Flatten
    kept = x.clone()
    got = empirical_ntk(net, x, kind="full")
    assert plan_ntk(net, x).cotangents == "chain"
    assert torch.equal(x, kept)
    assert_close(got, reference(net, kept))


@pytest.mark.parametrize("path", PATHS)
def test_a_model_that_changes_its_input_in_place_sees_a_copy(path):
    torch.manual_seed(0)
    net, x = DoublesItsInput().double(), inputs("mlp", 4, 1)
    kept = x.clone()
    got = empirical_ntk(net, x, kind="full", implementation=path)
    assert torch.equal(x, kept)
    assert_close(got, reference(net.inner, 2 * kept))


def test_grad_modes_of_the_caller_do_not_matter():
    net, x = network("cnn-stride-maxpool"), inputs("cnn", 3, 1)
    expected = empirical_ntk(net, x)
    with torch.no_grad():
        assert torch.equal(empirical_ntk(net, x), expected)
    with torch.inference_mode():
        assert torch.equal(empirical_ntk(net, x), expected)


def logit_blocks_budget(net, x, path):
    """The largest budget (within a factor 1.25) that splits the logits."""
    budget = plan_ntk(net, x, kind="full", implementation=path).estimated_peak_bytes
    while budget > 1:
        plan = plan_ntk(net, x, kind="full", implementation=path, memory_budget=budget)
        if plan.logits_per_block < plan.num_logits:
            return budget
        budget = int(budget / 1.25)
    raise AssertionError("no budget splits the logits")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["mlp-gelu", "cnn-dilation-avgpool"])
@pytest.mark.filterwarnings("ignore:NTK memory budget:UserWarning")  # 1 byte
def test_small_budgets_give_the_same_kernel(name, path):
    net, x1, x2 = network(name), inputs(name, 3, 1), inputs(name, 2, 2)
    roomy = plan_ntk(net, x1, kind="full", implementation=path).estimated_peak_bytes
    seen = set()
    for kind in KINDS:
        # cached in example blocks, then streamed, then in blocks of logits too;
        # 1 byte: the smallest blocks
        budgets = [int(roomy / 1.3), roomy // 3, logit_blocks_budget(net, x1, path)]
        for second in (None, x2):
            expected = empirical_ntk(net, x1, second, kind=kind, implementation=path)
            for budget in budgets + [1] * (kind == "trace" and second is None):
                args = dict(kind=kind, implementation=path, memory_budget=budget)
                plan = plan_ntk(net, x1, second, **args)
                fewer = plan.examples_per_block < x1.shape[0]
                seen.add((plan.cached, fewer, plan.logits_per_block < 3))
                if budget == 1:
                    assert plan.examples_per_block == plan.logits_per_block == 1
                    assert (plan.parameter_groups > 1) == (path == "jacobian")
                assert_close(empirical_ntk(net, x1, second, **args), expected, 1e-12)
    assert {(True, True, False), (False, True, True)} <= seen


def test_a_budget_below_the_smallest_blocks_is_warned_about():
    net, x = network("mlp-gelu"), inputs("mlp-gelu", 3, 1)
    with pytest.warns(UserWarning, match="budget of 1 B too small.*needs about"):
        plan = plan_ntk(net, x, kind="full", memory_budget=1)
    assert plan.examples_per_block == plan.logits_per_block == 1


def test_factors_that_fill_most_of_the_budget_are_still_cached():
    # 256 probes of a 64-channel CNN on 3x32x32 inputs: the per-example gradients
    # of all examples (about 780 MB) fit the default 1 GiB budget only with little
    # room to spare; recomputing them for every row block would cost 3x more
    from ntkcl.models import cnn

    torch.manual_seed(0)
    net = cnn((3, 32, 32), 10, width=64, depth=3)
    plan = plan_ntk(net, torch.randn(256, 3, 32, 32), kind="full")
    assert plan.cached
    assert plan.estimated_peak_bytes <= 2**30


def test_width_2048_mlp_full_kernel_plan_fits_in_4_gb():
    # planning only (no computation): 3072 inputs, depth 3, 100 probes, float32
    torch.manual_seed(0)
    layers, width = [], 2048
    for fan_in in (3072, width, width):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(width, 10))
    plan = plan_ntk(net, torch.randn(100, 3072), kind="full")
    assert plan.implementation == "structured" and plan.cached
    assert plan.estimated_peak_bytes < 2**30  # the default budget
    assert plan.output_bytes == 100 * 100 * 10 * 10 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    net, x = network("cnn-stride-maxpool"), inputs("cnn", 4, 1)
    expected = empirical_ntk(net, x, kind="full")
    got = empirical_ntk(net.cuda(), x.cuda(), kind="full")
    assert got.device.type == "cuda"
    assert_close(got.cpu(), expected, 1e-9)


# argument checks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kind="traced"), "kind must be"),
        (dict(implementation="fast"), "implementation must be"),
        (dict(memory_budget=0), "memory_budget must be"),
        (dict(memory_budget=1e6), "positive integer number of bytes, got 1000000.0"),
        (dict(dtype=torch.int64), "dtype must be"),
    ],
)
def test_bad_arguments(kwargs, message):
    net, x = network("mlp-relu"), inputs("mlp", 3, 1)
    with pytest.raises(ValueError, match=message):
        empirical_ntk(net, x, **kwargs)


def test_bad_shapes():
    net, x = network("mlp-relu"), inputs("mlp", 3, 1)
    with pytest.raises(ValueError, match="same example shape"):
        empirical_ntk(net, x, x[:, :4])
    with pytest.raises(ValueError, match="at least one example"):
        empirical_ntk(net, x[:0])
    with pytest.raises(ValueError, match=r"logits of shape \(n, K\)"):
        empirical_ntk(nn.Sequential(net, nn.Flatten(0)), x)
    with pytest.raises(TypeError, match=r"torch.Tensor, got ndarray.*as_tensor"):
        empirical_ntk(net, x.numpy())


class Argmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(5, 3)

    def forward(self, x):
        return self.layer(x).argmax(1, keepdim=True)


@pytest.mark.parametrize("path", ["auto", "jacobian"])
def test_models_that_cannot_take_the_inputs_or_give_no_logits(path):
    mlp_net, cnn_net = network("mlp-relu"), network("cnn-stride-maxpool")
    first = "failed on the first 2 examples"
    with pytest.raises(ValueError, match=first + r" .* \(2,\)"):
        empirical_ntk(mlp_net, torch.randn(6, dtype=torch.float64), implementation=path)
    flat = torch.randn(3, 128, dtype=torch.float64)
    with pytest.raises(ValueError, match=first + r" .* \(2, 128\)"):
        empirical_ntk(cnn_net, flat, implementation=path)
    with pytest.raises(ValueError, match=first + ".*unsqueeze"):
        empirical_ntk(mlp_net, torch.randn(5, dtype=torch.float64))
    tokens = torch.randint(0, 9, (3, 5))
    with pytest.raises(ValueError, match=first + r" .* \(2, 5\)"):
        empirical_ntk(mlp_net, tokens, implementation=path)
    embed = nn.Sequential(nn.Embedding(9, 2), nn.Flatten(), nn.Linear(10, 3))
    with pytest.raises(ValueError, match=first + ".*out of range"):
        empirical_ntk(embed, tokens + 9, implementation=path)
    with pytest.raises(ValueError, match="both be floating or both not"):
        empirical_ntk(embed, tokens, tokens.float(), implementation=path)
    with pytest.raises(
        ValueError, match="floating-point logits, it returned torch.int64"
    ):
        empirical_ntk(Argmax().double(), inputs("mlp", 3, 1), implementation=path)


def test_a_chain_trace_kernel_collapses_the_logits_under_the_readout():
    # the layer under the readout gets one feature vector per example, not K
    from ntkcl._ntk_plan import make_plan

    net, x = network("mlp-relu"), inputs("mlp", 4, 1)
    for kind, collapsed in [("trace", True), ("diagonal", False), ("full", False)]:
        plan, provider, _ = make_plan(net.eval(), x, None, kind, x.dtype, 2**30, "auto")
        factors = provider.compute(x, slice(0, plan.num_logits))
        assert [f.num_logits for f in factors] == [3, 1 if collapsed else 3, 3]
        assert_close(empirical_ntk(net, x, kind=kind), reduce(reference(net, x), kind))
