"""The CAM-method family (`wsss.cam_methods.base`): each member one module, registered by name.

`CamMethod` (the configuration's type for `classifier.model.method`) is the union of the
registered members' `Params`, told apart by `name` (`wsss.params.registered_union`). A new
member: its module in this folder and its import below (docs/architecture.md).
"""

from wsss.cam_methods import hfpl, oaa, plain, saliency, seam, wildcat  # noqa: F401  (importing registers the members)
from wsss.cam_methods.base import (
    CAM_METHODS,
    CamMethodParams,
    classification_loss,
    multi_hot,
    register,
)
from wsss.params import registered_union

CamMethodChoice = registered_union(CAM_METHODS)

__all__ = [
    "CAM_METHODS",
    "CamMethodChoice",
    "CamMethodParams",
    "classification_loss",
    "multi_hot",
    "register",
]
