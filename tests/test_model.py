"""Shapes, dtypes and structure of every DETR module, and the reference configuration."""
import math

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

import detr
from detr.backbone import Backbone
from detr.misc import NestedTensor, nested_tensor_from_tensor_list
from detr.model import MLP, PostProcess
from detr.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from detr.transformer import Transformer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return detr.build("tiny")


def images():
    return [torch.randn(3, 96, 128), torch.randn(3, 128, 64)]


def test_nested_tensor_pads_and_masks():
    nt = nested_tensor_from_tensor_list(images())
    assert nt.tensors.shape == (2, 3, 128, 128)
    assert nt.mask.dtype == torch.bool and nt.mask.shape == (2, 128, 128)
    assert not nt.mask[0, :96, :].any() and nt.mask[0, 96:, :].all()
    assert not nt.mask[1, :, :64].any() and nt.mask[1, :, 64:].all()
    assert (nt.tensors[1, :, :, 64:] == 0).all()


def test_nested_tensor_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        nested_tensor_from_tensor_list([])
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        nested_tensor_from_tensor_list([torch.zeros(1, 3, 4, 4)])


def test_r50_parameter_count_and_frozen_parts():
    model, criterion, _ = detr.build("r50")
    assert sum(p.numel() for p in model.parameters()) == 41_524_768
    body = model.backbone[0].body
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules()) == 53
    trainable = {n.split(".")[3] for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone")}
    assert trainable == {"layer2", "layer3", "layer4"}
    assert "fc" not in dict(body.named_children()) and "avgpool" not in dict(body.named_children())
    assert criterion.weight_dict["loss_bbox_4"] == 5 and criterion.weight_dict["loss_giou"] == 2
    assert len(criterion.weight_dict) == 3 * 6
    assert criterion.empty_weight[-1] == 0.1 and criterion.empty_weight[:-1].eq(1).all()


def test_zero_backbone_lr_freezes_the_whole_backbone():
    model, _, _ = detr.build("tiny", lr_backbone=0)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone"))


def test_backbone_output_and_mask():
    backbone = Backbone("resnet18", True, False, False)
    nt = nested_tensor_from_tensor_list(images())
    out = backbone(nt)["0"]
    assert out.tensors.shape == (2, 512, 4, 4)
    assert out.mask.shape == (2, 4, 4) and out.mask.dtype == torch.bool
    assert out.mask[1, :, 2:].all() and not out.mask[1, :, :2].any()
    assert out.mask[0, 3:, :].all() and not out.mask[0, :3, :].any()


def test_dilation_keeps_layer4_resolution():
    backbone = Backbone("resnet50", True, False, True)
    out = backbone(nested_tensor_from_tensor_list([torch.randn(3, 64, 64)]))["0"]
    assert out.tensors.shape == (1, 2048, 4, 4)
    with pytest.raises(ValueError, match="dilation.*resnet18"):
        Backbone("resnet18", True, False, True)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        Backbone("vgg16", True, False, False)


def test_sine_position_encoding_values():
    pe = PositionEmbeddingSine(8, normalize=True)
    mask = torch.zeros(1, 3, 5, dtype=torch.bool)
    mask[:, :, 4:] = True
    pos = pe(NestedTensor(torch.zeros(1, 4, 3, 5), mask))
    assert pos.shape == (1, 16, 3, 5) and pos.dtype == torch.float32
    # channel 8 is sin of the x position (cumulative count / 4 columns * 2 pi) / temperature ** 0
    x = torch.tensor([1, 2, 3, 4, 4], dtype=torch.float32) / (4 + 1e-6) * 2 * math.pi
    torch.testing.assert_close(pos[0, 8, 0], x.sin())
    torch.testing.assert_close(pos[0, 9, 0], x.cos())
    y = torch.tensor([1, 2, 3], dtype=torch.float32) / (3 + 1e-6) * 2 * math.pi
    torch.testing.assert_close(pos[0, 0, :, 0], y.sin())
    assert pos.abs().max() <= 1


def test_sine_position_encoding_follows_float64():
    pe = PositionEmbeddingSine(4, normalize=True)
    pos = pe(NestedTensor(torch.zeros(1, 2, 3, 3, dtype=torch.float64), torch.zeros(1, 3, 3, dtype=torch.bool)))
    assert pos.dtype == torch.float64


def test_learned_position_encoding_shape():
    pe = PositionEmbeddingLearned(8)
    pos = pe(NestedTensor(torch.zeros(2, 4, 3, 5), torch.zeros(2, 3, 5, dtype=torch.bool)))
    assert pos.shape == (2, 16, 3, 5)
    torch.testing.assert_close(pos[1, :8, 2, 4], pe.col_embed.weight[4])
    torch.testing.assert_close(pos[0, 8:, 2, 4], pe.row_embed.weight[2])


@pytest.mark.parametrize("pre_norm", [False, True])
def test_transformer_shapes(pre_norm):
    t = Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=64,
                    normalize_before=pre_norm, return_intermediate_dec=True)
    assert (t.encoder.norm is not None) == pre_norm
    src, pos = torch.randn(2, 32, 3, 4), torch.randn(2, 32, 3, 4)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, :, 3:] = True
    hs, memory = t(src, mask, torch.randn(7, 32), pos)
    assert hs.shape == (3, 2, 7, 32) and memory.shape == (2, 32, 3, 4)
    # every intermediate output went through the final decoder LayerNorm
    torch.testing.assert_close(hs.mean(-1), torch.zeros(3, 2, 7), atol=1e-5, rtol=0)


def test_transformer_ignores_masked_positions():
    torch.manual_seed(0)
    t = Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                    dropout=0.0, return_intermediate_dec=True).eval()
    src, pos, query = torch.randn(1, 32, 3, 4), torch.randn(1, 32, 3, 4), torch.randn(5, 32)
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[:, :, 2:] = True
    changed = src.clone()
    changed[:, :, :, 2:] = torch.randn(1, 32, 3, 2) * 10
    torch.testing.assert_close(t(changed, mask, query, pos)[0], t(src, mask, query, pos)[0])
    assert not torch.allclose(
        t(changed, torch.zeros_like(mask), query, pos)[0], t(src, torch.zeros_like(mask), query, pos)[0]
    )


def test_detr_outputs(tiny):
    model, _, _ = tiny
    out = model(images())
    assert out["pred_logits"].shape == (2, 20, 92) and out["pred_logits"].dtype == torch.float32
    assert out["pred_boxes"].shape == (2, 20, 4)
    assert (out["pred_boxes"] >= 0).all() and (out["pred_boxes"] <= 1).all()
    assert len(out["aux_outputs"]) == 1
    assert out["aux_outputs"][0]["pred_logits"].shape == (2, 20, 92)


def test_detr_without_aux_loss():
    model, criterion, _ = detr.build("tiny", aux_loss=False)
    out = model(images())
    assert "aux_outputs" not in out
    assert set(criterion.weight_dict) == {"loss_ce", "loss_bbox", "loss_giou"}


def test_mlp():
    mlp = MLP(8, 16, 4, 3)
    assert [layer.out_features for layer in mlp.layers] == [16, 16, 4]
    assert mlp(torch.randn(5, 8)).shape == (5, 4)


def test_postprocess_scales_boxes_and_skips_no_object():
    logits = torch.full((1, 2, 4), -10.0)
    logits[0, 0, 2] = 10.0
    logits[0, 1, 3] = 10.0  # "no object" wins, but the best real class is still reported
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5]]])
    res = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    assert res[0]["labels"].tolist()[0] == 2
    assert res[0]["scores"][0] > 0.99 and res[0]["scores"][1] < 0.01
    torch.testing.assert_close(res[0]["boxes"][0], torch.tensor([80.0, 30.0, 120.0, 70.0]))


def test_postprocess_rejects_mismatched_sizes():
    out = {"pred_logits": torch.zeros(2, 3, 4), "pred_boxes": torch.zeros(2, 3, 4)}
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess()(out, torch.tensor([[10, 10]]))


def test_build_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown model config 'r101x'"):
        detr.build("r101x")
    with pytest.raises(ValueError, match="unknown model overrides.*hiden_dim"):
        detr.build("tiny", hiden_dim=3)


def test_local_backbone_weights_are_loaded(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model, _, _ = detr.build("tiny", backbone_weights=str(path))
    torch.testing.assert_close(model.backbone[0].body.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(model.backbone[0].body.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_a_backbone_trained_from_scratch_has_batch_norm_and_trains_every_layer():
    model, _, _ = detr.build("tiny", backbone_norm="batch", backbone_stride=16)
    body = model.backbone[0].body
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules()) > 0
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone"))
    assert "layer4" not in dict(body.named_children()) and model.backbone.num_channels == 256
    out = model([torch.rand(3, 128, 96)])
    features, _ = model.backbone(nested_tensor_from_tensor_list([torch.rand(3, 128, 96)]))
    assert features[-1].tensors.shape[-2:] == (8, 6)
    assert out["pred_boxes"].shape == (1, 20, 4)


def test_bad_backbone_options_are_named():
    with pytest.raises(ValueError, match="unknown backbone norm 'group'"):
        detr.build("tiny", backbone_norm="group")
    with pytest.raises(ValueError, match="stride must be 16 or 32"):
        detr.build("tiny", backbone_stride=8)
