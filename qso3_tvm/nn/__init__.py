"""The PyTorch side: model, quantization (MDDQ, LSQ), int8 deployment form, training, checkpoints, eager metrics."""
