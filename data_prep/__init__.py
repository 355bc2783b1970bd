"""Offline tools: GeoTIFF -> TFDS-readable shards (array_record for pretraining, TFRecord for
the downstream sets), and the generated demo dataset."""
