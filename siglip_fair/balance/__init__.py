"""M4 data balancing: keep probabilities, keep masks and data cards (SPEC §2)."""
from siglip_fair.balance.card import card_markdown, data_card
from siglip_fair.balance.m4 import (M4Result, balance, bias_vectors, constraint_moments,
                                    default_config, keep_mask, q_from_duals)

__all__ = ["M4Result", "balance", "bias_vectors", "card_markdown", "constraint_moments",
           "data_card", "default_config", "keep_mask", "q_from_duals"]
