"""Experiment suite testing the paper's claims on CPU-sized problems (issue #6).

    python -m experiments.run [--quick] [--out DIR]

(a) cone.py: fitting targets outside the cone of the expert outputs;
(b) scaling.py: held-out quality against the number of experts E;
(c) ablation.py: stretch only / rotation only / both;
(d) contrastive.py: expert-pair similarity against the change in angular separation;
verdicts.py holds the verdict rules (fixed in advance); report.py writes RESULTS.md, runs.csv and
the plots; sensitivity.py is a post-hoc, exploratory budget check of (b)
(``python -m experiments.sensitivity``).
"""
