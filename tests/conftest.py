"""Suite-wide settings. The tests run tiny models on 2 CPU cores, often with several processes
at once (DDP tests, CLI subprocesses, DataLoader workers): one intra-op thread per process
avoids OpenMP oversubscription, which made tiny steps 10-20x slower here. Set before any test
module imports torch, and inherited by subprocesses."""
import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
