"""Instrument a plain PyTorch training loop with the dvemb recorder (about ten added lines, marked +).

Run:  python examples/plain_loop.py   then   dvemb compute runs/plain --out runs/plain-results
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import dvemb  # +

digits = load_digits()
x, y = torch.tensor(digits.data / 16.0, dtype=torch.float32), torch.tensor(digits.target)
train, val = slice(0, 1400), slice(1400, None)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

rec = dvemb.Recorder(model, "runs/plain", curvature="ggn", overwrite=True)  # +
rec.describe(range(1400), labels=y[train].tolist(), images=digits.images[train] / 16.0)  # + (optional)
rec.calibrate((x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32))  # + curvature-aware projection bases
for _ in range(3):
    order = torch.randperm(1400)
    for start in range(0, 1400, 32):
        ids = order[start : start + 32]
        with rec.step(ids, optimizer):  # +
            logits = model(x[ids])
            rec.curvature(logits)  # + (ggn mode only, before backward)
            loss = F.cross_entropy(logits, y[ids])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
rec.record_queries("validation", [(x[val], y[val])])  # +
rec.close()  # +
torch.save(model.state_dict(), "runs/plain-model.pt")  # weights only, for examples/adhoc_query.py
print(f"recorded {rec.tracked_fraction:.0%} of the parameters into runs/plain")
