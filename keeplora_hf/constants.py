"""Values several layers of the package agree on, in a leaf module that imports nothing."""

#: label of tokens that carry no loss (transformers' and PyTorch's cross-entropy ignore index)
IGNORE_INDEX = -100
