"""A training step's metrics kept on the device and read once a log line, and DAMA's running state
kept there too (pref.py and joint.py): on a GPU each .item() in a step makes the host wait for it."""
import torch


def reward_metrics(chosen_rewards, rejected_rewards):
    """losses.preference_metrics (TRL's names, the same operations), as 0-dim tensors left on the
    device: its .item()s would make the host wait for the GPU every step. test_pref checks that
    the two give the same numbers."""
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()  # (B,)
    return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean()}


class Metrics:
    """The metric dicts of a run's steps, read from the device only when needed. On CUDA every .item()
    makes the host wait for the GPU, and this small model's step is bound by how fast the host launches
    kernels: the host must run ahead. So a step leaves its metrics on the device as 0-dim tensors, and
    `read` brings all pending ones over in ONE transfer (at a log line, a checkpoint, the end)."""

    def __init__(self, done=()):
        self.done = list(done)    # dicts of Python numbers (a resumed run's curve)
        self.pending = []         # dicts of 0-dim tensors (and Python numbers)

    def append(self, m):
        self.pending.append(m)

    def read(self):
        """Every dict so far, tensors turned into floats (integer tensors, small counts, into ints)."""
        tensors = [v for m in self.pending for v in m.values() if isinstance(v, torch.Tensor)]
        values = iter(torch.stack(tensors).tolist() if tensors else [])   # the one transfer; dtypes promote exactly
        for m in self.pending:
            self.done.append({k: (next(values) if v.is_floating_point() else int(next(values)))
                              if isinstance(v, torch.Tensor) else v for k, v in m.items()})
        self.pending = []
        return self.done


def python_float(device):
    """float64, a Python float's precision, for values kept on `device` that a float used to hold (MPS: float32)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def dama_state(device, seed):
    """DAMA's training state: R-bar, the running mean margin, as a float64 0-dim tensor on the device
    (as a float, dama_loss would .item() the batch's mean margin every step: the same numbers), and
    the generator of its selection."""
    return {"gap_mean": torch.zeros((), dtype=python_float(device), device=device),
            "generator": torch.Generator(device=device).manual_seed(seed)}
