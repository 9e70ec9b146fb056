"""The live host kernel's MADV_COLLAPSE, measured in the same schema."""
