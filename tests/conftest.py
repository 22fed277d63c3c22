"""One torch thread: these matrices are small, and spinning threads on a busy 2-core machine cost far more."""
import torch

torch.set_num_threads(1)
