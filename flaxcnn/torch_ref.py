"""The book's PyTorch networks (d2l chapter 7), as the book writes them: the reference that the
Flax networks in `flaxcnn.models` are proven against (tests) and timed against (benchmarks).

Everything here is the canonical book code (the typos of the source notes fixed, see
`docs/reference.md`), with three deliberate, behaviour-preserving changes:

- The scratch `BatchNorm` registers `moving_mean` and `moving_var` as buffers, so they appear in
  `state_dict()`, move with `net.to(device)` and can be ported. Its math is the book's, including
  the book's choice of mode: `batch_norm` uses the batch statistics (and updates the moving ones)
  whenever gradients are enabled, whatever `net.train()`/`net.eval()` says; evaluate under
  `torch.no_grad()`, as d2l's `evaluate_accuracy_gpu` does.
- The first `nn.Linear` of AlexNet, VGG and LeNet takes its input width from the input side
  (`side`, default the book's), so the networks can also run at other sides; at the book's side
  the width is the book's constant (6400, `out_channels * 7 * 7`, `16 * 4 * 4`).
- `create(name, dropout_rate=...)` can change every `nn.Dropout`'s probability after
  construction (0.0 to compare training-mode outputs deterministically).

Inputs are NCHW, (N, 1, side, side). Importing this module imports torch; nothing else in
`flaxcnn` does, except `flaxcnn.porting` inside its functions.
"""

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "BatchNorm", "DenseBlock", "Inception", "Residual", "alexnet", "batch_norm", "book_side",
    "conv_arch", "conv_block", "create", "densenet", "googlenet", "init_weights", "lenet_bn",
    "lenet_bn_scratch", "names", "nin", "nin_block", "resnet18", "resnet_block",
    "set_dropout", "small_conv_arch", "summary", "transition_block", "vgg", "vgg_block",
]


# --- 7.1 AlexNet -------------------------------------------------------------------------------

def alexnet(side=224):
    """The book's AlexNet for 1-channel input; the first Linear takes 6400 = 256*5*5 at 224."""

    def out(s, k, st=1, p=0):
        return (s + 2 * p - k) // st + 1

    s = out(out(out(out(side, 11, 4, 1), 3, 2), 3, 2), 3, 2)
    return nn.Sequential(
        # A large 11x11 window to capture objects; stride 4 to shrink the output quickly.
        nn.Conv2d(1, 96, kernel_size=11, stride=4, padding=1), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(96, 256, kernel_size=5, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Flatten(),
        nn.Linear(256 * s * s, 4096), nn.ReLU(), nn.Dropout(p=0.5),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(p=0.5),
        nn.Linear(4096, 10))


# --- 7.2 VGG -----------------------------------------------------------------------------------

def vgg_block(num_convs, in_channels, out_channels):
    layers = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        layers.append(nn.ReLU())
        in_channels = out_channels
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


conv_arch = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))


def small_conv_arch(ratio=4):
    return [(pair[0], pair[1] // ratio) for pair in conv_arch]


def vgg(conv_arch, side=224):
    """The book's `vgg(conv_arch)`; the first Linear takes `out_channels * 7 * 7` at 224."""
    conv_blks = []
    in_channels = 1
    # The convolutional part.
    for (num_convs, out_channels) in conv_arch:
        conv_blks.append(vgg_block(num_convs, in_channels, out_channels))
        in_channels = out_channels
    s = side // 2 ** len(conv_arch)
    return nn.Sequential(
        *conv_blks, nn.Flatten(),
        # The fully connected part.
        nn.Linear(out_channels * s * s, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, 10))


# --- 7.3 NiN -----------------------------------------------------------------------------------

def nin_block(in_channels, out_channels, kernel_size, strides, padding):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, strides, padding),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU())


def nin():
    return nn.Sequential(
        nin_block(1, 96, kernel_size=11, strides=4, padding=0),
        nn.MaxPool2d(3, stride=2),
        nin_block(96, 256, kernel_size=5, strides=1, padding=2),
        nn.MaxPool2d(3, stride=2),
        nin_block(256, 384, kernel_size=3, strides=1, padding=1),
        nn.MaxPool2d(3, stride=2),
        nn.Dropout(0.5),
        # There are 10 label classes.
        nin_block(384, 10, kernel_size=3, strides=1, padding=1),
        nn.AdaptiveAvgPool2d((1, 1)),
        # Turn the 4D output into a 2D output of shape (batch size, 10).
        nn.Flatten())


# --- 7.4 GoogLeNet -----------------------------------------------------------------------------

class Inception(nn.Module):
    # c1--c4 are the number of output channels of each path.
    def __init__(self, in_channels, c1, c2, c3, c4, **kwargs):
        super().__init__(**kwargs)
        # Path 1: a single 1x1 convolution.
        self.p1_1 = nn.Conv2d(in_channels, c1, kernel_size=1)
        # Path 2: a 1x1 convolution, then a 3x3 convolution.
        self.p2_1 = nn.Conv2d(in_channels, c2[0], kernel_size=1)
        self.p2_2 = nn.Conv2d(c2[0], c2[1], kernel_size=3, padding=1)
        # Path 3: a 1x1 convolution, then a 5x5 convolution.
        self.p3_1 = nn.Conv2d(in_channels, c3[0], kernel_size=1)
        self.p3_2 = nn.Conv2d(c3[0], c3[1], kernel_size=5, padding=2)
        # Path 4: a 3x3 max-pool, then a 1x1 convolution.
        self.p4_1 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.p4_2 = nn.Conv2d(in_channels, c4, kernel_size=1)

    def forward(self, x):
        p1 = F.relu(self.p1_1(x))
        p2 = F.relu(self.p2_2(F.relu(self.p2_1(x))))
        p3 = F.relu(self.p3_2(F.relu(self.p3_1(x))))
        p4 = F.relu(self.p4_2(self.p4_1(x)))
        # Concatenate the outputs on the channel dimension.
        return torch.cat((p1, p2, p3, p4), dim=1)


def googlenet():
    b1 = nn.Sequential(nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3),
                       nn.ReLU(),
                       nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b2 = nn.Sequential(nn.Conv2d(64, 64, kernel_size=1),
                       nn.ReLU(),
                       nn.Conv2d(64, 192, kernel_size=3, padding=1),
                       nn.ReLU(),
                       nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b3 = nn.Sequential(Inception(192, 64, (96, 128), (16, 32), 32),
                       Inception(256, 128, (128, 192), (32, 96), 64),
                       nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b4 = nn.Sequential(Inception(480, 192, (96, 208), (16, 48), 64),
                       Inception(512, 160, (112, 224), (24, 64), 64),
                       Inception(512, 128, (128, 256), (24, 64), 64),
                       Inception(512, 112, (144, 288), (32, 64), 64),
                       Inception(528, 256, (160, 320), (32, 128), 128),
                       nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b5 = nn.Sequential(Inception(832, 256, (160, 320), (32, 128), 128),
                       Inception(832, 384, (192, 384), (48, 128), 128),
                       nn.AdaptiveAvgPool2d((1, 1)),
                       nn.Flatten())
    return nn.Sequential(b1, b2, b3, b4, b5, nn.Linear(1024, 10))


# --- 7.5 Batch normalization -------------------------------------------------------------------

def batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum):
    # Use `is_grad_enabled` to tell whether we are in training mode or prediction mode.
    if not torch.is_grad_enabled():
        # In prediction mode, use the moving mean and variance passed in.
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
    else:
        assert len(X.shape) in (2, 4)
        if len(X.shape) == 2:
            # A fully connected layer: mean and variance over the feature dimension.
            mean = X.mean(dim=0)
            var = ((X - mean) ** 2).mean(dim=0)
        else:
            # A 2D convolutional layer: mean and variance per channel (axis=1), keeping X's
            # shape so that broadcasting works below.
            mean = X.mean(dim=(0, 2, 3), keepdim=True)
            var = ((X - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        # In training mode, standardise with the current mean and variance.
        X_hat = (X - mean) / torch.sqrt(var + eps)
        # Update the moving averages of the mean and variance.
        moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
        moving_var = momentum * moving_var + (1.0 - momentum) * var
    Y = gamma * X_hat + beta  # Scale and shift.
    return Y, moving_mean.data, moving_var.data


class BatchNorm(nn.Module):
    # num_features: the number of outputs of a fully connected layer or the number of output
    # channels of a convolutional layer. num_dims: 2 for a fully connected layer, 4 for a
    # convolutional layer.
    def __init__(self, num_features, num_dims):
        super().__init__()
        if num_dims == 2:
            shape = (1, num_features)
        else:
            shape = (1, num_features, 1, 1)
        # The scale and shift parameters take part in gradients and updates; initialised to 1
        # and 0.
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        # The variables that are not model parameters, initialised to 0 and 1. Registered as
        # buffers (the book uses plain attributes) so that they are in `state_dict()`.
        self.register_buffer("moving_mean", torch.zeros(shape))
        self.register_buffer("moving_var", torch.ones(shape))

    def forward(self, X):
        # If X is not in main memory, copy moving_mean and moving_var to the device X is on.
        if self.moving_mean.device != X.device:
            self.moving_mean = self.moving_mean.to(X.device)
            self.moving_var = self.moving_var.to(X.device)
        # Save the updated moving_mean and moving_var (assigning a registered buffer keeps it
        # a buffer).
        Y, self.moving_mean, self.moving_var = batch_norm(
            X, self.gamma, self.beta, self.moving_mean,
            self.moving_var, eps=1e-5, momentum=0.9)
        return Y


def _lenet_flat(side):
    return ((side - 4) // 2 - 4) // 2


def lenet_bn_scratch(side=28):
    """LeNet with the book's from-scratch `BatchNorm` (the first Linear takes 16*4*4 at 28)."""
    s = _lenet_flat(side)
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), BatchNorm(6, num_dims=4), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), BatchNorm(16, num_dims=4), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2), nn.Flatten(),
        nn.Linear(16 * s * s, 120), BatchNorm(120, num_dims=2), nn.Sigmoid(),
        nn.Linear(120, 84), BatchNorm(84, num_dims=2), nn.Sigmoid(),
        nn.Linear(84, 10))


def lenet_bn(side=28):
    """The book's concise LeNet with `nn.BatchNorm2d`/`nn.BatchNorm1d`."""
    s = _lenet_flat(side)
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), nn.BatchNorm2d(6), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.BatchNorm2d(16), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2), nn.Flatten(),
        nn.Linear(16 * s * s, 120), nn.BatchNorm1d(120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.BatchNorm1d(84), nn.Sigmoid(),
        nn.Linear(84, 10))


# --- 7.6 ResNet --------------------------------------------------------------------------------

class Residual(nn.Module):
    def __init__(self, input_channels, num_channels, use_1x1conv=False, strides=1):
        super().__init__()
        self.conv1 = nn.Conv2d(input_channels, num_channels,
                               kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels,
                               kernel_size=3, padding=1)
        if use_1x1conv:
            self.conv3 = nn.Conv2d(input_channels, num_channels,
                                   kernel_size=1, stride=strides)
        else:
            self.conv3 = None
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.bn2 = nn.BatchNorm2d(num_channels)

    def forward(self, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        Y += X
        return F.relu(Y)


def resnet_block(input_channels, num_channels, num_residuals, first_block=False):
    blk = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.append(Residual(input_channels, num_channels,
                                use_1x1conv=True, strides=2))
        else:
            blk.append(Residual(num_channels, num_channels))
    return blk


def _stem():
    return nn.Sequential(nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3),
                         nn.BatchNorm2d(64), nn.ReLU(),
                         nn.MaxPool2d(kernel_size=3, stride=2, padding=1))


def resnet18():
    b1 = _stem()
    b2 = nn.Sequential(*resnet_block(64, 64, 2, first_block=True))
    b3 = nn.Sequential(*resnet_block(64, 128, 2))
    b4 = nn.Sequential(*resnet_block(128, 256, 2))
    b5 = nn.Sequential(*resnet_block(256, 512, 2))
    return nn.Sequential(b1, b2, b3, b4, b5,
                         nn.AdaptiveAvgPool2d((1, 1)),
                         nn.Flatten(), nn.Linear(512, 10))


# --- 7.7 DenseNet ------------------------------------------------------------------------------

def conv_block(input_channels, num_channels):
    return nn.Sequential(
        nn.BatchNorm2d(input_channels), nn.ReLU(),
        nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1))


class DenseBlock(nn.Module):
    def __init__(self, num_convs, input_channels, num_channels):
        super().__init__()
        layer = []
        for i in range(num_convs):
            layer.append(conv_block(
                num_channels * i + input_channels, num_channels))
        self.net = nn.Sequential(*layer)

    def forward(self, X):
        for blk in self.net:
            Y = blk(X)
            # Concatenate each block's input and output on the channel dimension.
            X = torch.cat((X, Y), dim=1)
        return X


def transition_block(input_channels, num_channels):
    return nn.Sequential(
        nn.BatchNorm2d(input_channels), nn.ReLU(),
        nn.Conv2d(input_channels, num_channels, kernel_size=1),
        nn.AvgPool2d(kernel_size=2, stride=2))


def densenet():
    b1 = _stem()
    # num_channels: the current number of channels.
    num_channels, growth_rate = 64, 32
    num_convs_in_dense_blocks = [4, 4, 4, 4]
    blks = []
    for i, num_convs in enumerate(num_convs_in_dense_blocks):
        blks.append(DenseBlock(num_convs, num_channels, growth_rate))
        # The number of output channels of the previous dense block.
        num_channels += num_convs * growth_rate
        # A transition layer that halves the number of channels between dense blocks.
        if i != len(num_convs_in_dense_blocks) - 1:
            blks.append(transition_block(num_channels, num_channels // 2))
            num_channels = num_channels // 2
    return nn.Sequential(
        b1, *blks,
        nn.BatchNorm2d(num_channels), nn.ReLU(),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(num_channels, 10))


# --- train_ch6's initialisation and the registry -----------------------------------------------

def init_weights(m):
    """`train_ch6`'s initialisation: Xavier-uniform Conv2d and Linear weights; biases and the
    batch-norm parameters keep PyTorch's defaults."""
    if type(m) == nn.Linear or type(m) == nn.Conv2d:  # noqa: E721 - the book's test
        nn.init.xavier_uniform_(m.weight)


_BUILDERS = {
    "alexnet": (alexnet, 224),
    "vgg": (lambda side: vgg(small_conv_arch(4), side), 224),
    "vgg11": (lambda side: vgg(conv_arch, side), 224),
    "nin": (lambda side: nin(), 224),
    "googlenet": (lambda side: googlenet(), 96),
    "lenet_bn_scratch": (lenet_bn_scratch, 28),
    "lenet_bn": (lenet_bn, 28),
    "resnet18": (lambda side: resnet18(), 96),
    "densenet": (lambda side: densenet(), 96),
}


def names():
    """The same names as `flaxcnn.models.names()`."""
    return list(_BUILDERS)


def book_side(name):
    """The input side the book trains `name` at (224, 96 or 28)."""
    return _builder(name)[1]


def _builder(name):
    try:
        return _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; known: {', '.join(_BUILDERS)}") from None


def set_dropout(net, p):
    """Sets the probability of every `nn.Dropout` in `net` (0.0: identity even in training)."""
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
    return net


def create(name, side=None, *, init=True, dropout_rate=None):
    """The book's PyTorch network `name` (NCHW input).

    `side`: the input side the first Linear is sized for (AlexNet, VGG, LeNet; default the
    book's). `init`: apply `init_weights` as `train_ch6` does. `dropout_rate`: if given, every
    `nn.Dropout`'s probability. Build on another device with `with torch.device(...)`.
    """
    build, default_side = _builder(name)
    net = build(side or default_side)
    if init:
        net.apply(init_weights)
    if dropout_rate is not None:
        set_dropout(net, dropout_rate)
    return net


def summary(net, side, batch=1, device="meta"):
    """`net` (a network, or a name for `create`) printed the book's way:
    `for layer in net: X = layer(X); print(layer.__class__.__name__, X.shape)`.

    Returns [(class name, output shape)], run in eval mode under `no_grad` (so batch 1 passes
    `nn.BatchNorm1d`). On the default "meta" device nothing is computed, so it is free even at
    224; a given `net` is copied there and left untouched.
    """
    import copy

    if isinstance(net, str):
        with torch.device(device):
            net = create(net, side, init=False)
    elif device == "meta":
        net = copy.deepcopy(net).to("meta")
    was_training = net.training
    net.eval()
    X = torch.rand(size=(batch, 1, side, side), device=device)
    rows = []
    try:
        with torch.no_grad():
            for layer in net:
                X = layer(X)
                rows.append((layer.__class__.__name__, tuple(X.shape)))
    finally:
        net.train(was_training)
    return rows
