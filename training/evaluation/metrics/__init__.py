"""Metrics of the paper's evaluation (section V), one module per family:

- ``caption``: CIDEr-D, BLEU-4, METEOR (exact-match variant)  -> caption, REG, GCG text
- ``vqa``: VQAv2 accuracy with the official answer normalisation
- ``pope``: accuracy, precision, recall, F1, yes-ratio
- ``grounding``: REC Acc@0.5 / mIoU, RES cIoU / gIoU, interactive grounding per prompt type
- ``gcg``: AP50, mIoU, recall as GLaMM defines them
- ``ovd``: freeform OVD/OVS mAP_S (phrases mapped to class names by text similarity)
- ``keypoints``: OKS AP (pycocotools), PCK@0.1
- ``depth``: AbsRel, RMSE, delta1
- ``trp``: valid TRP rate

Every function takes plain numbers, strings and numpy arrays, never model objects.
"""
