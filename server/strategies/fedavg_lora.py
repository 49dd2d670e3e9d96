"""FedAvg-LoRA: clients train A and B; the server averages each factor separately (example-weighted).

Not exact: mean(B) mean(A) != mean(B A). It is the baseline the other strategies improve on.
"""

from server.strategies.base import LoRAStrategy


class FedAvgLoRA(LoRAStrategy):
    """Plain averaging of every trained tensor; all hooks keep their defaults."""
