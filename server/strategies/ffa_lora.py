"""FFA-LoRA (Sun et al. 2024): A stays at its seeded random init everywhere; only B trains and travels.

Every party builds the same A from the run seed (see `common/adapters/lora.py`), so A never crosses
the network. Averaging B is exact for the product: mean_k(B_k) A = mean_k(B_k A).
"""

from server.strategies.base import LoRAStrategy


class FFALoRA(LoRAStrategy):
    frozen_factors = ("lora_A",)
    required_factors = ("lora_A", "lora_B")
    static_factors = ("lora_A",)
