"""The label convention shared by data preparation and the losses, without importing torch.

A position whose label is `IGNORE_INDEX` is not trained (prompt, padding, untrained turns):
the value `transformers` and `torch.nn.functional.cross_entropy` ignore by default. Kept apart
from `loss_kernels` so that reading and validating a corpus (`validate-data`, the CLI's start)
does not import torch.
"""

IGNORE_INDEX = -100
