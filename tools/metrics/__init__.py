"""Evaluation metrics of the SD v1 model card: FID (pytorch-fid's Inception and math) and CLIP score
(open_clip ViT-L/14 cosine), with the COCO-2017 caption draw; all weights and data from local files."""
