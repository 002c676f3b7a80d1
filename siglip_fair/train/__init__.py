"""Losses, optimiser, sharded train step, checkpoints and the training loop."""
from siglip_fair.models.two_tower import embed_fns
from siglip_fair.train.checkpoint import make_manager, restore_or_init
from siglip_fair.train.loop import train
from siglip_fair.train.losses import contrastive_loss, sigmoid_loss, softmax_loss
from siglip_fair.train.optim import make_optimizer, make_schedule
from siglip_fair.train.sharding import global_batch, make_mesh, state_shardings
from siglip_fair.train.state import TrainState, make_init_fn, make_train_step

__all__ = [
    "TrainState", "contrastive_loss", "embed_fns", "global_batch", "make_init_fn",
    "make_manager", "make_mesh", "make_optimizer", "make_schedule", "make_train_step",
    "restore_or_init", "sigmoid_loss", "softmax_loss", "state_shardings", "train",
]
