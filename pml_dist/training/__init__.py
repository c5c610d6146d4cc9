"""Training: one Trainer for the teacher, the references and the students (trainer.py), with its
losses, models, DeepSpeed engine, checkpoints and evaluation. Imports only pml_dist core and ffcv_data."""
