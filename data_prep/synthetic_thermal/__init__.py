"""Synthetic thermal face frames: the embedded default dataset (no download).

Importing the package registers the TFDS builder `synthetic_thermal`.
"""
from data_prep.synthetic_thermal.synthetic_thermal_dataset_builder import (
    SyntheticThermal,
    SyntheticThermalConfig,
)

__all__ = ["SyntheticThermal", "SyntheticThermalConfig"]
