"""`umae train`: MAE / U-MAE pretraining with MAE's recipe, split as facebookresearch/mae is:

- main.py (MAE's main_pretrain.py): arguments, processes and devices, model, data, optimizer,
  resume, then one `train_one_epoch` per epoch;
- engine.py (engine_pretrain.py): one epoch, with no host sync between log steps;
- lr_sched.py (util/lr_sched.py): linear warmup, half-cycle cosine;
- checkpoint.py: save (serialized once) and resume;
- log.py: loss statistics kept on the device and read every --log-every steps, JSON lines,
  TensorBoard when installed, a progress bar.
"""
from .main import add_args, param_groups, train, validate

__all__ = ["add_args", "param_groups", "train", "validate"]
