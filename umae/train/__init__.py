"""`umae train`: MAE / U-MAE pretraining with MAE's recipe, split as facebookresearch/mae is:

- config.py: `TrainConfig`, every setting of a run (the `umae train` flags are generated from
  it), and `validate`;
- main.py (MAE's main_pretrain.py): processes and devices, model, data, optimizer, resume, then
  one loader (its workers alive across epochs) into `train_steps`; `umae train`'s `main`;
- engine.py (engine_pretrain.py): the steps, with no host sync between log steps, and the stop on
  a non-finite loss;
- lr_sched.py (util/lr_sched.py): linear warmup, half-cycle cosine;
- checkpoint.py: save (serialized once) and resume;
- log.py: loss statistics kept on the device and read every --log-every steps, JSON lines,
  TensorBoard when installed, a progress bar.
"""
from .config import TrainConfig, add_args, validate
from .engine import NonFiniteLoss
from .main import param_groups, train

__all__ = ["NonFiniteLoss", "TrainConfig", "add_args", "param_groups", "train", "validate"]
