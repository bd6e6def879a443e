"""Training modules shared by run_finetune.py and run_pretrain.py."""
