"""hist_vlm.losses: ITC as a module owning its queue and cross-rank gather (`ItcLoss`), ITM
(+hard negatives), MLM, differentiable GradCAM, the terms of the HIST objective (`losses.terms`)
composed by `HistLoss`, and the gathers they need across processes. Backbone-agnostic:
everything goes through `hist_vlm.models.base.VisionLanguageBackbone`."""
from hist_vlm.losses.gradcam import gradcam_maps
from hist_vlm.losses.hist import HistLoss, HistLossConfig, hist_weight
from hist_vlm.losses.itc import ItcLoss
from hist_vlm.losses.terms import addition_loss

__all__ = [
    "HistLoss", "HistLossConfig", "ItcLoss", "addition_loss", "gradcam_maps", "hist_weight",
]
