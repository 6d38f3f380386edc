"""The module's Qt panel (runs only inside the Slicer application); see ``panel``."""
