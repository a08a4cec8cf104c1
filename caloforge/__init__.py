"""CaloForge: a calorimeter-shower foundation model platform."""

__version__ = "0.1.0"
