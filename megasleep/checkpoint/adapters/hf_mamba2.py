"""placeholder"""
from megasleep.checkpoint.adapters.base import Adapter


class HFMamba2Adapter(Adapter):
    name = "transformers-mamba2"
    model_types = ("mamba2",)
