"""Data: the toy world, its oracle, record formats and LightningDataModules."""
