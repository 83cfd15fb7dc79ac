"""`--placement local|colocate[:N]|split:P,R`: which pool of Ray workers hosts which role.

- `local`: no Ray; one process (or the torchrun ranks that launched it), as without the flag.
- `colocate[:N]`: one pool of N workers, each hosting every role (policy, reference, critic,
  reward, and the rollout engine sampling the policy's own module). N defaults to the cluster's
  GPU count, 1 without GPUs. The N workers are the ranks of one torch.distributed group.
- `split:P,R`: P policy workers (policy + reference + critic + reward, one torch.distributed
  group) and R rollout workers, each holding its own copy of the policy weights, synced after
  every update. Rollout calls split the prompt groups over the R workers (whole groups).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("local", "colocate", "split")


@dataclass(frozen=True)
class Placement:
    kind: str = "local"
    policy_workers: int = 1
    rollout_workers: int = 0
    """0: the rollout engine lives with the policy (local, colocate)."""

    @property
    def on_ray(self) -> bool:
        return self.kind != "local"

    @property
    def split(self) -> bool:
        return self.kind == "split"

    def describe(self) -> str:
        if self.kind == "split":
            return f"{self.policy_workers} policy worker(s) + {self.rollout_workers} rollout worker(s)"
        if self.kind == "colocate":
            return f"{self.policy_workers} colocated worker(s)"
        return "local"


def parse_placement(spec: str, gpus: int = 0) -> Placement:
    """`Placement` of a `--placement` value (`gpus`: the cluster's GPU count, the default N of
    `colocate`).

    >>> parse_placement("split:2,1")
    Placement(kind='split', policy_workers=2, rollout_workers=1)
    >>> parse_placement("colocate"), parse_placement("colocate", gpus=4).policy_workers
    (Placement(kind='colocate', policy_workers=1, rollout_workers=0), 4)
    """
    text = (spec or "local").strip()
    if text == "local":
        return Placement()
    if text == "colocate":
        return Placement("colocate", max(1, gpus))
    match = re.fullmatch(r"colocate:(\d+)", text)
    if match:
        return Placement("colocate", _positive(match.group(1), text))
    match = re.fullmatch(r"split:(\d+),(\d+)", text)
    if match:
        return Placement("split", _positive(match.group(1), text), _positive(match.group(2), text))
    raise ValueError(f"--placement {spec!r}: expected local, colocate, colocate:N or split:P,R "
                     "(P policy workers, R rollout workers)")


def _positive(digits: str, spec: str) -> int:
    value = int(digits)
    if value < 1:
        raise ValueError(f"--placement {spec!r}: worker counts must be >= 1")
    return value
