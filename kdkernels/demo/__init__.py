"""End-to-end distillation demo on scikit-learn's digits (``python -m kdkernels.demo``).

A teacher CNN, a smaller student trained alone (cross-entropy), and the same student distilled
with response KD (SoftmaxKLDivLoss), a feature hint (ProjectedMSELoss, 1x1 projection of NCHW
maps) and a relation loss (RKDLoss on penultimate embeddings). The distillation is run twice per
seed, once with the kdkernels losses (backend "auto") and once with their eager compositions
(the usual plain-PyTorch code, kdkernels/bench/baselines.py), to time the loss step both
ways. Needs scikit-learn (``make demo`` installs it).

Files: data.py (the split), models.py (the CNNs), distill.py (the loss composition),
train.py (training loops), report.py (summary, results.json, plot), __main__.py (command line).
"""
