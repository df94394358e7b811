"""The Megatron training loop (`loop`), its data adapter (`data`) and HF Trainer bookkeeping (`logging`)."""
