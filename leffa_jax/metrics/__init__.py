"""Evaluation metrics with the conventions of the authors' evaluation code (VtonEval / CatVTON
`eval.py`): FID (pytorch-fid and clean-fid Inception-v3 pipelines), KID x1000 (clean-fid), SSIM
(torchmetrics, data_range 1), LPIPS (SqueezeNet + learned linear layers, torchmetrics
`net_type="squeeze"`), CLIP-T / CLIP-I, and the flow endpoint error of the attention
(`flow_epe`). Images are NHWC inside JAX. See docs/evaluation.md.
"""
