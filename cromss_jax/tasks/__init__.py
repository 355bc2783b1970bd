"""What to train: CromSS pretraining, transfer to a downstream set, and the study's ablations."""
