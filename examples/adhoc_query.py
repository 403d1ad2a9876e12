"""Ask the API which training examples most helped or harmed one new test example.

The test gradient is taken at the final model and projected with the run's own manifest
(`dvemb.project_model_gradient`), so it lands in the same space as the recorded gradients.

Run after `python examples/plain_loop.py` and an analysis of runs/plain on a server:
    python examples/adhoc_query.py http://127.0.0.1:8000 dvemb_... JOB_ID
"""

import sys

import httpx
import torch
import torch.nn.functional as F

import dvemb


def adhoc_query(server: str, token: str, job_id: int, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    log = dvemb.open_log("runs/plain")  # the log, not only its manifest: a calibrated projection lives in it
    model.zero_grad()
    F.cross_entropy(model(x[None]), y[None]).backward()  # the test example's own loss, at the final model
    gradient = {name: vector.tolist() for name, vector in dvemb.project_model_gradient(log, model).items()}
    response = httpx.post(
        f"{server}/api/v1/jobs/{job_id}/queries",
        json={"gradients": [gradient], "top_k": 5},
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    response.raise_for_status()
    return response.json()


if __name__ == "__main__":
    from sklearn.datasets import load_digits

    server, token, job_id = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    model.load_state_dict(torch.load("runs/plain-model.pt", weights_only=True))
    digits = load_digits()
    x, y = torch.tensor(digits.data[1500] / 16.0, dtype=torch.float32), torch.tensor(digits.target[1500])
    answer = adhoc_query(server, token, job_id, model, x, y)
    for kind in ("helpful", "harmful"):
        print(kind, [(r["example_id"], r["step"], round(r["score"], 5)) for r in answer["result"]["queries"][0][kind]])
