"""REC / RES / interactive grounding and GCG (GLaMM) metrics against hand-computed
cases; GCG AP50 also against pycocotools directly."""
import contextlib
import io

import numpy as np
import pytest

from refvlm_core.errors import InputError
from refvlm_training.evaluation.metrics import grounding
from refvlm_training.evaluation.metrics.gcg import GcgImage, gcg_metrics, greedy_pairs
from refvlm_training.evaluation.metrics.text_similarity import BagOfWordsEmbedder


def _mask(shape, y0, y1, x0, x1):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_box_iou_hand():
    # 10x10 boxes shifted by 5 in x: intersection 50, union 150.
    inter, union = grounding.box_intersection_union(np.array([5, 0, 15, 10]), np.array([0, 0, 10, 10]))
    assert (inter, union) == (50.0, 150.0)
    assert grounding.box_intersection_union(None, np.array([0, 0, 2, 3])) == (0.0, 6.0)
    assert grounding.box_intersection_union(np.array([20, 20, 30, 30]), np.array([0, 0, 10, 10]))[0] == 0.0


def test_rec_acc_and_miou():
    gt = [np.array([0, 0, 10, 10])] * 3
    preds = [np.array([0, 0, 10, 10]), np.array([5, 0, 15, 10]), None]  # IoU 1, 1/3, 0
    out = grounding.rec_metrics(preds, gt)
    assert out == pytest.approx({"acc@0.5": 1 / 3, "miou": (1 + 1 / 3) / 3})
    # exactly 0.5 counts as correct: 10x10 vs 10x5 inside it
    assert grounding.rec_metrics([np.array([0, 0, 10, 5])], [np.array([0, 0, 10, 10])])["acc@0.5"] == 1.0
    assert grounding.rec_metrics([], []) == {"acc@0.5": 0.0, "miou": 0.0}
    with pytest.raises(InputError):
        grounding.rec_metrics([None], [])


def test_res_ciou_weighs_large_objects_giou_does_not():
    shape = (20, 20)
    big_gt, big_pred = _mask(shape, 0, 10, 0, 10), _mask(shape, 0, 10, 0, 10)      # IoU 1, union 100
    small_gt, small_pred = _mask(shape, 15, 17, 15, 17), _mask(shape, 15, 17, 17, 19)  # IoU 0, union 8
    out = grounding.res_metrics([big_pred, small_pred], [big_gt, small_gt])
    assert out == pytest.approx({"ciou": 100 / 108, "giou": 0.5})
    none = grounding.res_metrics([None], [small_gt])
    assert none == {"ciou": 0.0, "giou": 0.0}
    with pytest.raises(InputError, match="differ in size"):
        grounding.res_metrics([np.zeros((5, 5), bool)], [small_gt])


def test_interactive_per_prompt_type():
    shape = (10, 10)
    gt_mask = _mask(shape, 0, 4, 0, 4)                       # 16 px
    half = _mask(shape, 0, 4, 0, 2)                          # IoU 0.5
    out = grounding.interactive_metrics(
        ["point", "point", "box"], ["mask", "mask", "box"],
        [gt_mask, half, np.array([0, 0, 2, 2])], [gt_mask, gt_mask, np.array([0, 0, 4, 4])])
    assert out["point_mask/miou"] == pytest.approx(0.75)
    assert out["point_mask/ciou"] == pytest.approx((16 + 8) / (16 + 16))
    assert out["box_box/miou"] == pytest.approx(0.25)
    assert out["all/miou"] == pytest.approx((1 + 0.5 + 0.25) / 3)
    with pytest.raises(InputError, match="box or a mask"):
        grounding.interactive_metrics(["point"], ["depth"], [None], [gt_mask])


# ------------------------------------------------------------------ GCG

def test_greedy_pairs_take_highest_iou_first():
    ious = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert greedy_pairs(ious) == [(0, 0), (1, 1)]
    # with thresholds the first failing best pair ends the matching
    assert greedy_pairs(ious, iou_threshold=0.5) == [(0, 0)]
    sims = np.array([[0.2, 1.0], [1.0, 1.0]])
    assert greedy_pairs(ious, sims, 0.5, 0.5) == []


def _scene():
    shape = (30, 30)
    cube, cone, ball = _mask(shape, 0, 10, 0, 10), _mask(shape, 15, 25, 15, 25), _mask(shape, 0, 5, 20, 30)
    return shape, cube, cone, ball


def test_gcg_hand_case():
    shape, cube, cone, ball = _scene()
    cone_half = _mask(shape, 15, 25, 15, 20)                # IoU 0.5 with the cone
    image = GcgImage(pred_regions=[cube, cone_half], pred_labels=["red cube", "blue ball"],
                     gt_regions=[cube, cone, ball], gt_labels=["red cube", "yellow cone", "blue ball"])
    out = gcg_metrics([image], BagOfWordsEmbedder())
    assert out["miou"] == pytest.approx(0.75)                 # pairs: cube 1.0, cone 0.5
    assert out["recall"] == pytest.approx(1 / 3)              # cone pair fails the text check
    empty = GcgImage(gt_regions=[cube], gt_labels=["cube"])
    assert gcg_metrics([empty], BagOfWordsEmbedder()) == {"ap50": 0.0, "miou": 0.0, "recall": 0.0}
    with pytest.raises(InputError, match="one phrase label"):
        gcg_metrics([GcgImage(pred_regions=[cube])], BagOfWordsEmbedder())


def test_gcg_ap50_equals_pycocotools():
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    shape, cube, cone, ball = _scene()
    far = _mask(shape, 26, 30, 0, 4)
    images = [GcgImage([cube, far], ["a", "b"], [cube, cone], ["a", "c"]),
              GcgImage([ball], ["d"], [ball], ["d"])]

    def rle(mask):
        out = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        out["counts"] = out["counts"].decode()
        return out

    gt = COCO()
    anns, dets = [], []
    for image_id, image in enumerate(images, start=1):
        for m in image.gt_regions:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                         "segmentation": rle(m), "area": float(m.sum()),
                         "bbox": list(mask_utils.toBbox(rle(m)))})
        dets += [{"image_id": image_id, "category_id": 1, "segmentation": rle(m), "score": 1.0}
                 for m in image.pred_regions]
    gt.dataset = {"images": [{"id": 1, "height": 30, "width": 30}, {"id": 2, "height": 30, "width": 30}],
                  "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "segm")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert gcg_metrics(images, BagOfWordsEmbedder())["ap50"] == pytest.approx(ev.stats[1])
    assert 0 < ev.stats[1] < 1


def test_rec_metrics_per_kind_of_expression():
    from refvlm_simworld.language import expression_kind

    phrases = ["the red metal cube", "the cube left of the blue sphere", "the largest cone",
               "the sphere nearest to the camera", "the small cylinder behind the cube"]
    kinds = [expression_kind(p) for p in phrases]
    assert kinds == ["attribute", "relation", "superlative", "superlative", "relation"]
    gt = [np.array([0, 0, 10, 10])] * 5
    hit, miss = np.array([0, 0, 10, 10]), np.array([50, 50, 60, 60])
    out = grounding.rec_metrics([hit, hit, miss, hit, miss], gt, kinds=kinds)
    assert out["acc@0.5"] == pytest.approx(0.6)
    assert (out["acc@0.5/attribute"], out["acc@0.5/relation"], out["acc@0.5/superlative"]) == (1.0, 0.5, 0.5)
    assert (out["count/attribute"], out["count/relation"], out["count/superlative"]) == (1, 2, 2)
