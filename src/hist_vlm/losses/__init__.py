"""hist_vlm.losses: ITC (+queues, momentum distillation), ITM (+hard negatives), MLM,
differentiable GradCAM, the HIST objective and the gathers it needs across processes. Backbone-agnostic:
everything goes through `hist_vlm.models.base.VisionLanguageBackbone`."""
from hist_vlm.losses.gradcam import gradcam_maps
from hist_vlm.losses.hist import HistLoss, HistLossConfig, addition_loss, hist_weight

__all__ = [
    "HistLoss", "HistLossConfig", "addition_loss", "gradcam_maps", "hist_weight",
]
