"""The op table: the specialised ops cover the ones every CNN and MLP uses.
(The docs' op table page is written from it: tests/python/test_docs.py.)"""

import torch_ar


def test_specialised_ops_cover_the_issue_list() -> None:
    specialised = {o.node for o in torch_ar.supported_ops() if o.specialised}
    for node in (
        "AddmmBackward0",
        "MmBackward0",
        "ConvolutionBackward0",
        "ReluBackward0",
        "LeakyReluBackward0",
        "TanhBackward0",
        "SigmoidBackward0",
        "GeluBackward0",
        "SiluBackward0",
        "MaxPool2DWithIndicesBackward0",
        "AvgPool2DBackward0",
        "AdaptiveAvgPool2DBackward0",
        "NativeBatchNormBackward0",
        "AddBackward0",
        "CatBackward0",
        "ViewBackward0",
    ):
        assert node in specialised
