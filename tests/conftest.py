"""Test-wide settings. Environment first: TRITON_INTERPRET must be set before any kernel is defined,
DS_ACCELERATOR before deepspeed is imported."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ALICE_DS_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
