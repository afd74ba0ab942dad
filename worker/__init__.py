"""batchwire's model worker: one process per GPU or CPU slot, holding the only copy of the model."""
