"""A language-model loop with gradient accumulation: one `rec.step` per optimizer step, several
micro-batches inside it; the ids of all micro-batches, in forward order.

Run:  python examples/lm_accumulation.py   then   dvemb compute runs/lm --out runs/lm-results
"""

import torch
import torch.nn.functional as F

import dvemb
from demo.charlm import CharLM, corpus

text = corpus(50_000)
vocab = sorted(set(text))
data = torch.tensor([vocab.index(c) for c in text])
length, micro, accumulation = 64, 8, 4
windows = data[: (len(data) // (length + 1)) * (length + 1)].view(-1, length + 1)  # one example = one window
model = CharLM(len(vocab), length=length)
optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
rec = dvemb.Recorder(model, "runs/lm", proj_dim=64, overwrite=True)  # mean loss over the step's examples
rec.calibrate((w[:, :-1], w[:, 1:]) for w in windows[:256].split(32))  # curvature-aware projection bases
for _ in range(50):
    ids = torch.randperm(len(windows))[: micro * accumulation]  # an example at most once per step
    with rec.step(ids, optimizer):
        for part in ids.split(micro):  # forward order = the order of ids
            chunk = windows[part]
            logits = model(chunk[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()) / accumulation
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
rec.record_queries("held-out", [(windows[-16:, :-1], windows[-16:, 1:])])
rec.close()
