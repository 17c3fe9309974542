"""hist_vlm.losses: ITC as a module owning its queue and cross-rank gather (`ItcLoss`), ITM
(+hard negatives), MLM, differentiable GradCAM, the HIST objective and the gathers it needs
across processes. Backbone-agnostic: everything goes through
`hist_vlm.models.base.VisionLanguageBackbone`."""
from hist_vlm.losses.gradcam import gradcam_maps
from hist_vlm.losses.hist import HistLoss, HistLossConfig, addition_loss, hist_weight
from hist_vlm.losses.itc import ItcLoss

__all__ = [
    "HistLoss", "HistLossConfig", "ItcLoss", "addition_loss", "gradcam_maps", "hist_weight",
]
