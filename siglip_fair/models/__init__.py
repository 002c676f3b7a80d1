"""Image tower (ViT), text transformer and the two-tower contrastive model."""
from siglip_fair.models.text import TextTransformer
from siglip_fair.models.two_tower import TwoTower, embed_fns, make_model, temperature
from siglip_fair.models.variants import decode_variant
from siglip_fair.models.vit import ViT

__all__ = ["TextTransformer", "TwoTower", "ViT", "decode_variant", "embed_fns", "make_model", "temperature"]
