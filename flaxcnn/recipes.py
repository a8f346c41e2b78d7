"""The book's training recipe per network (d2l chapter 7, `train_ch6`), as data."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    side: int
    batch_size: int
    lr: float
    epochs: int = 10


RECIPES = {
    "alexnet": Recipe(side=224, batch_size=128, lr=0.01),
    "vgg": Recipe(side=224, batch_size=128, lr=0.05),
    # The full VGG-11 is not trained in the book; it shares the small one's recipe.
    "vgg11": Recipe(side=224, batch_size=128, lr=0.05),
    "nin": Recipe(side=224, batch_size=128, lr=0.1),
    "googlenet": Recipe(side=96, batch_size=128, lr=0.1),
    "lenet_bn_scratch": Recipe(side=28, batch_size=256, lr=1.0),
    "lenet_bn": Recipe(side=28, batch_size=256, lr=1.0),
    "resnet18": Recipe(side=96, batch_size=256, lr=0.05),
    "densenet": Recipe(side=96, batch_size=256, lr=0.1),
}

# What the book prints after 10 epochs (PyTorch, one CUDA GPU): loss, train acc, test acc, ex/s.
BOOK_RESULTS = {
    "alexnet": (0.331, 0.878, 0.883, 3942),
    "vgg": (0.178, 0.935, 0.920, 2464),
    "nin": (0.563, 0.783, 0.772, 3193),
    "googlenet": (0.262, 0.900, 0.886, 3266),
    "lenet_bn_scratch": (0.273, 0.899, 0.807, 32294),
    "lenet_bn": (0.267, 0.902, 0.708, 50597),
    "resnet18": (0.012, 0.997, 0.893, 5033),
    "densenet": (0.140, 0.948, 0.885, 5626),
}


def get(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"no recipe for {name!r}; known: {', '.join(RECIPES)}") from None
