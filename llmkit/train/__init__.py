"""Training: token data (data.py), the one trainer loop (trainer.py), losses, presets, the pretraining stage.

    corpus --prepare--> token shards + manifest --TokenBatches--> Trainer(model, loss_fn, ...) --> HF folder

Import from the submodules (`llmkit.train.trainer.Trainer`, `llmkit.train.pretrain.pretrain`, ...);
this package imports nothing heavy on its own.
"""
