"""Image-text contrastive loss (`ItcLoss`): multi-positive targets, momentum distillation,
feature queues.

ALBEF recipe (with a momentum twin): rows are the online features, columns the momentum
features of the whole global batch (gathered) plus the queues; targets are
`alpha * softmax(momentum sims) + (1 - alpha) * positives`. BLIP (no twin): plain in-batch
ITC, columns are the online features gathered across ranks WITH gradient (open_clip's
gather_with_grad + local_loss), no queue, no distillation, learnable temperature.

Positives are not just the diagonal: a text is positive for an image when it belongs to
that image (same dataset image id) OR is token-identical to a text that does (a batch holds
many "a man"), so identical texts are never each other's negatives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hist_vlm.losses.distributed import gather_no_grad, gather_with_grad, global_mean


def text_keys(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[N, T] -> [N] int64 hash of the token ids; equal texts get equal keys whatever the
    padding (pads are zeroed and add nothing), so keys can be compared across ranks."""
    coef = torch.tensor(
        [pow(1_000_003, i + 1, 2**61 - 1) for i in range(input_ids.shape[1])],
        dtype=torch.int64, device=input_ids.device,
    )  # position weights, the same prefix for every padded length
    return ((input_ids * attention_mask) * coef).sum(-1)  # wraps on overflow: still a hash


class ItcQueue(nn.Module):
    """Momentum-feature queues (ALBEF/MoCo) with wrap-around enqueue (SelfEQ fixed ALBEF's
    `queue_size % batch == 0` assert this way). The pointer stays on the device: no host sync.

    `enqueue` writes new tensors instead of changing the old ones in place, so every ITC term
    of a step reads the queue as it is (no per-term copy of the [Q, E] queues) and the tensors
    autograd saved from it stay valid until the backward."""

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("image_queue", F.normalize(torch.randn(size, dim), dim=1))  # [Q, E]
        self.register_buffer("text_queue", F.normalize(torch.randn(size, dim), dim=1))   # [Q, E]
        self.register_buffer("id_queue", torch.full((size,), -100, dtype=torch.long))   # [Q]
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, image_ids: Tensor) -> None:
        """Rows of the (gathered) momentum features, paired: text i belongs to image_ids[i]."""
        n = min(text_feat.shape[0], self.size)
        idx = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.image_queue = self.image_queue.index_copy(0, idx, image_feat[-n:].to(self.image_queue.dtype))
        self.text_queue = self.text_queue.index_copy(0, idx, text_feat[-n:].to(self.text_queue.dtype))
        self.id_queue = self.id_queue.index_copy(0, idx, image_ids[-n:])
        self.ptr.copy_((self.ptr + n) % self.size)


def positive_masks(
    row_ids: Tensor, keys: Tensor, image_ids: Tensor,
    row_ids_cols: Tensor, keys_cols: Tensor, image_ids_cols: Tensor,
) -> tuple[Tensor, Tensor]:
    """Bool positives (t2i [N, Bg], i2t [B, Ng]) of local rows/images against the columns.

    row_ids [N] image id of each row, keys [N] text keys, image_ids [B]; `*_cols` the same
    for the column side (gathered, or the local tensors again)."""
    same_key = keys.unsqueeze(1) == keys_cols.unsqueeze(0)                      # [N, Ng]
    key_cols_same = keys_cols.unsqueeze(1) == keys_cols.unsqueeze(0)            # [Ng, Ng]
    text_of_img = row_ids_cols.unsqueeze(1) == image_ids_cols.unsqueeze(0)      # [Ng, Bg]
    t2i = (row_ids.unsqueeze(1) == image_ids_cols.unsqueeze(0)) | (same_key.float() @ text_of_img.float() > 0)
    img_has = image_ids.unsqueeze(1) == row_ids_cols.unsqueeze(0)               # [B, Ng]
    i2t = img_has.float() @ key_cols_same.float() > 0
    return t2i, i2t


def _soft_ce(logits: Tensor, targets: Tensor) -> Tensor:
    return -(F.log_softmax(fp32_or_wider(logits), dim=1) * targets).sum(1)  # [rows]


def similarity(rows: Tensor, cols: Tensor) -> Tensor:
    """Dot products of L2-normalised features: [A, E] x [C, E] -> [A, C]. A side with K
    vectors per item ([A, K, E]: BLIP-2's query features) scores its best vector per pair,
    as BLIP-2's ITC does (max over queries)."""
    if rows.dim() == 2 and cols.dim() == 2:
        return rows @ cols.t()
    if rows.dim() == 3:
        return torch.einsum("ake,ce->ack", rows, cols).amax(-1)
    return torch.einsum("ae,cke->ack", rows, cols).amax(-1)


def fp32_or_wider(x: Tensor) -> Tensor:
    """Loss math in float32 under bf16/fp16 autocast, float64 stays float64 (exactness tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class ItcLoss(nn.Module):
    """ITC as one module that owns its cross-rank gather and its queue (open_clip's `ClipLoss`,
    https://github.com/mlfoundations/open_clip/blob/main/src/open_clip/loss.py): callers pass
    LOCAL features; the columns, positives, distillation targets and queue read happen here.

    One instance serves every ITC term of a step (captions, phrases, subjects): all of them
    read the queue as it was at the start of the step, so `enqueue` is a separate call, made
    once after the last of them (HistLoss.forward)."""

    def __init__(self, embed_dim: int, queue_size: int = 0) -> None:
        super().__init__()
        self.queue = ItcQueue(embed_dim, queue_size) if queue_size > 0 else None

    def forward(
        self, image_feat: Tensor, text_feat: Tensor, image_ids: Tensor, image_index: Tensor, keys: Tensor,
        temp: Tensor, *, image_feat_m: Tensor | None = None, text_feat_m: Tensor | None = None, alpha: float = 0.0,
    ) -> Tensor:
        """(t2i + i2t) / 2, each a global mean over rows with at least one positive.

        image_feat [B, E] (or [B, K, E], `similarity`), text_feat [N, E]: online, local rows;
        image_ids [B] dataset image ids; image_index [N] row -> local image; keys [N] `text_keys`;
        image_feat_m [B, E], text_feat_m [N, E]: the momentum twin's (then the columns)."""
        momentum = image_feat_m is not None and text_feat_m is not None
        if momentum:  # columns: the momentum features, no grad
            image_cols, text_cols = gather_no_grad(image_feat_m), gather_no_grad(text_feat_m)  # [Bg, E], [Ng, E]
        else:         # the online ones, gradient back to their owners
            image_cols, text_cols = gather_with_grad(image_feat), gather_with_grad(text_feat)
        row_ids = image_ids[image_index]  # [N] image id of each row
        image_ids_cols, row_ids_cols, keys_cols = (gather_no_grad(x) for x in (image_ids, row_ids, keys))
        pos_t2i, pos_i2t = positive_masks(row_ids, keys, image_ids, row_ids_cols, keys_cols, image_ids_cols)
        q_img = q_txt = None
        if self.queue is not None:  # read as they are: enqueue never changes these tensors in place
            q_img, q_txt, q_ids = self.queue.image_queue.detach(), self.queue.text_queue.detach(), self.queue.id_queue
            pos_t2i = torch.cat([pos_t2i, row_ids.unsqueeze(1) == q_ids.unsqueeze(0)], 1)    # [N, Bg+Q]
            pos_i2t = torch.cat([pos_i2t, image_ids.unsqueeze(1) == q_ids.unsqueeze(0)], 1)  # [B, Ng+Q]

        def against(rows: Tensor, cols: Tensor, queued: Tensor | None) -> Tensor:
            """[n, (K,) E] -> [n, cols (+Q)]: two products, so the [Q, E] queue is never concatenated."""
            sim = similarity(rows, cols)
            return sim if queued is None else torch.cat([sim, similarity(rows, queued.to(rows.dtype))], 1)

        sim_t2i = against(text_feat, image_cols, q_img) / temp   # [N, Bg(+Q)]
        sim_i2t = against(image_feat, text_cols, q_txt) / temp   # [B, Ng(+Q)]
        with torch.no_grad():
            tgt_t2i = pos_t2i.to(sim_t2i.dtype) / pos_t2i.sum(1, keepdim=True).clamp(min=1)
            tgt_i2t = pos_i2t.to(sim_i2t.dtype) / pos_i2t.sum(1, keepdim=True).clamp(min=1)
            if alpha > 0 and text_feat_m is not None:  # ALBEF's momentum distillation
                soft_t2i = F.softmax(against(text_feat_m, image_cols, q_img) / temp, 1)
                soft_i2t = F.softmax(against(image_feat_m, text_cols, q_txt) / temp, 1)
                tgt_t2i = alpha * soft_t2i + (1 - alpha) * tgt_t2i
                tgt_i2t = alpha * soft_i2t + (1 - alpha) * tgt_i2t
        t2i = global_mean(_soft_ce(sim_t2i, tgt_t2i), pos_t2i.any(1))
        i2t = global_mean(_soft_ce(sim_i2t, tgt_i2t), pos_i2t.any(1))
        return (t2i + i2t) / 2

    @torch.no_grad()
    def enqueue(self, image_feat_m: Tensor, text_feat_m: Tensor, image_ids: Tensor, image_index: Tensor) -> None:
        """Push one kind of rows (text i with its image) of every rank: image_feat_m [B, E],
        text_feat_m [N, E] momentum features, image_ids [B], image_index [N]. No queue: a no-op."""
        if self.queue is not None:
            self.queue.enqueue(gather_no_grad(image_feat_m[image_index]), gather_no_grad(text_feat_m),
                               gather_no_grad(image_ids[image_index]))
