"""The experiment harness: training loop, data sets, models, comparisons of
relaxation against autograd, plots and the ``torch-ar`` command line.

Kept out of ``import torch_ar`` (which loads only the engine, its wrapper,
configuration, variants and metrics): this subpackage needs the
``experiments`` extra (torchvision, tqdm, matplotlib).
"""
