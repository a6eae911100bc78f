"""train: turning data into a LoRA adapter. It owns the one training loop (`loop.py`: setup,
`TrainState`, `train_step`, `evaluate_and_checkpoint`, Ctrl-C handling), the answer-only
loss and batching (`loss.py`), checkpoints and crash-safe adapter saves (`checkpoint.py`),
the rule that a run folder holds one run (`resume.py`), and the three recipes on top of the
loop: classification SFT (`sft.train`), extraction (`extraction.train_extraction`) and DPO
refinement (`dpo.build_pairs`, `dpo.dpo`). It may import errors, io, task, config, rundir,
model, data, extract and serve (to run a trained model while building DPO pairs), never
evaluate, export, monitor or cli: scoring a DPO run against its parent lives in
`evaluate.refine`.
"""

from taskling.train.loop import TrainingInterrupted, TrainResult
from taskling.train.sft import train

__all__ = ["TrainResult", "TrainingInterrupted", "train"]
