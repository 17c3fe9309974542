"""hist_vlm.losses: ITC (+queues, momentum distillation), ITM (+hard negatives), MLM,
differentiable GradCAM, the HIST objective and the multi-process helpers. Backbone-agnostic:
everything goes through `hist_vlm.models.base.VisionLanguageBackbone`."""
from hist_vlm.losses.distributed import allreduce_gradients, broadcast_parameters
from hist_vlm.losses.gradcam import gradcam_maps
from hist_vlm.losses.hist import HistLoss, HistLossConfig, addition_loss, hist_weight

__all__ = [
    "HistLoss", "HistLossConfig", "addition_loss", "allreduce_gradients", "broadcast_parameters",
    "gradcam_maps", "hist_weight",
]
