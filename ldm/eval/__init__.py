"""Evaluation: how good are the samples of a checkpoint.

`python -m ldm.eval` (FID, KID, CLIP score; configs/eval.yaml), built from: `inception` (the TF InceptionV3
feature extractor), `metrics` (FID / KID / CLIP score on torchmetrics), `reference` (reference statistics
and their cache), `score` (batches -> numbers), `curve` (FID vs CLIP score of a sweep); `digits` and
`reconstruction` score the digits models and autoencoders.
"""
