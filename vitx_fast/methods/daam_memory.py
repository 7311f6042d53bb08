"""placeholder, replaced by its implementation."""
class MemoryBank:  # placeholder until daam lands
    pass
