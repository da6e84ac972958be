"""The set criterion as this project lays it out against the reference's layout, same inputs, one
process, interleaved: here the cost matrices of all decoder layers are built in one pass and copied
to the host once, and the GIoU loss takes matched pairs only; the reference matches layer by layer
(one host copy each) and takes the diagonal of a full GIoU matrix. Prints medians and the ratio.

    python benchmarks/criterion_layout.py                      # r50 outputs, batch 2, on the CPU
    python benchmarks/criterion_layout.py --device cuda --batch-size 8
"""
import argparse
import statistics
import time

import torch

import detr
from detr import box_ops
from detr.engine import weighted_loss
from fixtures.models import make_batch
from runtime.device import resolve


def reference_layout(criterion, outputs, targets):
    """The reference's order of work: one matcher call (and host copy) per decoder layer."""
    losses = {}
    layers = [outputs] + outputs["aux_outputs"]
    num_boxes = criterion.num_boxes(targets, outputs["pred_logits"].device)
    for i, layer in enumerate(layers):
        indices = criterion.matcher(layer, targets)
        suffix = "" if i == 0 else f"_{i - 1}"
        part = criterion.loss_labels(layer, targets, indices, num_boxes, log=i == 0)
        idx = criterion._get_src_permutation_idx(indices)
        src = layer["pred_boxes"][idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        part["loss_bbox"] = torch.nn.functional.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(src), box_ops.box_cxcywh_to_xyxy(tgt)))
        part["loss_giou"] = (1 - giou).sum() / num_boxes
        part.update(criterion.loss_cardinality(layer, targets, indices, num_boxes))
        losses.update({k + suffix: v for k, v in part.items()})
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args()
    xpu = resolve(args.device)
    device = xpu.device
    torch.manual_seed(0)
    _, criterion, _ = detr.build("r50")
    criterion.to(device)
    _, targets = make_batch(args.batch_size)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    g = torch.Generator().manual_seed(1)

    def pred():
        return {
            "pred_logits": torch.randn(args.batch_size, 100, 92, generator=g).to(device).requires_grad_(),
            "pred_boxes": torch.rand(args.batch_size, 100, 4, generator=g)
            .mul(0.5)
            .add(0.1)
            .to(device)
            .requires_grad_(),
        }

    outputs = pred()
    outputs["aux_outputs"] = [pred() for _ in range(5)]
    ours, theirs = criterion(outputs, targets), reference_layout(criterion, outputs, targets)
    assert set(ours) == set(theirs)
    worst = max(abs(ours[k].item() - theirs[k].item()) for k in ours)
    times = {"this project": [], "reference layout": []}
    for i in range(args.rounds):
        order = [("this project", criterion), ("reference layout", lambda o, t: reference_layout(criterion, o, t))]
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            losses = fn(outputs, targets)
            total = weighted_loss(losses, criterion.weight_dict)
            total.backward()
            xpu.synchronize()
            times[name].append(time.perf_counter() - start)
    ours_t, ref_t = statistics.median(times["this project"]), statistics.median(times["reference layout"])
    print(f"loss terms agree to {worst:.2e}")
    print(f"criterion forward + backward, batch {args.batch_size}, 6 decoder layers, on {device}:")
    print(f"  this project      median {ours_t * 1e3:7.2f} ms")
    print(f"  reference layout  median {ref_t * 1e3:7.2f} ms")
    print(f"  ratio {ours_t / ref_t:.2f} (below 1: faster than the reference's layout)")


if __name__ == "__main__":
    main()
