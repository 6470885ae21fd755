"""A stand-in PowerAI Vision / Maximo Visual Inspection server for tests, benchmarks and demos."""

from paiv_sync.emulator.options import EmulatorOptions, FaultOptions
from paiv_sync.emulator.server import Emulator

__all__ = ["Emulator", "EmulatorOptions", "FaultOptions"]
