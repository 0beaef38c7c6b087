"""cst.train: DPOConfig (config.py) and the Trainer (trainer.py): the training loop over cst.core and
the batches of cst.data. Not evaluation (cst.eval)."""
