"""The Kopaczka thermal face database (manual download).

Importing the package registers the TFDS builder `kopaczka_thermal`.
"""
from data_prep.kopaczka_thermal.kopaczka_thermal_dataset_builder import (
    MANUAL_DOWNLOAD_INSTRUCTIONS,
    KopaczkaThermal,
    KopaczkaThermalConfig,
)

__all__ = ["KopaczkaThermal", "KopaczkaThermalConfig",
           "MANUAL_DOWNLOAD_INSTRUCTIONS"]
