"""M4 data balancing: keep probabilities, keep masks and data cards (SPEC §2)."""
from siglip_fair.balance.card import card_markdown, data_card
from siglip_fair.balance.draws import keep_mask, repeat_counts
from siglip_fair.balance.m4 import (M4Result, balance, bias_vectors, constraint_moments,
                                    default_config, q_from_duals)
from siglip_fair.balance.shards import as_shards, write_shards
from siglip_fair.balance.stream import balance_stream

__all__ = ["M4Result", "as_shards", "balance", "balance_stream", "bias_vectors", "card_markdown",
           "constraint_moments", "data_card", "default_config", "keep_mask", "q_from_duals",
           "repeat_counts", "write_shards"]
