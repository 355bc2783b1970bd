"""Offline tools: GeoTIFF -> TFDS-readable TFRecords, and the generated demo dataset."""
